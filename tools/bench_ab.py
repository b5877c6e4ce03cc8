#!/usr/bin/env python
"""Is this tree's `gpp-onnx prune` faster than another tree's, and how do both compare with
the Torch-Pruning flow? All measured in one run, side by side.

For each model: `gpp-onnx prune M.onnx --ratio R -o out.onnx` (default flags) from the
base tree and from this tree, and the Torch-Pruning flow of bench_speed.py, each a fresh
subprocess timed from start to exit, in alternating order (rotated every repeat) so that
load that comes and goes hits all flows alike. It also says whether the two trees wrote
byte-identical files.

    git archive main | tar -x -C /tmp/base     # the tree to compare against
    python tools/bench_ab.py --base /tmp/base --models resnet50,vgg11_bn
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc  # noqa: E402


def _digest(path: Path) -> str | None:
    if not path.exists():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def run_flow(flow: str, trees: dict, onnx_path: Path, spec: str, args, out: Path) -> dict:
    out.unlink(missing_ok=True)
    if flow == "tp":
        res = bc.run_timed([bc.PYTHON, str(Path(bc.__file__)), "tp", spec, str(out),
                            "--size", str(args.size), "--ratio", str(args.ratio)], 900)
    else:
        # -P: the working folder (this tree) does not shadow PYTHONPATH's tree
        res = bc.run_timed([bc.PYTHON, "-P", "-m", "gpp_onnx", "prune", str(onnx_path), "--ratio",
                            str(args.ratio), "-o", str(out)], 900,
                           env={"PYTHONPATH": str(trees[flow])})
    problem = bc.verify_onnx(out) if res["rc"] == 0 else f"exit {res['rc']}: {res['tail']}"
    return {"seconds": res["seconds"], "ok": problem is None, "problem": problem,
            "digest": _digest(out) if flow != "tp" else None}


def compare(spec: str, args, trees: dict) -> None:
    onnx_path = bc.cached_export(spec, args.size, args.work, False)
    flows = list(trees) + ([] if args.skip_tp else ["tp"])
    runs: dict = {f: [] for f in flows}
    for rep in range(args.repeats):
        for flow in flows[rep % len(flows):] + flows[:rep % len(flows)]:
            r = run_flow(flow, trees, onnx_path, spec, args, args.work / f"ab.{spec}.{flow}.onnx")
            runs[flow].append(r)
            print(f"  run {rep + 1}: {spec} {flow}: {r['seconds']:.2f} s "
                  f"{'ok' if r['ok'] else 'FAILED ' + r['problem']}", flush=True)
    med = {f: bc.median([r["seconds"] for r in rs if r["ok"]]) for f, rs in runs.items()}
    rows = []
    for f in flows:
        secs = [r["seconds"] for r in runs[f] if r["ok"]]
        rows.append([f, f"{len(secs)}/{len(runs[f])}", f"{med[f]:.2f}" if secs else "-",
                     f"{min(secs):.2f}-{max(secs):.2f}" if secs else "-",
                     f"{med[f] / med['tp']:.2f}" if secs and med.get("tp") else "-",
                     f"{med[f] / med['base']:.2f}" if secs and med.get("base") else "-"])
    print(f"\n## {spec} ({args.size}x{args.size}), ratio {args.ratio}, gpp default flags, "
          f"{args.repeats} alternating runs\n")
    print(bc.table(["flow", "ok", "median s", "range s", "ratio to TP", "ratio to base"], rows))
    digests = {r["digest"] for f in trees for r in runs[f] if r["ok"]}
    print(f"\noutput files of base and head byte-identical: {'yes' if len(digests) == 1 else 'NO'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, required=True,
                    help="a gpp-onnx source tree to compare against (e.g. main, exported)")
    ap.add_argument("--models", default="resnet50,vgg11_bn")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--skip-tp", action="store_true")
    ap.add_argument("--work", type=Path, default=bc.DEFAULT_WORK / "speed")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    trees = {"base": args.base.resolve(), "head": bc.ROOT}
    for tree in trees.values():
        bc.byte_compile(tree)
    print(f"# bench_ab\n# {bc.machine()}\n# head: {bc.git_state()}\n# base: {args.base}\n"
          f"# {bc.load_note('at start')}\n")
    for spec in args.models.split(","):
        compare(spec, args, trees)
    print(f"\n# {bc.load_note('at end')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
