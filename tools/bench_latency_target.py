#!/usr/bin/env python
"""Does `--target-latency f` deliver f, and what does `--target-macs` give at the same MACs?

For each model (random-weight torchvision classifiers, legacy export, opset 17, input 224):

* latency: ``gpp-onnx prune M --target-latency F --no-latency`` (its report gives the MACs
  ratio m it reached);
* macs: ``gpp-onnx prune M --target-macs m --no-latency`` (uniform allocation, default
  widths): the same MACs, spent the way a MACs target spends them.

Then the original, both files and a second session of the original (A/A, the noise) are
timed in interleaved rounds with bench_speedup's session options (onnxruntime CPU, batch
1, 2 threads, spinning off). Ratios are medians, pruned / original.

    python tools/bench_latency_target.py [--models resnet50,...] [--target 0.5] [--runs 40]
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc  # noqa: E402
import bench_speedup as bs  # noqa: E402

DEFAULT_MODELS = "mobilenet_v2,efficientnet_b0,regnet_x_400mf,resnet50"


def prune(orig: Path, tag: str, flags: list[str], timeout: float) -> tuple[Path | None, dict]:
    out = orig.with_name(f"{orig.stem}.{tag}.onnx")
    out.unlink(missing_ok=True)
    res = bc.run_timed([*bc.GPP, "-q", "prune", str(orig), *flags, "--no-latency", "-o",
                        str(out)], timeout=timeout)
    if res["rc"] != 0 or not out.exists():
        return None, {"error": res["tail"].strip().splitlines()[-1:], "seconds": res["seconds"]}
    report = json.loads(out.with_suffix(".report.json").read_text())
    return out, {"macs": report["ratios"]["macs"], "params": report["ratios"]["params"],
                 "seconds": res["seconds"], "tries": report["plan"]["meta"].get("latency_tries")}


def bench(spec: str, args) -> dict:
    orig = bc.cached_export(spec, args.size, args.work)
    paths, row = {"orig": orig}, {"model": spec}
    path, row["latency"] = prune(orig, f"lat{args.target}", ["--target-latency",
                                                              str(args.target)], args.timeout)
    if path is not None:
        paths["latency"] = path
        path, row["macs"] = prune(orig, f"lat{args.target}.macs",
                                  ["--target-macs", f"{row['latency']['macs']:.4f}"], args.timeout)
        if path is not None:
            paths["macs"] = path
    lat = bs.latencies(paths, args.size, args.threads, args.runs, args.warmup)
    t0 = lat["orig"]["median"]
    row["aa"] = lat["orig_again"]["median"] / t0
    for key in ("latency", "macs"):
        if key in lat:
            row[key]["ratio"] = lat[key]["median"] / t0
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--models", default=DEFAULT_MODELS)
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--work", type=Path, default=bc.DEFAULT_WORK / "latency-defaults")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    date = datetime.datetime.now().isoformat(timespec="seconds")
    print(f"# bench_latency_target  {date}\n# {bc.machine()}\n# {bc.git_state()}\n"
          f"# {bc.load_note('at start')}\n# target {args.target}; onnxruntime CPU, batch 1, "
          f"{args.threads} threads, median of {args.runs} interleaved runs\n", flush=True)
    rows = []
    for spec in args.models.split(","):
        rows.append(bench(spec, args))
        print(f"{spec}: {rows[-1]}", flush=True)
        if args.json:
            bc.write_json(args.json, {"date": date, "machine": bc.machine(), "rows": rows})
    print(f"\n# {bc.load_note('at end')}\n")

    def cell(info, key, spec=".3f"):
        return f"{info[key]:{spec}}" if key in info and info[key] is not None else "-"

    body = [[r["model"], cell(r["latency"], "ratio"), cell(r["latency"], "macs"),
             cell(r["latency"], "params"), str(len(r["latency"].get("tries") or [])),
             cell(r["latency"], "seconds", ".1f"), cell(r["macs"] if "macs" in r else {}, "ratio"),
             f"{r['aa']:.3f}"] for r in rows]
    print(bc.table(["model", "latency ratio", "MACs", "params", "cuts timed", "prune s",
                    "--target-macs same MACs: latency", "A/A"], body, "lrrrrrrr"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
