"""Fashion-MNIST benchmark: the discriminant ("gpp") criterion against baselines.

    python tools/fmnist_bench.py train --arch vgg --epochs 6 --out /tmp/fmnist-work/vgg
    python tools/fmnist_bench.py train --arch inception --epochs 6 --out /tmp/fmnist-work/inc
    python tools/fmnist_bench.py sweep --model /tmp/fmnist-work/vgg/model.onnx \\
        --criteria gpp,taylor,l1,random --removed 0.5,0.75,0.9 --finetune-epochs 0,1

``train`` builds a small VGG-style or Inception-style net in plain torch, trains it from
scratch on the Fashion-MNIST training file minus a 5k validation split (the same
deterministic, class-stratified split ``gpp_onnx.prune`` makes with
``val_split=5000/60000`` and seed 0), evaluates it on the 10k test file, exports it to
``OUT/model.onnx`` with the legacy exporter (BatchNorm folded into the convs) and writes
``OUT/train.json`` and the torch weights ``OUT/model.pt`` (``tools/tp_fmnist.py`` prunes
them with Torch-Pruning).

``sweep`` prunes that model with ``gpp_onnx.prune(..., PruneConfig(target_macs=1-m, ...))``
for every criterion x MACs-removed fraction m x fine-tune budget F (F=0: accuracy right
after the cut and its least-squares repair; F>0: the same fine-tune, with the library's
defaults, for all criteria),
evaluates each written model on the 10k test set through onnxruntime and prints/saves a
table. Results go to ``--json`` (default ``<model dir>/sweep.json``) after every run, and
runs already there are skipped, so an interrupted sweep resumes where it stopped.
Criteria the installed gpp-onnx does not know (e.g. ``taylor`` before it lands) are
skipped with a message.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VAL_SPLIT = 5000 / 60000
SOURCE = "fashion-mnist"
TEST_SOURCE = "fashion-mnist:test"


# --------------------------------------------------------------------------- data
def load_splits():
    """(train 55k, val 5k, test 10k) exactly as gpp_onnx.prune splits the training file."""
    from gpp_onnx.data import DataSpec, load_dataset, split

    full = load_dataset(DataSpec(SOURCE, 1, 28, 28))
    train, val = split(full, VAL_SPLIT, 0)
    test = load_dataset(DataSpec(TEST_SOURCE, 1, 28, 28))
    return train, val, test


# --------------------------------------------------------------------------- models
def build(arch: str):
    import torch.nn as nn

    def cbr(cin, cout, k=3):
        return [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True)]

    if arch == "vgg":
        class SmallVGG(nn.Module):
            """conv3x3-BN-ReLU stacks 16-pool-32-32-pool-64-64-pool, Flatten, FC 128, FC 10."""

            def __init__(self, widths=(16, "M", 32, 32, "M", 64, 64, "M"), hidden=128):
                super().__init__()
                layers, cin = [], 1
                for w in widths:
                    if w == "M":
                        layers.append(nn.MaxPool2d(2))
                    else:
                        layers += cbr(cin, w)
                        cin = w
                self.features = nn.Sequential(*layers)
                self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(cin * 3 * 3, hidden),
                                                nn.ReLU(inplace=True), nn.Linear(hidden, 10))

            def forward(self, x):
                return self.classifier(self.features(x))

        return SmallVGG()

    if arch == "inception":
        class Inception(nn.Module):
            """Branches 1x1 | 1x1->3x3 | 1x1->3x3->3x3 | 3x3 maxpool->1x1, concatenated."""

            def __init__(self, cin, b1, b2r, b2, b3r, b3, b4):
                super().__init__()
                self.b1 = nn.Sequential(*cbr(cin, b1, 1))
                self.b2 = nn.Sequential(*cbr(cin, b2r, 1), *cbr(b2r, b2))
                self.b3 = nn.Sequential(*cbr(cin, b3r, 1), *cbr(b3r, b3), *cbr(b3, b3))
                self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), *cbr(cin, b4, 1))
                self.out_channels = b1 + b2 + b3 + b4

            def forward(self, x):
                import torch
                return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)

        class SmallInception(nn.Module):
            """stem conv 16 - pool - Inception(32) - pool - Inception(64) - Inception(96),
            GAP, FC 10."""

            def __init__(self):
                super().__init__()
                a = Inception(16, 8, 8, 12, 4, 6, 6)           # 32 channels at 14x14
                b = Inception(32, 16, 16, 24, 8, 12, 12)       # 64 channels at 7x7
                c = Inception(64, 24, 24, 32, 12, 16, 24)      # 96 channels at 7x7
                self.features = nn.Sequential(*cbr(1, 16), nn.MaxPool2d(2), a,
                                              nn.MaxPool2d(2), b, c)
                self.pool = nn.AdaptiveAvgPool2d(1)
                self.fc = nn.Linear(c.out_channels, 10)

            def forward(self, x):
                return self.fc(self.pool(self.features(x)).flatten(1))

        return SmallInception()
    raise SystemExit(f"unknown --arch {arch!r}: vgg or inception")


def torch_accuracy(model, ds, batch=500) -> float:
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(ds.y), batch):
            logits = model(torch.from_numpy(ds.x[i:i + batch]))
            correct += int((logits.argmax(1).numpy() == ds.y[i:i + batch]).sum())
    return correct / len(ds.y)


def cmd_train(args) -> None:
    import numpy as np
    import onnx
    import torch
    import torch.nn.functional as F

    from adapters.pytorch import export_torch
    from gpp_onnx.evaluation import accuracy
    from gpp_onnx.stats import count
    from gpp_onnx.graph import GraphView

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, val, test = load_splits()
    model = build(args.arch)
    n_params = sum(p.numel() for p in model.parameters())
    steps_per_epoch = -(-len(train.y) // args.batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4,
                          nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.epochs *
                                                steps_per_epoch, pct_start=0.2)
    rng = np.random.default_rng(args.seed)
    history = []
    t_start = time.perf_counter()
    print(f"{args.arch}: {n_params} parameters, {len(train.y)} train / {len(val.y)} val / "
          f"{len(test.y)} test images", flush=True)
    for epoch in range(1, args.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        order = rng.permutation(len(train.y))
        losses = []
        for i in range(0, len(order), args.batch_size):
            idx = order[i:i + args.batch_size]
            x = torch.from_numpy(train.x[idx])
            if args.flip:  # horizontal flip of half the batch (clothes are left-right symmetric)
                flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
            loss = F.cross_entropy(model(x), torch.from_numpy(train.y[idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        val_acc = torch_accuracy(model, val)
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "val": val_acc,
                        "seconds": round(time.perf_counter() - t0, 1)})
        print(f"epoch {epoch}/{args.epochs}: loss {np.mean(losses):.4f}  val {val_acc:.4f}  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    train_seconds = time.perf_counter() - t_start
    test_acc = torch_accuracy(model, test)
    torch.save(model.state_dict(), out / "model.pt")   # for the PyTorch pruner baseline
    path = export_torch(model, out / "model.onnx", (1, 1, 28, 28), exporter="legacy")
    proto = onnx.load(str(path))
    onnx_test, onnx_val = accuracy(proto, test), accuracy(proto, val)
    stats = count(GraphView(proto))
    record = {"arch": args.arch, "epochs": args.epochs, "batch_size": args.batch_size,
              "lr": args.lr, "flip": args.flip, "seed": args.seed, "threads": args.threads,
              "torch_params": n_params, "onnx_params": stats.params, "onnx_macs": stats.macs,
              "train_seconds": round(train_seconds, 1), "history": history,
              "val_accuracy_torch": history[-1]["val"], "test_accuracy_torch": test_acc,
              "val_accuracy": onnx_val, "test_accuracy": onnx_test, "model": str(path),
              "date": _dt.datetime.now().isoformat(timespec="seconds"), "machine": machine()}
    (out / "train.json").write_text(json.dumps(record, indent=1))
    print(f"test accuracy {test_acc:.4f} (torch) / {onnx_test:.4f} (onnxruntime); "
          f"{stats.params} params, {stats.macs} MACs; wrote {path}", flush=True)


# --------------------------------------------------------------------------- sweep
def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine()}


def _key(r: dict) -> tuple:
    return (r["criterion"], round(r["removed_target"], 4), float(r["finetune_epochs"]))


def cmd_sweep(args) -> None:
    from dataclasses import replace

    import onnx
    import torch

    import gpp_onnx
    from gpp_onnx.config import DataOptions, PruneConfig
    from gpp_onnx.data import DataSpec, load_dataset
    from gpp_onnx.evaluation import accuracy
    from gpp_onnx.importance import criterion_names

    torch.set_num_threads(args.threads)
    src = Path(args.model)
    work = Path(args.work) if args.work else src.parent / "sweep"
    work.mkdir(parents=True, exist_ok=True)
    out_json = Path(args.json) if args.json else src.parent / "sweep.json"
    state = json.loads(out_json.read_text()) if out_json.exists() else {}
    rows = state.get("rows", [])
    modes = {r.get("repair", "bias") for r in rows}  # rows before --repair existed used bias
    if modes - {args.repair}:
        sys.exit(f"{out_json} holds runs with --repair {','.join(sorted(modes))}; "
                 f"pass another --json for --repair {args.repair}")
    done = {_key(r) for r in rows if "error" not in r}
    test = load_dataset(DataSpec(TEST_SOURCE, 1, 28, 28))
    base = state.get("base") or {"model": str(src),
                                 "test_accuracy": accuracy(onnx.load(str(src)), test)}
    print(f"{src}: unpruned test accuracy {base['test_accuracy']:.4f}", flush=True)
    known = set(criterion_names())
    criteria = [c for c in args.criteria.split(",") if c]
    for c in criteria:
        if c not in known:
            print(f"skipping criterion '{c}': not in this gpp-onnx "
                  f"(known: {', '.join(sorted(known))})", flush=True)
    criteria = [c for c in criteria if c in known]
    removed = [float(v) for v in args.removed.split(",")]
    budgets = [float(v) for v in args.finetune_epochs.split(",")]
    if not args.quiet:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                            stream=sys.stderr)
    # budget-major order: every criterion's cheap F=0 point before any fine-tuning
    for f in budgets:
        for m in removed:
            for c in criteria:
                key = (c, round(m, 4), f)
                if key in done:
                    continue
                dst = work / f"{c}_m{int(round(m * 100))}_f{f:g}.onnx"
                config = PruneConfig(  # free widths: criteria compared channel by channel
                    target_macs=1 - m, criterion=c, seed=args.seed, latency=False, round_to=1,
                    data=DataOptions(SOURCE, val_split=VAL_SPLIT, per_class=args.per_class),
                    train=replace(PruneConfig().train, epochs=f), repair=args.repair)
                row = {"criterion": c, "removed_target": m, "finetune_epochs": f,
                       "per_class": args.per_class, "repair": args.repair, "output": str(dst)}
                t0 = time.perf_counter()
                try:
                    res = gpp_onnx.prune(src, dst, config)
                except Exception as exc:  # record and go on: one bad point must not stop the sweep
                    row.update(error=f"{type(exc).__name__}: {exc}",
                               traceback=traceback.format_exc()[-3000:],
                               seconds=round(time.perf_counter() - t0, 1))
                    print(f"{c} m={m} F={f:g}: FAILED after {row['seconds']} s: {row['error']}",
                          flush=True)
                else:
                    t_prune = time.perf_counter() - t0
                    rep = res.report
                    test_acc = accuracy(onnx.load(str(dst)), test)
                    rnd = rep["rounds"][-1]
                    row.update(
                        removed_macs=1 - rep["ratios"]["macs"],
                        removed_params=1 - rep["ratios"]["params"],
                        params=rep["after"]["params"], macs=rep["after"]["macs"],
                        params_before=rep["before"]["params"], macs_before=rep["before"]["macs"],
                        val_before=rep["before"]["accuracy"],
                        val_after_cut=rnd["accuracy_after_cut"],
                        val_after_finetune=rnd["accuracy_after_finetune"],
                        test_accuracy=test_acc, seconds=round(t_prune, 1),
                        report=str(res.report_path))
                    print(f"{c} m={m} F={f:g}: removed {row['removed_macs']:.3f} MACs, test "
                          f"{test_acc:.4f}, val after cut {rnd['accuracy_after_cut']:.4f} "
                          f"({t_prune:.0f} s)", flush=True)
                rows = [r for r in rows if _key(r) != key] + [row]
                state = {"model": str(src), "base": base, "machine": machine(),
                         "updated": _dt.datetime.now().isoformat(timespec="seconds"),
                         "rows": rows}
                out_json.write_text(json.dumps(state, indent=1))
    print(sweep_table(state), flush=True)
    print(f"wrote {out_json}")


def sweep_table(state: dict) -> str:
    """criterion | MACs removed target / actual | test acc after cut | after fine-tune | params."""
    from gpp_onnx.report import table

    rows = state.get("rows", [])
    cells = {}
    for r in rows:
        k = (r["criterion"], round(r["removed_target"], 4))
        cells.setdefault(k, {})[r["finetune_epochs"]] = r
    budgets = sorted({r["finetune_epochs"] for r in rows if r["finetune_epochs"] > 0})
    headers = ["criterion", "MACs removed (target)", "actual", "test acc. after cut"]
    headers += [f"after fine-tune ({b:g} ep)" for b in budgets] + ["params", "s (F=0)"]
    headers += [f"s (F={b:g})" for b in budgets]
    out = []
    order = {c: i for i, c in enumerate(("gpp", "taylor", "l1", "l2", "random"))}
    for (c, m), by_f in sorted(cells.items(),
                               key=lambda kv: (kv[0][1], order.get(kv[0][0], 99), kv[0][0])):
        any_row = next((r for r in by_f.values() if "error" not in r), None)

        def acc(f):
            r = by_f.get(f)
            if r is None:
                return ""
            return "ERROR" if "error" in r else f"{100 * r['test_accuracy']:.2f}"

        out.append([c, f"{m:.2f}",
                    f"{any_row['removed_macs']:.3f}" if any_row else "", acc(0.0),
                    *[acc(b) for b in budgets],
                    any_row["params"] if any_row else "",
                    *[by_f[f]["seconds"] if f in by_f else "" for f in (0.0, *budgets)]])
    base = state.get("base", {})
    head = f"unpruned test accuracy {100 * base.get('test_accuracy', float('nan')):.2f}%"
    return head + "\n" + table(headers, out)


def cmd_table(args) -> None:
    print(sweep_table(json.loads(Path(args.json).read_text())))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a small net from scratch and export it to ONNX")
    t.add_argument("--arch", choices=["vgg", "inception"], required=True)
    t.add_argument("--epochs", type=int, default=6)
    t.add_argument("--out", required=True)
    t.add_argument("--batch-size", type=int, default=256)
    t.add_argument("--lr", type=float, default=0.1)
    t.add_argument("--no-flip", dest="flip", action="store_false")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is fastest on a busy 2-core machine)")
    t.set_defaults(func=cmd_train)
    s = sub.add_parser("sweep", help="prune with each criterion at each MACs target")
    s.add_argument("--model", required=True)
    s.add_argument("--criteria", default="gpp,taylor,l1,random")
    s.add_argument("--removed", default="0.5,0.75,0.9", help="fractions of MACs to remove")
    s.add_argument("--finetune-epochs", default="0,1",
                   help="comma list of fine-tune budgets; 0 = accuracy right after the cut")
    s.add_argument("--per-class", type=int, default=32, help="images per class for scoring")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--repair", default="lsq", choices=["lsq", "bias", "none"],
                   help="repair after the cut (use one --json per repair mode)")
    s.add_argument("--threads", type=int, default=1,
                   help="torch threads for scoring and fine-tuning")
    s.add_argument("--work", help="folder for the pruned models (default <model dir>/sweep)")
    s.add_argument("--json", help="results file (default <model dir>/sweep.json)")
    s.add_argument("--quiet", action="store_true", help="no gpp-onnx INFO logging")
    s.set_defaults(func=cmd_sweep)
    tb = sub.add_parser("table", help="print the table of a sweep JSON")
    tb.add_argument("json")
    tb.set_defaults(func=cmd_table)
    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
