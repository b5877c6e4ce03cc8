"""A PyTorch pruner (Torch-Pruning) on the Fashion-MNIST nets, beside gpp-onnx with and
without labels, at the same MACs target and fine-tune budget.

    python tools/fmnist_bench.py train --arch vgg --epochs 3 --out /tmp/tpw/vgg
    python tools/tp_fmnist.py --dir /tmp/tpw/vgg --target-macs 0.25 --finetune-epochs 2 \\
        --json /tmp/tpw/vgg/tp.json
    python tools/tp_fmnist.py --dir /tmp/tpw/vgg --importances l1 --modes uniform --gpp "" \\
        --cross       # the same cut fine-tuned by both trainers

``fmnist_bench.py train`` writes the net twice: ``model.pt`` (torch weights, BatchNorm
unfolded) and ``model.onnx`` (exported, BatchNorm folded). Both sides start from them.

Torch-Pruning (``torch_pruning``, a tools-only dependency): for each importance (``l1``:
MagnitudeImportance p=1; ``taylor``: TaylorImportance on the gradients of the
cross-entropy over 640 training images; ``random``) and each ranking (``uniform``: one
ratio per layer; ``global``: ranked across layers), the pruning ratio is searched (bisection)
for the most MACs at or below the target, counted on the exported ONNX model as gpp-onnx
counts them. The final Linear is kept whole. Then 2 epochs of fine-tuning with labels on
the 55k training split, the recipe of gpp-onnx's fine-tuning: SGD lr 0.01 (`--lr`), momentum 0.9,
weight decay 1e-4, cosine schedule, gradient norm clipped at 2, batch 64, no augmentation
(BatchNorm trains, as torch does).

gpp-onnx: ``gpp-onnx prune model.onnx --data fashion-mnist --target-macs T
--finetune-epochs 2 --val-split 0.0833`` (the same 55k / 5k split) with labels, and with
``--no-labels`` (fisher criterion, repair to the original's outputs, distillation).

Every written model is measured once on the 10k test file (onnxruntime for gpp-onnx,
torch for Torch-Pruning's).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]
from _bench_common import GPP, git_state, machine, table, write_json  # noqa: E402

IMPORTANCES = ("l1", "taylor", "random")
MODES = ("uniform", "global")


def onnx_macs(model, example) -> int:
    import onnx

    from adapters.pytorch import export_torch
    from gpp_onnx.graph import GraphView
    from gpp_onnx.stats import count

    with tempfile.TemporaryDirectory() as tmp:
        path = export_torch(copy.deepcopy(model), Path(tmp) / "m.onnx", tuple(example.shape),
                            exporter="legacy")
        return count(GraphView(onnx.load(str(path)))).macs


def prune(model, importance: str, mode: str, ratio: float, example, scoring):
    """A pruned copy of `model` (Torch-Pruning, `ratio` of the channels)."""
    import torch
    import torch.nn.functional as F
    import torch_pruning as tp

    model = copy.deepcopy(model)
    imp = {"l1": lambda: tp.importance.MagnitudeImportance(p=1),
           "taylor": tp.importance.TaylorImportance,
           "random": tp.importance.RandomImportance}[importance]()
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    pruner = tp.pruner.MetaPruner(model, example, imp, global_pruning=mode == "global",
                                  pruning_ratio=ratio, ignored_layers=[last])
    if importance == "taylor":
        model.eval()
        model.zero_grad()
        for x, y in scoring:
            F.cross_entropy(model(x), y).backward()
    pruner.step()
    model.zero_grad()
    return model


def prune_to(model, importance, mode, target, example, scoring, base_macs):
    """Bisection on the ratio: the pruned copy with the most MACs at or below target."""
    lo, hi, best = 0.0, 0.95, None
    for _ in range(10):
        mid = (lo + hi) / 2
        pruned = prune(model, importance, mode, mid, example, scoring)
        macs = onnx_macs(pruned, example)
        if macs <= target * base_macs:
            best, hi = (pruned, mid, macs), mid
        else:
            lo = mid
    if best is None:
        raise SystemExit(f"{importance}/{mode}: no ratio up to 0.95 reaches {target}")
    return best


def finetune(model, train, epochs: float, seed: int, batch: int = 64, lr: float = 0.01) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F

    steps = max(1, round(epochs * math.ceil(len(train.y) / batch)))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    rng = np.random.default_rng(seed)
    model.train()
    done = 0
    while done < steps:
        order = rng.permutation(len(train.y))
        for i in range(0, len(order), batch):
            if done == steps:
                break
            idx = np.sort(order[i:i + batch])
            loss = F.cross_entropy(model(torch.from_numpy(train.x[idx])),
                                   torch.from_numpy(train.y[idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
            opt.step()
            sched.step()
            done += 1


def cross(model, train, test, args, importance, mode, macs_kept) -> dict:
    """The Torch-Pruning cut `model`, exported (BatchNorm folded) and fine-tuned by
    gpp-onnx's trainer with the same recipe."""
    import onnx

    from adapters.pytorch import export_torch
    from gpp_onnx.config import TrainOptions
    from gpp_onnx.evaluation import accuracy
    from gpp_onnx.finetune import train_model

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = export_torch(copy.deepcopy(model), Path(tmp) / "cut.onnx", (1, 1, 28, 28),
                            exporter="legacy")
        cut = onnx.load(str(path))
    options = TrainOptions(epochs=args.finetune_epochs, lr=0.01, batch_size=64, device="cpu")
    tuned = train_model(cut, train, options, seed=args.seed)
    return {"method": f"torch-pruning {importance} {mode}, gpp-onnx fine-tune",
            "labels": True, "macs_kept": macs_kept, "test_after_cut": accuracy(cut, test),
            "test": accuracy(tuned, test), "seconds": round(time.perf_counter() - t0, 1)}


def fold_batchnorm(model):
    """A copy of `model` with each BatchNorm2d folded into the Conv2d before it (what the
    ONNX exporter does)."""
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = copy.deepcopy(model).eval()
    for parent in list(model.modules()):
        if not isinstance(parent, torch.nn.Sequential):
            continue
        layers, i = list(parent), 0
        out = []
        while i < len(layers):
            if (isinstance(layers[i], torch.nn.Conv2d) and i + 1 < len(layers)
                    and isinstance(layers[i + 1], torch.nn.BatchNorm2d)):
                out.append(fuse_conv_bn_eval(layers[i], layers[i + 1]))
                i += 2
            else:
                out.append(layers[i])
                i += 1
        for name in list(parent._modules):
            del parent._modules[name]
        for k, layer in enumerate(out):
            parent.add_module(str(k), layer)
    return model


def run_gpp(model: Path, out: Path, target: float, epochs: float, labels: bool) -> dict:
    from gpp_onnx.data import DataSpec, load_dataset
    from gpp_onnx.evaluation import accuracy

    import onnx

    cmd = [*GPP, "-q", "prune", str(model), "--data", "fashion-mnist", "--target-macs",
           str(target), "--finetune-epochs", str(epochs), "--val-split", str(5000 / 60000),
           "--no-latency", "-o", str(out), *([] if labels else ["--no-labels"])]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - t0
    report = json.loads(out.with_suffix(".report.json").read_text())
    test = load_dataset(DataSpec("fashion-mnist:test", 1, 28, 28))
    return {"macs_kept": report["ratios"]["macs"], "test": accuracy(onnx.load(str(out)), test),
            "seconds": round(seconds, 1), "command": " ".join(cmd[len(GPP):])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", required=True, help="fmnist_bench.py train --out (model.pt, "
                   "model.onnx, train.json)")
    p.add_argument("--target-macs", type=float, default=0.25)
    p.add_argument("--finetune-epochs", type=float, default=2.0)
    p.add_argument("--importances", default=",".join(IMPORTANCES))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--gpp", default="labels,no-labels", help="gpp-onnx runs: labels, no-labels")
    p.add_argument("--cross", action="store_true", help="also fine-tune the first "
                   "Torch-Pruning cut with gpp-onnx's trainer (exported: BatchNorm folded) "
                   "and in torch with its BatchNorm folded")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.01, help="Torch-Pruning's fine-tuning rate "
                   "(BatchNorm training; gpp-onnx's default with its BatchNorm put back is 0.03)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="results (rewritten after each run)")
    args = p.parse_args()

    import numpy as np
    import torch

    from adapters.pytorch import _import_torchvision
    from fmnist_bench import build, load_splits, torch_accuracy

    _import_torchvision()    # before torch_pruning imports it (CPU torch: see the adapter)

    torch.set_num_threads(args.threads)
    work = Path(args.dir)
    arch = json.loads((work / "train.json").read_text())["arch"]
    base = build(arch)
    base.load_state_dict(torch.load(work / "model.pt"))
    base.eval()
    train, _, test = load_splits()
    example = torch.zeros(1, 1, 28, 28)
    base_macs = onnx_macs(base, example)
    rng = np.random.default_rng(args.seed)
    picked = np.sort(rng.choice(len(train.y), 640, replace=False))
    scoring = [(torch.from_numpy(train.x[picked[i:i + 64]]),
                torch.from_numpy(train.y[picked[i:i + 64]])) for i in range(0, 640, 64)]
    result = {"model": str(work), "arch": arch, "target_macs": args.target_macs,
              "finetune_epochs": args.finetune_epochs, "base_test": torch_accuracy(base, test),
              "base_macs": base_macs, "machine": machine(), "git": git_state(), "rows": []}
    print(f"{arch}: test {result['base_test']:.4f}, {base_macs} MACs", flush=True)

    def record(row):
        result["rows"].append(row)
        print(f"{row['method']:>28}: MACs kept {row['macs_kept']:.3f}  test {row['test']:.4f}"
              f"  ({row['seconds']:.0f} s)", flush=True)
        if args.json:
            write_json(args.json, result)

    for importance in filter(None, args.importances.split(",")):
        for mode in filter(None, args.modes.split(",")):
            torch.manual_seed(args.seed)
            t0 = time.perf_counter()
            model, ratio, macs = prune_to(base, importance, mode, args.target_macs, example,
                                          scoring, base_macs)
            cut = torch_accuracy(model, test)
            if args.cross and not result["rows"]:
                record(cross(model, train, test, args, importance, mode, macs / base_macs))
                t1 = time.perf_counter()
                folded = fold_batchnorm(model)
                folded_cut = torch_accuracy(folded, test)
                finetune(folded, train, args.finetune_epochs, args.seed, lr=args.lr)
                record({"method": f"torch-pruning {importance} {mode}, BatchNorm folded",
                        "labels": True, "macs_kept": macs / base_macs,
                        "test_after_cut": folded_cut,
                        "test": torch_accuracy(folded, test),
                        "seconds": round(time.perf_counter() - t1, 1)})
                t0 = time.perf_counter()
            finetune(model, train, args.finetune_epochs, args.seed, lr=args.lr)
            record({"method": f"torch-pruning {importance} {mode}", "labels": True,
                    "ratio": round(ratio, 4), "macs_kept": macs / base_macs,
                    "test_after_cut": cut, "test": torch_accuracy(model, test),
                    "seconds": round(time.perf_counter() - t0, 1)})
    for which in filter(None, args.gpp.split(",")):
        labels = which == "labels"
        row = run_gpp(work / "model.onnx", work / f"gpp_{which}.onnx", args.target_macs,
                      args.finetune_epochs, labels)
        record({"method": f"gpp-onnx prune, {'labels' if labels else 'no labels'}",
                "labels": labels, **row})
    print()
    print(table(["method", "labels", "MACs kept", "test"],
                [[r["method"], "yes" if r["labels"] else "no", f"{r['macs_kept']:.3f}",
                  f"{r['test']:.4f}"] for r in result["rows"]]))


if __name__ == "__main__":
    main()
