"""One process against several under torchrun: held-out accuracy and wall time of the
same gpp-onnx command (same global --batch-size and --seed).

    python tools/bench_ddp.py MODEL --data fashion-mnist [--task push|prune]
        [--epochs 1] [--procs 2] [--cores 2] [--single-threads 1,2] [--limit N]
        [--extra "--target-macs 0.5"]

One-process runs use each of --single-threads torch threads (OMP_NUM_THREADS: the first
is the reference; a second shows how far float rounding alone moves the accuracy, since
thread counts change the order of sums); under torchrun each of the --procs processes
gets cores/procs threads. The table gives each run's held-out accuracy (from the report
beside the output), its wall time (the whole command: loading, scoring, training,
checks) and the ratio to the first run. Runs go one after another; on a shared machine
rerun to see the spread of the times.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(args, out: Path) -> list[str]:
    cmd = ["-q", args.task, args.model, "--data", args.data, "--seed", str(args.seed),
           "--batch-size", str(args.batch_size), "-o", str(out)]
    if args.task == "push":
        cmd += ["--epochs", str(args.epochs)]
    else:
        cmd += ["--finetune-epochs", str(args.epochs), "--no-latency"]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    return cmd + shlex.split(args.extra)


def _accuracy(report: Path, task: str) -> float:
    data = json.loads(report.read_text())
    return data["push"]["accuracy_after"] if task == "push" else data["after"]["accuracy"]


def _run(args, procs: int, threads: int, folder: Path) -> dict:
    out = folder / f"{args.task}-{procs}-{threads}.onnx"
    launcher = ([sys.executable, "-m", "gpp_onnx"] if procs == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
                 "--master_port", str(_port()), "-m", "gpp_onnx"])
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    run = subprocess.run(launcher + _command(args, out), env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if run.returncode != 0:
        sys.exit(f"{procs} process(es) failed:\n{run.stderr[-3000:]}")
    return {"procs": procs, "threads": threads, "seconds": seconds,
            "accuracy": _accuracy(out.with_suffix(".report.json"), args.task)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--task", choices=["push", "prune"], default="push")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--cores", type=int, default=2, help="threads shared by the "
                        "torchrun processes (cores // procs each)")
    parser.add_argument("--single-threads", default="1,2", help="one-process runs with "
                        "these thread counts (the first is the reference)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--extra", default="", help="more options for the command, quoted")
    args = parser.parse_args()
    singles = [int(t) for t in args.single_threads.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [_run(args, 1, t, Path(tmp)) for t in singles]
        rows.append(_run(args, args.procs, max(1, args.cores // args.procs), Path(tmp)))
    print(f"{args.task} {Path(args.model).name} on {args.data}, {args.epochs:g} epoch(s), "
          f"global batch {args.batch_size}, seed {args.seed}")
    print("processes  threads each  held-out acc.  wall s  time ratio")
    for r in rows:
        print(f"{r['procs']:>9}  {r['threads']:>12}  {r['accuracy']:>13.4f}  "
              f"{r['seconds']:>6.1f}  {r['seconds'] / rows[0]['seconds']:>10.2f}")
    for r in rows[1:]:
        print(f"{r['procs']} process(es) x {r['threads']} thread(s) minus the first: "
              f"{100 * (r['accuracy'] - rows[0]['accuracy']):+.2f} accuracy points")


if __name__ == "__main__":
    main()
