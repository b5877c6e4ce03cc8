"""Ablation of the gpp schedule on a Fashion-MNIST net, at one total training budget.

    python tools/bench_gpp.py --model /tmp/fm/vgg/model.onnx --out /tmp/gpp-bench/vgg \\
        --removed 0.5,0.75,0.9 --variants prune,global,push,gpp --budget 2

Variants (every one spends ``--budget`` training epochs in all):

* ``prune``:  ``gpp-onnx prune --target-macs F --finetune-epochs B`` (uniform widths);
* ``global``: the same with ``--allocation global``;
* ``push``:   ``gpp-onnx gpp --rounds 1 --allocation global`` (push, cut, fine-tune);
* ``gpp``:    ``gpp-onnx gpp --allocation global`` (the default rounds);
* ``gpp:K:P[:S]`` / ``push:P[:S]``: rounds K, push share P and split S (the settings
  search).

The held-out split is the one ``tools/fmnist_bench.py train`` kept out of training (5000
images, seed 0), so "val" is validation data; "test" is the 10k test file, evaluated once
per written model. Every run's row is appended to ``OUT/results.json`` as it finishes;
rerunning skips the runs already there, so an interrupted ablation continues.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VAL_SPLIT = str(5000 / 60000)


def command(variant: str, model: Path, out: Path, keep: float, budget: float,
            push_args: list[str] = ()) -> list[str]:
    common = [str(model), "-o", str(out), "--data", "fashion-mnist", "--val-split", VAL_SPLIT,
              "--target-macs", f"{keep:g}", "--no-latency"]
    name, *args = variant.split(":")
    if name in ("prune", "global"):
        extra = ["--allocation", "global"] if name == "global" else []
        return ["-q", "prune", *common, "--finetune-epochs", f"{budget:g}", *extra]
    if name == "push":
        args = ["1", *args]
    extra = []
    for flag, value in zip(("--rounds", "--push-share", "--split"), args):
        extra += [flag, value]
    return ["-q", "gpp", *common, "--budget-epochs", f"{budget:g}", "--allocation", "global", *extra,
            *push_args]


def run_one(variant: str, model: Path, folder: Path, removed: float, budget: float,
            push_args: list[str] = (), threads: int = 1) -> dict:
    from gpp_onnx.config import DataOptions
    from gpp_onnx.pipeline import evaluate

    out = folder / f"{variant.replace(':', '_')}-{removed:g}.onnx"
    args = command(variant, model, out, round(1 - removed, 6), budget, push_args)
    shutil.rmtree(out.with_name(out.name + ".gpp-work"), ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "gpp_onnx", *args], capture_output=True,
                          text=True, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"variant": variant, "removed": removed, "error": proc.stderr.strip()[-300:]}
    rep = json.loads(out.with_suffix(".report.json").read_text())
    test, _ = evaluate(out, DataOptions("fashion-mnist:test"))
    rows = rep.get("rounds", [])
    return {"variant": variant, "removed": removed, "macs": rep["ratios"]["macs"],
            "val": rep["after"]["accuracy"], "test": test, "seconds": round(seconds, 1),
            "offdiag_after_push": [r.get("offdiag_after_push") for r in rows],
            "epochs": rep.get("epochs_used", budget)}


def table(rows: list[dict]) -> str:
    lines = [f"{'variant':<12}{'removed':>8}{'MACs kept':>10}{'val':>8}{'test':>8}"
             f"{'S_w off-diag. after push':>26}{'s':>7}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['variant']:<12}{r['removed']:>8g}  error: {r['error']}")
            continue
        off = ",".join(f"{v:.2f}" for v in r["offdiag_after_push"] if v is not None) or "-"
        lines.append(f"{r['variant']:<12}{r['removed']:>8g}{r['macs']:>10.3f}{r['val']:>8.4f}"
                     f"{r['test']:>8.4f}{off:>26}{r['seconds']:>7.0f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--removed", default="0.5,0.75,0.9", help="MACs fractions removed")
    p.add_argument("--variants", default="prune,global,push,gpp")
    p.add_argument("--budget", type=float, default=2.0, help="training epochs per run")
    p.add_argument("--push-args", default="", help="extra options of the push/gpp variants, "
                   "e.g. '--cov 3'")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (runs are "
                   "sequential; one thread keeps a shared machine's timings stable)")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    done = {(r["variant"], r["removed"]) for r in rows if "error" not in r}
    for removed in (float(v) for v in args.removed.split(",")):
        for variant in args.variants.split(","):
            if (variant, removed) in done:
                continue
            rows = [r for r in rows if (r["variant"], r["removed"]) != (variant, removed)]
            rows.append(run_one(variant, args.model, args.out, removed, args.budget,
                                args.push_args.split(), args.threads))
            path.write_text(json.dumps(rows, indent=1))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
