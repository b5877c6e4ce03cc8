"""Grow then prune back vs the base trained as long (Fashion-MNIST).

    python tools/grow_bench.py --out /tmp/grow-bench [--limit 20000] [--threads 2]

Base: conv 3x3 8 -> ReLU -> max-pool -> conv 3x3 16 -> ReLU -> max-pool -> Flatten ->
Gemm 10 (built in ONNX, ``gpp_onnx.samples.GraphBuilder``), trained ``--base-epochs``.
Then two arms with the same total number of training epochs:

* **base**: the base trained ``grow + prune`` epochs more (one more cosine run);
* **grow+prune**: ``gpp_onnx.grow`` (``--max-modules``, ``--grow-epochs`` each, kept while
  held-out accuracy gains more than ``--min-gain`` points), then ``gpp_onnx.prune`` to the
  base's MACs (``target_macs = base / grown``, free widths, criterion gpp, repair lsq)
  with ``--finetune-epochs`` of fine-tuning. The base arm trains as many epochs as the
  grow arm does when every module is tried (base + grow epochs x max modules +
  fine-tune); the table gives each arm's epochs (fewer for grow when growth stopped).

Every model is evaluated on the 10k test file through onnxruntime. The held-out split
(10% of the training file, the pipeline's default) serves grow's keep/drop decisions
and prune's scoring only. Prints a table and writes ``OUT/grow_bench.json``.

``--gpp NAME --ceiling`` instead trains the grown model (modules inserted untrained at
``--at`` or the automatic positions) for the whole ``--budget-epochs`` without pruning:
the most a prune back to the base's cost can keep of what the modules add.

``--gpp NAME --widened MACS``: the other comparison of the grow issue, the base's convs
widened alike to about MACS (the grown model's MACs), trained from scratch as long as
the grown model is before its rounds, then ``gpp`` (no grow) back to the base's MACs
with the rounds' share of the budget and settings.

``--gpp NAME`` runs one arm of ``gpp --grow`` instead (the product command:
``--max-modules`` is N, ``--budget-epochs`` the whole budget after the base's training,
``--grow-share``, ``--rounds``, ``--allocation``, ``--at``; target ``--target-macs 1.0``:
the base's MACs), next to the base trained as many epochs in all. Each arm is a row of
``OUT/gpp_arms.json`` (a rerun skips finished arms; the base and the longer-trained base
are kept as files, an interrupted gpp resumes from its work folder). Rows show held-out
(val) accuracy, which chooses settings; test accuracy only with ``--test``, once the
settings are chosen.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def base_net(seed: int = 0, widths: tuple[int, int] = (8, 16)):
    from gpp_onnx.samples import GraphBuilder

    b = GraphBuilder((1, 1, 28, 28), seed=seed, name="fmnist_small")
    x = b.pool(b.act(b.conv("input", widths[0]), "Relu"))  # 14x14
    x = b.pool(b.act(b.conv(x, widths[1]), "Relu"))        # 7x7
    return b.build(b.gemm(b.flatten(x), 10))


def residual_net(seed: int = 0):
    """A small residual net of about the grown-and-pruned net's cost (9.5k params, 232k
    MACs): conv 3x3 8 -> ReLU -> max-pool -> conv 3x3 12 stride 2 -> ReLU -> basic block
    (conv 3x3 12 -> ReLU -> conv 3x3 12, plus the identity) -> ReLU -> Flatten -> Gemm 10."""
    from gpp_onnx.samples import GraphBuilder

    b = GraphBuilder((1, 1, 28, 28), seed=seed, name="fmnist_residual")
    x = b.pool(b.act(b.conv("input", 8), "Relu"))          # 14x14
    x = b.act(b.conv(x, 12, stride=2), "Relu")             # 7x7
    h = b.conv(b.act(b.conv(x, 12), "Relu"), 12)
    x = b.act(b.binary("Add", x, h), "Relu")
    return b.build(b.gemm(b.flatten(x), 10))


def residual_arm(args) -> int:
    """The residual net trained from scratch for ``--residual`` epochs on the same
    training images (one cosine run), measured on val and (``--test``) the test file."""
    from gpp_onnx.config import DataOptions, PruneConfig, TrainOptions
    from gpp_onnx.evaluation import accuracy, dataset_for
    from gpp_onnx.finetune import train_model
    from gpp_onnx.graph import GraphView
    from gpp_onnx.splits import load_data

    data = DataOptions("fashion-mnist", limit=args.limit)
    model = residual_net(args.seed)
    splits = load_data(GraphView(model), PruneConfig(data=data, seed=args.seed))
    trained = train_model(model, splits.train, _epochs(TrainOptions(lr=args.lr),
                                                       args.residual), args.seed)
    s = stats(trained)
    row = {"arm": f"residual net, {args.residual:g} epochs from scratch",
           "epochs": args.residual, "params": s.params, "macs": s.macs,
           "val_accuracy": accuracy(trained, splits.val),
           "test_accuracy": (accuracy(trained, dataset_for(GraphView(model),
                                                           "fashion-mnist:test"))
                             if args.test else None)}
    (args.out / "residual.json").write_text(json.dumps(row, indent=1))
    print(gpp_table([row]))
    return 0


def stats(model):
    from gpp_onnx.graph import GraphView
    from gpp_onnx.stats import count

    return count(GraphView(model))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--limit", type=int, help="training images (stratified; default all)")
    p.add_argument("--base-epochs", type=float, default=2)
    p.add_argument("--grow-epochs", type=float, default=1)
    p.add_argument("--max-modules", type=int, default=2)
    p.add_argument("--min-gain", type=float, default=0.1)
    p.add_argument("--finetune-epochs", type=float, default=1)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpp", metavar="NAME", help="run one gpp --grow arm under this name")
    p.add_argument("--budget-epochs", type=float, default=3)
    p.add_argument("--grow-share", type=float, default=2 / 3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--allocation", choices=["uniform", "global"], default="uniform")
    p.add_argument("--at", action="append", default=[])
    p.add_argument("--branch-widths", type=lambda t: tuple(int(v) for v in t.split(",")))
    p.add_argument("--split", choices=["even", "final"], default="final")
    p.add_argument("--acc-floor", type=float, default=1.0,
                   help="gpp arms: 1.0 (default) never stops early: every round is measured")
    p.add_argument("--test", action="store_true", help="gpp arms: test accuracy too")
    p.add_argument("--widened", type=float, metavar="MACS",
                   help="with --gpp NAME: a base widened to about MACS (the grown model's), "
                        "trained as long as the grown one, then gpp back to the base's MACs")
    p.add_argument("--ceiling", action="store_true",
                   help="with --gpp NAME: the grown model trained --budget-epochs, unpruned")
    p.add_argument("--residual", type=float, metavar="EPOCHS",
                   help="train the residual net of the comparison instead, EPOCHS epochs")
    return p.parse_args(argv)


def main(argv=None) -> int:
    import onnx
    import torch

    import gpp_onnx
    from gpp_onnx.config import DataOptions, TrainOptions
    from gpp_onnx.evaluation import accuracy, dataset_for
    from gpp_onnx.finetune import train_model
    from gpp_onnx.graph import GraphView
    from gpp_onnx.splits import load_data
    from gpp_onnx.config import PruneConfig

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.gpp:
        return gpp_arm(args)
    if args.residual:
        return residual_arm(args)
    data = DataOptions("fashion-mnist", limit=args.limit)
    model = base_net(args.seed)
    view = GraphView(model)
    splits = load_data(view, PruneConfig(data=data, seed=args.seed))
    test = dataset_for(view, "fashion-mnist:test")
    opts = TrainOptions(lr=args.lr)
    rows, t0 = [], time.perf_counter()

    def row(name, m, epochs):
        s = stats(m)
        rows.append({"arm": name, "epochs": epochs, "params": s.params, "macs": s.macs,
                     "test_accuracy": accuracy(m, test),
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(fmt(rows[-1]), flush=True)

    base = train_model(model, splits.train, _epochs(opts, args.base_epochs), args.seed)
    row("base", base, args.base_epochs)
    onnx.save(base, args.out / "base.onnx")
    # the total the grow arm trains when every module is tried
    total = args.base_epochs + args.grow_epochs * args.max_modules + args.finetune_epochs
    longer = train_model(base, splits.train, _epochs(opts, total - args.base_epochs),
                         args.seed + 1)
    row("base trained as long", longer, total)
    grown = gpp_onnx.grow(base, args.out / "grown.onnx", data=data, seed=args.seed,
                          max_modules=args.max_modules, min_gain=args.min_gain,
                          train=_epochs(opts, args.grow_epochs))
    grow_epochs = args.grow_epochs * len(grown.modules)
    row(f"grown ({len(grown.kept)} of {len(grown.modules)} kept)", grown.model,
        args.base_epochs + grow_epochs)
    final = grown.model
    if grown.kept:
        pruned = gpp_onnx.prune(grown.model, args.out / "grown_pruned.onnx",
                                target_macs=stats(base).macs / grown.after.macs, round_to=1,
                                data=data, train=_epochs(opts, args.finetune_epochs),
                                latency=False, seed=args.seed)
        final = pruned.model
    row("grow + prune to base MACs", final,
        args.base_epochs + grow_epochs + (args.finetune_epochs if grown.kept else 0))
    (args.out / "grow_bench.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
         "modules": grown.report["modules"]}, indent=1))
    print(table(rows))
    return 0


def gpp_arm(args) -> int:
    """One ``gpp --grow`` arm and the base trained as long (see the module docstring)."""
    import onnx

    import gpp_onnx
    from gpp_onnx.config import DataOptions, PruneConfig, TrainOptions
    from gpp_onnx.evaluation import accuracy, dataset_for
    from gpp_onnx.finetune import train_model
    from gpp_onnx.graph import GraphView
    from gpp_onnx.splits import load_data

    data = DataOptions("fashion-mnist", limit=args.limit)
    model = base_net(args.seed)
    splits = load_data(GraphView(model), PruneConfig(data=data, seed=args.seed))
    test = dataset_for(GraphView(model), "fashion-mnist:test") if args.test else None
    opts = TrainOptions(lr=args.lr)
    path = args.out / "base.onnx"
    if not path.exists():
        onnx.save(train_model(model, splits.train, _epochs(opts, args.base_epochs), args.seed),
                  path)
    total = args.base_epochs + args.budget_epochs
    longer = args.out / f"base-{total:g}.onnx"
    if not longer.exists():
        onnx.save(train_model(onnx.load(path), splits.train,
                              _epochs(opts, args.budget_epochs), args.seed + 1), longer)
    arms_path = args.out / "gpp_arms.json"
    arms = json.loads(arms_path.read_text()) if arms_path.exists() else {}

    def measure(name, m, epochs, extra=None):
        s = stats(m)
        row = {"arm": name, "epochs": epochs, "params": s.params, "macs": s.macs,
               "val_accuracy": accuracy(m, splits.val),
               "test_accuracy": accuracy(m, test) if test is not None else None, **(extra or {})}
        if arms.get(name, {}).get("test_accuracy") is not None and test is None:
            row["test_accuracy"] = arms[name]["test_accuracy"]
        arms[name] = {**arms.get(name, {}), **row}

    measure("base", onnx.load(path), args.base_epochs)
    measure(f"base trained {total:g} epochs", onnx.load(longer), total)
    if args.ceiling:
        return ceiling_arm(args, onnx.load(path), splits, measure, arms, arms_path)
    if args.widened:
        return widened_arm(args, onnx.load(path), splits, measure, arms, arms_path)
    out = args.out / f"{args.gpp}.onnx"
    if not out.exists():
        t0 = time.perf_counter()
        config = rounds_config(args, 1.0)
        from gpp_onnx.grow import Widths

        grow = gpp_onnx.GrowConfig(max_modules=args.max_modules, at=tuple(args.at),
                                   min_gain=args.min_gain,
                                   widths=Widths(*(args.branch_widths or (None,) * 3)))
        work = out.with_name(out.name + ".gpp-work")
        gpp_onnx.gpp(path, out, config, gpp_onnx.GppOptions(
            budget_epochs=args.budget_epochs, grow=grow, grow_share=args.grow_share,
            split=args.split, acc_floor=args.acc_floor,
            resume=(work / "state.json").exists()))
        arms[args.gpp] = {"seconds": round(time.perf_counter() - t0, 1)}
    rep = json.loads(out.with_suffix(".report.json").read_text())
    measure(args.gpp, onnx.load(out), args.base_epochs + rep["epochs_used"], {
        "settings": {k: getattr(args, k) for k in (
            "max_modules", "budget_epochs", "grow_share", "rounds", "allocation", "at",
            "min_gain", "split", "acc_floor", "branch_widths")},
        "kept": rep["grow"]["kept"], "grown_macs": rep["grow"]["macs"],
        "best": rep["best"], "branches": rep["grow"]["after"]})
    arms_path.write_text(json.dumps(arms, indent=1))
    print(gpp_table(arms.values()))
    return 0


def ceiling_arm(args, base, splits, measure, arms, arms_path) -> int:
    """The grown model (modules at ``--at``, else the automatic positions, inserted
    untrained) trained the whole ``--budget-epochs`` from the base, never pruned: what
    the grown capacity gives within the budget, the most a prune back can keep."""
    import onnx

    import gpp_onnx
    from gpp_onnx.config import TrainOptions
    from gpp_onnx.finetune import train_model
    from gpp_onnx.grow import Widths

    out = args.out / f"{args.gpp}.onnx"
    if not out.exists():
        grown = gpp_onnx.grow(base, max_modules=args.max_modules, at=tuple(args.at),
                              widths=Widths(*(args.branch_widths or (None,) * 3)),
                              train=TrainOptions(epochs=0)).model
        onnx.save(train_model(grown, splits.train,
                              _epochs(TrainOptions(lr=args.lr), args.budget_epochs),
                              args.seed + 1), out)
    measure(args.gpp, onnx.load(out), args.base_epochs + args.budget_epochs, {
        "settings": {"ceiling": True, "max_modules": args.max_modules, "at": args.at,
                     "branch_widths": args.branch_widths}})
    arms_path.write_text(json.dumps(arms, indent=1))
    print(gpp_table(arms.values()))
    return 0


def rounds_config(args, target_macs: float):
    """The PruneConfig of a gpp arm's rounds: the command's training defaults at --lr
    (which sets both of its rates), free widths, no latency."""
    from gpp_onnx.config import DataOptions, PruneConfig, with_lr

    return PruneConfig(data=DataOptions("fashion-mnist", limit=args.limit),
                       target_macs=target_macs, rounds=args.rounds, round_to=1,
                       allocation=args.allocation, latency=False, seed=args.seed,
                       train=with_lr(PruneConfig().train, args.lr))


def widened_arm(args, base, splits, measure, arms, arms_path) -> int:
    """The base's two convs widened alike (8k, 16k rounded) to the MACs closest to
    ``--widened``, trained from scratch as long as the grown model is before its rounds
    (``--base-epochs`` + the grow share of ``--budget-epochs``), then ``gpp`` without grow
    back to the base's MACs with the rest of the budget, the rounds' settings otherwise."""
    import onnx

    import gpp_onnx
    from gpp_onnx.config import TrainOptions
    from gpp_onnx.finetune import train_model

    base_macs = stats(base).macs
    grid = [(round(8 * f / 10), round(16 * f / 10)) for f in range(10, 41)]
    widths = min(grid, key=lambda w: abs(stats(base_net(args.seed, w)).macs - args.widened))
    wide_path = args.out / f"widened-{widths[0]}-{widths[1]}.onnx"
    before = args.base_epochs + args.budget_epochs * args.grow_share
    if not wide_path.exists():
        onnx.save(train_model(base_net(args.seed, widths), splits.train,
                              _epochs(TrainOptions(lr=args.lr), before), args.seed), wide_path)
    wide = onnx.load(wide_path)
    measure(f"widened {widths[0]}/{widths[1]}", wide, before)
    out = args.out / f"{args.gpp}.onnx"
    if not out.exists():
        config = rounds_config(args, base_macs / stats(wide).macs)
        work = out.with_name(out.name + ".gpp-work")
        gpp_onnx.gpp(wide_path, out, config, gpp_onnx.GppOptions(
            budget_epochs=args.budget_epochs * (1 - args.grow_share), split=args.split,
            acc_floor=args.acc_floor, resume=(work / "state.json").exists()))
    rep = json.loads(out.with_suffix(".report.json").read_text())
    measure(args.gpp, onnx.load(out), before + rep["epochs_used"], {
        "settings": {"widened": list(widths), "rounds": args.rounds,
                     "allocation": args.allocation, "split": args.split},
        "grown_macs": stats(wide).macs, "best": rep["best"]})
    arms_path.write_text(json.dumps(arms, indent=1))
    print(gpp_table(arms.values()))
    return 0


def gpp_table(rows) -> str:
    def acc(v):
        return "" if v is None else f"{v:.4f}"

    head = (f"{'arm':<28} {'epochs':>6} {'params':>8} {'MACs':>9} {'grown MACs':>10} "
            f"{'val acc':>8} {'test acc':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['arm']:<28} {r['epochs']:>6g} {r['params']:>8d} {r['macs']:>9d} "
                     f"{r.get('grown_macs') or '':>10} {acc(r['val_accuracy']):>8} "
                     f"{acc(r.get('test_accuracy')):>8}")
    return "\n".join(lines)


def _epochs(opts, epochs):
    from dataclasses import replace

    return replace(opts, epochs=epochs)


def fmt(r: dict) -> str:
    return (f"{r['arm']:<34} {r['epochs']:>6g} {r['params']:>8d} {r['macs']:>10d} "
            f"{r['test_accuracy']:>8.4f} {r['seconds']:>8.1f}")


def table(rows: list[dict]) -> str:
    head = f"{'arm':<34} {'epochs':>6} {'params':>8} {'MACs':>10} {'test acc':>8} {'time s':>8}"
    return "\n".join([head, "-" * len(head), *map(fmt, rows)])


if __name__ == "__main__":
    sys.exit(main())
