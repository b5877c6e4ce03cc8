"""Label-free compression against the same compression with labels, on Fashion-MNIST.

    python tools/nolabel_bench.py --model /tmp/fm/vgg/model.onnx --out /tmp/nolabel-bench \\
        --target-macs 0.25 --finetune-epochs 2 --threads 2

Runs ``gpp_onnx.prune`` on the same model and budget, once per ``--runs`` entry:

* ``labels``: ``--data fashion-mnist`` (the default criterion ``gpp``, cross-entropy
  fine-tuning);
* ``no labels``: the training images alone, written to ``OUT/x_only_N.npz`` (array ``x``,
  no ``y``): the ``fisher`` criterion, the repair to the original's outputs and
  distillation (KL on the logits) as the fine-tuning loss;
* ``labels+kd``: as ``labels`` with ``--distill 1`` (cross-entropy + distillation);
* ``fisher+ce``: labels, the ``fisher`` criterion and cross-entropy (the criterion's share);

(``--limit N``: both on the same N training images, class-stratified; the unlabelled
run's stratification uses the labels only to pick the same images, then drops them),
then measures each written model on the 10k test images (``fashion-mnist:test``) through
onnxruntime: top-1 accuracy and its fidelity to the original (``compare --data``). Prints
one table (plus each run's fidelity after cut / repair / fine-tuning on its held-out
images, from its JSON report) and writes ``OUT/results-<the runs, joined by ->.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gpp_onnx import PruneConfig, pipeline, prune  # noqa: E402
from gpp_onnx.config import DataOptions, with_lr  # noqa: E402
from gpp_onnx.data import select  # noqa: E402
from gpp_onnx.sources import resolve  # noqa: E402

TEST = "fashion-mnist:test"


def x_only(out: Path, limit: int | None, seed: int) -> Path:
    """The Fashion-MNIST training images (the `limit` subset that ``--data fashion-mnist
    --limit`` takes) without their labels, as an uncompressed .npz."""
    path = out / f"x_only_{limit or 'all'}.npz"
    if not path.exists():
        raw = resolve("fashion-mnist")
        _, idx = select(raw, True, limit, seed)
        np.savez(path, x=np.asarray(raw.pixels.array[idx]))
    return path


RUNS = {"labels": (True, "auto", 0.0), "no labels": (False, "auto", 0.0),
        "labels+kd": (True, "auto", 1.0), "fisher+ce": (True, "fisher", 0.0)}


def run(name: str, model: Path, out: Path, data: DataOptions, args) -> dict:
    dst = out / f"{name.replace(' ', '_')}.onnx"
    _, criterion, distill = RUNS[name]
    cfg = PruneConfig(target_macs=args.target_macs, data=data, latency=False, seed=args.seed,
                      criterion=criterion,
                      train=with_lr(replace(PruneConfig().train, epochs=args.finetune_epochs,
                                            distill=distill), args.lr))
    t0 = time.perf_counter()
    res = prune(model, dst, cfg)
    seconds = time.perf_counter() - t0
    acc, _ = pipeline.evaluate(dst, DataOptions(TEST))
    cmp = pipeline.compare(model, dst, repeats=3, data=DataOptions(TEST))
    rep = res.report
    (out_name, test_fid), = cmp.fidelity.items()
    return {"run": name, "criterion": rep["config"]["criterion"], "labels": rep["labels"],
            "macs": rep["ratios"]["macs"], "test_accuracy": acc,
            "test_relative_error": test_fid["relative_error"],
            "test_top1_agreement": test_fid["top1_agreement"],
            "heldout_fidelity": rep["fidelity"], "output": out_name, "seconds": seconds}


def table(rows: list[dict], acc_before: float) -> str:
    head = (f"{'run':<10} {'criterion':<9} {'MACs':>6} {'test acc':>9} {'rel.err':>8} "
            f"{'agree':>7} {'time':>7}")
    lines = [f"original: test accuracy {acc_before:.4f}", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['run']:<10} {r['criterion']:<9} {r['macs']:>6.3f} "
                     f"{r['test_accuracy']:>9.4f} {r['test_relative_error']:>8.4f} "
                     f"{r['test_top1_agreement']:>7.4f} {r['seconds']:>6.0f}s")
    lines.append("held-out fidelity (relative error / top-1 agreement) after "
                 "cut, repair, fine-tune:")
    for r in rows:
        fid, o = r["heldout_fidelity"], r["output"]
        stages = [fid[k][o] if fid.get(k) else None
                  for k in ("after_cut", "after_repair", "after_finetune")]
        cells = ["-" if s is None else f"{s['relative_error']:.3f} / {s['top1_agreement']:.3f}"
                 for s in stages]
        lines.append(f"  {r['run']:<10} " + "   ".join(cells))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--target-macs", type=float, default=0.25)
    p.add_argument("--finetune-epochs", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=None, help="as prune's --lr (default: its "
                   "default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--limit", type=int, help="training images (default: all 60k)")
    p.add_argument("--runs", default="labels,no labels",
                   help=f"comma-separated, of: {', '.join(RUNS)}")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    labelled = DataOptions("fashion-mnist", limit=args.limit)
    acc_before, _ = pipeline.evaluate(args.model, DataOptions(TEST))
    rows = []
    for name in args.runs.split(","):
        data = labelled if RUNS[name][0] else DataOptions(
            str(x_only(args.out, args.limit, args.seed)))
        rows.append(run(name, args.model, args.out, data, args))
    tag = args.runs.replace(" ", "_").replace(",", "-").replace("+", "_")
    (args.out / f"results-{tag}.json").write_text(json.dumps(
        {"model": str(args.model), "target_macs": args.target_macs, "limit": args.limit,
         "finetune_epochs": args.finetune_epochs, "test_accuracy_before": acc_before,
         "runs": rows}, indent=1))
    print(table(rows, acc_before))


if __name__ == "__main__":
    main()
