"""Cost of the repair after the cut: whole `prune` time per --repair mode.

    python tools/bench_repair.py [--models resnet18,efficientnet_b0] [--size 64]
                                 [--images 320] [--repairs bias,lsq]

Exports each torchvision model (random weights, legacy exporter), writes a random
labelled .npz (10 classes, --images images), and times ``gpp_onnx.prune`` at ratio 0.5
with the l1 criterion for every repair mode, in one process, one after another; the
table gives each mode's time and its ratio to the first mode's.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench_common as bc  # noqa: E402
import gpp_onnx  # noqa: E402
from gpp_onnx import PruneConfig  # noqa: E402
from gpp_onnx.config import DataOptions  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,efficientnet_b0")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--repairs", default="bias,lsq")
    args = parser.parse_args()
    repairs = args.repairs.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rng = np.random.default_rng(0)
        x = rng.random((args.images, 3, args.size, args.size), dtype=np.float32)
        np.savez(folder / "data.npz", x=x, y=np.arange(args.images) % 10)
        data = DataOptions(str(folder / "data.npz"), val_split=0.0,
                           per_class=-(-args.images // 10))
        for name in args.models.split(","):
            src = bc.export(name, folder / f"{name}.onnx", args.size)
            times = []
            for mode in repairs:
                t0 = time.perf_counter()
                gpp_onnx.prune(src, folder / f"{name}.{mode}.onnx",
                               PruneConfig(ratio=0.5, criterion="l1", repair=mode,
                                           latency=False, data=data))
                times.append(time.perf_counter() - t0)
            rows.append((name, times))
    print(f"# {bc.machine()}")
    print(f"# {args.images} images at {args.size} px, ratio 0.5, criterion l1")
    print(f"{'model':<18}" + "".join(f"{m + ' s':>10}" for m in repairs)
          + "".join(f"{m + '/' + repairs[0]:>12}" for m in repairs[1:]))
    for name, times in rows:
        print(f"{name:<18}" + "".join(f"{t:>10.1f}" for t in times)
              + "".join(f"{t / times[0]:>12.1f}" for t in times[1:]))


if __name__ == "__main__":
    main()
