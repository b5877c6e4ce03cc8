#!/usr/bin/env python
"""Does `gpp-onnx prune` with default settings ever write a model slower than its original?

For each model (random-weight torchvision classifiers, legacy export, opset 17, input 224)
and each setting (``--ratio 0.25/0.5/0.75``, ``--target-macs 0.75/0.5/0.25``):

* default: ``gpp-onnx prune M SETTING --no-latency`` (widths rounded to the runtime's
  block, ``--round-to`` left out);
* free widths: the same with ``--round-to 1`` (the previous default).

Then, in this one process, the original, both pruned files and a second session of the
original (A/A control, the noise) are timed in interleaved rounds with the session options
of ``bench_speedup.py`` (onnxruntime CPU, batch 1, 2 intra-op threads, spinning off); the
table shows median latency ratios pruned/original and the MACs ratios.

    python tools/bench_latency_defaults.py [--models mobilenet_v2,...] [--runs 30]
                                           [--settings ratio=0.5,macs=0.25] [--json out.json]
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

DEFAULT_MODELS = "mobilenet_v2,efficientnet_b0,regnet_x_400mf,resnet50,mnasnet1_0"
DEFAULT_SETTINGS = "ratio=0.25,ratio=0.5,ratio=0.75,macs=0.75,macs=0.5,macs=0.25"
VARIANTS = {"default": [], "free": ["--round-to", "1"]}


def flags(setting: str) -> list[str]:
    kind, value = setting.split("=")
    return [{"ratio": "--ratio", "macs": "--target-macs"}[kind], value]


def prune(orig: Path, setting: str, variant: str, timeout: float) -> tuple[Path | None, dict]:
    out = orig.with_name(f"{orig.stem}.{setting.replace('=', '')}.{variant}.onnx")
    out.unlink(missing_ok=True)
    res = bc.run_timed([*bc.GPP, "-q", "prune", str(orig), *flags(setting), "--no-latency",
                        *VARIANTS[variant], "-o", str(out)], timeout=timeout)
    if res["rc"] != 0 or not out.exists():
        return None, {"error": res["tail"].strip().splitlines()[-1:]}
    report = json.loads(out.with_suffix(".report.json").read_text())
    return out, {"macs": report["ratios"]["macs"], "round_to": report["plan"]["meta"]["round_to"]}


def bench(spec: str, setting: str, args) -> dict:
    orig = bc.cached_export(spec, args.size, args.work)
    row: dict = {"model": spec, "setting": setting}
    paths = {"orig": orig}
    for variant in VARIANTS:
        path, info = prune(orig, setting, variant, args.timeout)
        row[variant] = info
        if path is not None:
            paths[variant] = path
    lat = bs.latencies(paths, args.size, args.threads, args.runs, args.warmup)
    t0 = lat["orig"]["median"]
    row["aa"] = lat["orig_again"]["median"] / t0
    for variant in VARIANTS:
        if variant in lat:
            row[variant]["latency"] = lat[variant]["median"] / t0
    return row


def print_table(rows: list[dict]) -> None:
    def cell(info: dict, key: str) -> str:
        return "-" if key not in info else f"{info[key]:.3f}"

    body = [[r["model"], r["setting"], cell(r["default"], "macs"), cell(r["default"], "latency"),
             "yes" if r["default"].get("latency", 9) < 1 else "NO",
             cell(r["free"], "macs"), cell(r["free"], "latency"), f"{r['aa']:.3f}"]
            for r in rows]
    print(bc.table(["model", "setting", "MACs default", "latency default", "faster",
                    "MACs free", "latency free", "A/A"], body, "llrrlrrr"))
    slower = [r for r in rows if r["default"].get("latency", 9) >= 1]
    print(f"\ndefault settings slower than the original: {len(slower)} of {len(rows)} runs; "
          f"free widths (--round-to 1): "
          f"{sum(1 for r in rows if r['free'].get('latency', 9) >= 1)} of {len(rows)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--models", default=DEFAULT_MODELS)
    ap.add_argument("--settings", default=DEFAULT_SETTINGS)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--work", type=Path, default=bc.DEFAULT_WORK / "latency-defaults")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    date = datetime.datetime.now().isoformat(timespec="seconds")
    print(f"# bench_latency_defaults  {date}\n# {bc.machine()}\n# {bc.git_state()}\n"
          f"# {bc.load_note('at start')}\n# onnxruntime CPU, batch 1, {args.threads} threads, "
          f"median of {args.runs} interleaved runs\n", flush=True)
    rows = []
    for spec in args.models.split(","):
        for setting in args.settings.split(","):
            rows.append(bench(spec, setting, args))
            r = rows[-1]
            print(f"{spec} {setting}: default {r['default']} free {r['free']} "
                  f"A/A {r['aa']:.3f}", flush=True)
            if args.json:
                bc.write_json(args.json, {"date": date, "machine": bc.machine(),
                                          "git": bc.git_state(), "rows": rows})
    print(f"\n# {bc.load_note('at end')}\n")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
