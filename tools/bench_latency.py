#!/usr/bin/env python
"""onnxruntime latency of pruned models: are default settings ever slower than the
original, and does `--target-latency f` deliver f?

``defaults``: for each model and setting (``--ratio 0.25/0.5/0.75``, ``--target-macs
0.75/0.5/0.25``) two files: default settings (widths rounded to the runtime's block) and
``--round-to 1`` (free widths, the previous default).

``target``: ``--target-latency F`` (its report gives the MACs ratio m it reached) and
``--target-macs m`` (uniform allocation, default widths): the same MACs, spent the way a
MACs target spends them.

Models are random-weight torchvision classifiers (legacy export, opset 17, input 224),
pruned by ``gpp-onnx prune ... --no-latency`` subprocesses. Then the original, the pruned
files and a second session of the original (A/A control: the noise) are timed in
interleaved rounds with bench_speedup's session options (onnxruntime CPU, batch 1, 2
intra-op threads, spinning off); ratios are medians, pruned / original.

    python tools/bench_latency.py defaults [--models ...] [--settings ratio=0.5,macs=0.25]
    python tools/bench_latency.py target [--models ...] [--target 0.5]
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

MODELS = {"defaults": "mobilenet_v2,efficientnet_b0,regnet_x_400mf,resnet50,mnasnet1_0",
          "target": "mobilenet_v2,efficientnet_b0,regnet_x_400mf,resnet50"}
SETTINGS = "ratio=0.25,ratio=0.5,ratio=0.75,macs=0.75,macs=0.5,macs=0.25"


def prune(orig: Path, tag: str, flags: list[str], timeout: float) -> tuple[Path | None, dict]:
    out = orig.with_name(f"{orig.stem}.{tag}.onnx")
    out.unlink(missing_ok=True)
    res = bc.run_timed([*bc.GPP, "-q", "prune", str(orig), *flags, "--no-latency", "-o",
                        str(out)], timeout=timeout)
    if res["rc"] != 0 or not out.exists():
        return None, {"error": res["tail"].strip().splitlines()[-1:], "seconds": res["seconds"]}
    report = json.loads(out.with_suffix(".report.json").read_text())
    meta = report["plan"]["meta"]
    return out, {"macs": report["ratios"]["macs"], "params": report["ratios"]["params"],
                 "seconds": res["seconds"], "round_to": meta.get("round_to"),
                 "tries": meta.get("latency_tries")}


def timed(orig: Path, variants: dict[str, tuple[Path | None, dict]], args) -> dict:
    """Interleaved latency of the original and each pruned file; info dicts get 'ratio'."""
    paths = {"orig": orig, **{k: p for k, (p, _) in variants.items() if p is not None}}
    lat = bs.latencies(paths, args.size, args.threads, args.runs, args.warmup)
    t0 = lat["orig"]["median"]
    row = {k: info for k, (_, info) in variants.items()}
    for key, info in row.items():
        if key in lat:
            info["ratio"] = lat[key]["median"] / t0
    row["aa"] = lat["orig_again"]["median"] / t0
    return row


def bench_defaults(spec: str, setting: str, args) -> dict:
    orig = bc.cached_export(spec, args.size, args.work)
    kind, value = setting.split("=")
    flags = [{"ratio": "--ratio", "macs": "--target-macs"}[kind], value]
    tag = setting.replace("=", "")
    variants = {"default": prune(orig, f"{tag}.default", flags, args.timeout),
                "free": prune(orig, f"{tag}.free", [*flags, "--round-to", "1"], args.timeout)}
    return {"model": spec, "setting": setting, **timed(orig, variants, args)}


def bench_target(spec: str, args) -> dict:
    orig = bc.cached_export(spec, args.size, args.work)
    variants = {"latency": prune(orig, f"lat{args.target}",
                                 ["--target-latency", str(args.target)], args.timeout)}
    if variants["latency"][0] is not None:
        macs = f"{variants['latency'][1]['macs']:.4f}"
        variants["macs"] = prune(orig, f"lat{args.target}.macs", ["--target-macs", macs],
                                 args.timeout)
    return {"model": spec, **timed(orig, variants, args)}


def cell(info: dict, key: str, spec: str = ".3f") -> str:
    return f"{info[key]:{spec}}" if info.get(key) is not None else "-"


def print_defaults(rows: list[dict]) -> None:
    body = [[r["model"], r["setting"], cell(r["default"], "macs"), cell(r["default"], "ratio"),
             "yes" if r["default"].get("ratio", 9) < 1 else "NO", cell(r["free"], "macs"),
             cell(r["free"], "ratio"), f"{r['aa']:.3f}"] for r in rows]
    print(bc.table(["model", "setting", "MACs default", "latency default", "faster",
                    "MACs free", "latency free", "A/A"], body, "llrrlrrr"))
    slower = {k: sum(1 for r in rows if r[k].get("ratio", 9) >= 1) for k in ("default", "free")}
    print(f"\nslower than the original: default settings {slower['default']} of {len(rows)} "
          f"runs; free widths (--round-to 1) {slower['free']} of {len(rows)}")


def print_target(rows: list[dict]) -> None:
    body = [[r["model"], cell(r["latency"], "ratio"), cell(r["latency"], "macs"),
             cell(r["latency"], "params"), str(len(r["latency"].get("tries") or [])),
             cell(r["latency"], "seconds", ".1f"), cell(r.get("macs", {}), "ratio"),
             f"{r['aa']:.3f}"] for r in rows]
    print(bc.table(["model", "latency ratio", "MACs", "params", "cuts timed", "prune s",
                    "--target-macs same MACs: latency", "A/A"], body, "lrrrrrrr"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["defaults", "target"])
    ap.add_argument("--models")
    ap.add_argument("--settings", default=SETTINGS, help="defaults: kind=value,...")
    ap.add_argument("--target", type=float, default=0.5, help="target: the latency fraction")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--work", type=Path, default=bc.DEFAULT_WORK / "latency")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    date = datetime.datetime.now().isoformat(timespec="seconds")
    print(f"# bench_latency {args.mode}  {date}\n# {bc.machine()}\n# {bc.git_state()}\n"
          f"# {bc.load_note('at start')}\n# onnxruntime CPU, batch 1, {args.threads} threads, "
          f"median of {args.runs} interleaved runs\n", flush=True)
    jobs = [(spec, s) for spec in (args.models or MODELS[args.mode]).split(",")
            for s in (args.settings.split(",") if args.mode == "defaults" else [None])]
    rows = []
    for spec, setting in jobs:
        rows.append(bench_defaults(spec, setting, args) if setting else bench_target(spec, args))
        print({k: v for k, v in rows[-1].items()}, flush=True)
        if args.json:
            bc.write_json(args.json, {"date": date, "machine": bc.machine(),
                                      "git": bc.git_state(), "rows": rows})
    print(f"\n# {bc.load_note('at end')}\n")
    (print_defaults if args.mode == "defaults" else print_target)(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
