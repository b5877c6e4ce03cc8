#!/usr/bin/env python
"""Does gpp-onnx's MACs reduction turn into onnxruntime speed-up, as well as Torch-Pruning's?

For each model (random-weight torchvision classifiers, legacy ONNX export, opset 17), at
the same channel ratio (default 0.5):

* gpp: ``gpp-onnx prune model.onnx --ratio 0.5 --no-latency -o model.gpp.onnx``;
* TP: ``tp.pruner.MagnitudePruner`` (L1 magnitude importance, ``pruning_ratio=0.5``,
  ``ignored_layers=[final classifier]``, ``round_to=None``) on the torch model, exported
  the same way; a model Torch-Pruning cannot handle is recorded as "TP failed: reason".

Then in this one process: onnxruntime CPU sessions with identical options (batch 1,
``intra_op_num_threads=2``, ``inter_op_num_threads=1``, sequential, all graph
optimisations, intra-op spinning off: see session_options) for original, gpp-pruned and
TP-pruned; warm-up, then rounds that run each model once (order rotated every round); the
median of ``--runs`` (>= 30) per model.
MACs (Conv / Gemm / MatMul, batch 1) of both pruned models come from
``gpp_onnx.pipeline.compare(original, pruned)``. A second session of the original model
runs in the same rounds as an A/A control: its ratio to the first shows the noise.
"same ORT graph" compares the graphs onnxruntime runs after its optimisations (op types
and weight shapes) of the gpp and TP files.

Columns: MACs ratio = pruned/original; speed-up = t_orig / t_pruned; efficiency =
speed-up / (1 / MACs ratio) (1.0 = latency fell as much as MACs); "gpp >= TP" compares
the two speed-ups; "tie (same graph)" when onnxruntime runs the same graph for both.

    python tools/bench_speedup.py [--models resnet18,vgg11_bn@112,...] [--size 224]
                                  [--runs 40] [--spin] [--json out.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc  # noqa: E402

DEFAULT_MODELS = ("resnet18,resnet50,vgg11_bn,mobilenet_v2,shufflenet_v2_x1_0,densenet121,"
                  "googlenet,efficientnet_b0,regnet_x_400mf")


SPIN = False  # set by --spin


def session(path: Path, threads: int):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), session_options(threads),
                                providers=["CPUExecutionProvider"])


def session_options(threads: int):
    """The same options for every session. Intra-op spinning is off: with several sessions
    interleaved on a 2-core machine, the idle workers of the session that just ran keep
    spinning and slow the next one down (A/A ratios of 1.1-1.2 and a systematic bias of
    up to 1.3 between two identical graphs here; with spinning off both are ~1.00)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if SPIN else "0")
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return opts


def latencies(paths: dict[str, Path], size: int, threads: int, runs: int,
              warmup: int) -> dict[str, dict]:
    """Interleaved batch-1 latency of every model; median, quartiles (seconds).
    Key "orig_again" is a second session of the original model: the A/A control."""
    import numpy as np

    sessions = {k: session(p, threads) for k, p in paths.items()}
    if "orig" in paths:
        sessions["orig_again"] = session(paths["orig"], threads)
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    for k, s in sessions.items():
        for _ in range(warmup):
            s.run(None, feeds[k])
    keys = list(sessions)
    times: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(runs):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            t0 = time.perf_counter()
            sessions[k].run(None, feeds[k])
            times[k].append(time.perf_counter() - t0)
    out = {}
    for k, t in times.items():
        q = statistics.quantiles(t, n=4)
        out[k] = {"median": statistics.median(t), "q1": q[0], "q3": q[2], "min": min(t),
                  "runs": len(t)}
    return out


def macs_ratio(orig: Path, pruned: Path) -> tuple[float, float]:
    """(MACs ratio, params ratio) pruned/original via gpp_onnx.pipeline.compare."""
    from gpp_onnx import pipeline

    cmp = pipeline.compare(str(orig), str(pruned), repeats=1)
    return cmp.b.macs / max(cmp.a.macs, 1), cmp.b.params / max(cmp.a.params, 1)


def weight_shapes(path: Path) -> list:
    """Sorted shapes of the float initializers of rank >= 2 (the conv / linear weights)."""
    import onnx

    model = onnx.load(str(path))
    return sorted(tuple(t.dims) for t in model.graph.initializer
                  if len(t.dims) >= 2 and t.data_type == onnx.TensorProto.FLOAT)


def ort_graph(path: Path, threads: int) -> Counter:
    """The graph onnxruntime actually runs (after its optimisations, as saved by
    ``optimized_model_filepath``): a multiset of (op type, domain, initializer shapes)."""
    import onnx
    import onnxruntime as ort

    out = path.with_name(path.stem + ".ort-optimized.onnx")
    opts = session_options(threads)
    opts.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    model = onnx.load(str(out))
    init = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return Counter((n.op_type, n.domain, tuple(init[i] for i in n.input if i in init))
                   for n in model.graph.node)


def short_reason(res: dict) -> str:
    """The exception line, plus the innermost traceback frame ("in file:line func")."""
    import re

    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', res["stderr"])
    where = f" (in {Path(frames[-1][0]).name}:{frames[-1][1]} {frames[-1][2]})" if frames else ""
    info = bc.last_json_line(res["stdout"])
    if info and "error" in info:
        return info["error"] + where
    lines = [ln for ln in res["tail"].splitlines() if ln.strip()]
    return (lines[-1] if lines else f"exit {res['rc']}")[:300] + where


def bench_model(spec: str, size: int, args) -> dict:
    name = spec
    row: dict = {"model": name, "size": size}
    work = args.work
    t = time.perf_counter()
    try:
        orig = bc.cached_export(name, size, work, args.fresh)
    except Exception as err:  # noqa: BLE001
        row["error"] = f"export failed: {str(err).strip().splitlines()[-1][:300]}"
        return row
    row["export_s"] = time.perf_counter() - t
    stem = orig.with_suffix("")
    paths = {"orig": orig}

    gpp_out = Path(f"{stem}.gpp.onnx")
    gpp_out.unlink(missing_ok=True)
    res = bc.run_timed([*bc.GPP, "prune", str(orig), "--ratio", str(args.ratio), "--no-latency",
                        "-o", str(gpp_out)], timeout=args.timeout)
    row["gpp_prune_s"] = res["seconds"]
    if res["rc"] == 0 and gpp_out.exists():
        paths["gpp"] = gpp_out
        report = json.loads(Path(f"{stem}.gpp.report.json").read_text())
        row["gpp_report_macs_ratio"] = report["ratios"]["macs"]
    else:
        row["gpp_error"] = f"gpp failed (exit {res['rc']}): {short_reason(res)}"
        row["gpp_tail"] = res["tail"]

    tp_out = Path(f"{stem}.tp.onnx")
    tp_out.unlink(missing_ok=True)
    if not args.skip_tp:
        res = bc.run_timed([bc.PYTHON, str(Path(bc.__file__)), "tp", name, str(tp_out),
                            "--size", str(size), "--ratio", str(args.ratio)],
                           timeout=args.timeout)
        row["tp_prune_s"] = res["seconds"]
        if res["rc"] == 0 and tp_out.exists():
            paths["tp"] = tp_out
        else:
            row["tp_error"] = f"TP failed: {short_reason(res)}"
            row["tp_tail"] = res["tail"]

    for key in ("gpp", "tp"):
        if key in paths:
            try:
                row[f"macs_{key}"], row[f"params_{key}"] = macs_ratio(orig, paths[key])
            except Exception as err:  # noqa: BLE001
                row[f"{key}_compare_error"] = f"compare failed: {err}"
    if "gpp" in paths and "tp" in paths:
        row["same_widths"] = weight_shapes(paths["gpp"]) == weight_shapes(paths["tp"])
        try:
            row["same_ort_graph"] = (ort_graph(paths["gpp"], args.threads)
                                     == ort_graph(paths["tp"], args.threads))
        except Exception as err:  # noqa: BLE001 - information only
            row["ort_graph_error"] = f"optimized-graph comparison failed: {err}"
    try:
        lat = latencies(paths, size, args.threads, args.runs, args.warmup)
    except Exception as err:  # noqa: BLE001
        row["latency_error"] = f"latency failed: {str(err).splitlines()[0][:300]}"
        return row
    row["latency"] = lat
    t0 = lat["orig"]["median"]
    row["aa"] = lat["orig_again"]["median"] / t0
    for key in ("gpp", "tp"):
        if key in lat:
            row[f"speedup_{key}"] = t0 / lat[key]["median"]
            if f"macs_{key}" in row:
                row[f"efficiency_{key}"] = row[f"speedup_{key}"] * row[f"macs_{key}"]
    return row


def fmt(v, spec=".2f", suffix=""):
    return "-" if v is None else f"{v:{spec}}{suffix}"


def print_table(rows: list[dict]) -> None:
    headers = ["model", "size", "MACs gpp", "MACs TP", "speed-up gpp", "speed-up TP",
               "eff. gpp", "eff. TP", "gpp/TP", "gpp >= TP", "same widths",
               "same ORT graph", "A/A",
               "prune s gpp/TP"]
    body = []
    for r in rows:
        sg, st = r.get("speedup_gpp"), r.get("speedup_tp")
        verdict = "-" if sg is None or st is None else ("yes" if sg >= st else "no")
        if r.get("same_ort_graph") and sg and st:
            verdict = "tie (same graph)"  # onnxruntime runs the very same ops on both
        elif (r.get("same_widths") and sg and st and r.get("aa")
                and abs(math.log(sg / st)) <= abs(math.log(r["aa"])) + 0.03):
            verdict = "tie"  # same architecture, difference within the A/A drift + 3%
        if st is None and sg is not None and "tp_error" in r:
            verdict = "yes (TP failed)"
        prune_ratio = (r["gpp_prune_s"] / r["tp_prune_s"]
                       if "tp_prune_s" in r and "gpp_prune_s" in r
                       and "gpp_error" not in r and "tp_error" not in r else None)
        body.append([r["model"], r["size"], fmt(r.get("macs_gpp"), ".3f"),
                     fmt(r.get("macs_tp"), ".3f"), fmt(sg, ".2f", "x"), fmt(st, ".2f", "x"),
                     fmt(r.get("efficiency_gpp")), fmt(r.get("efficiency_tp")),
                     fmt(sg / st if sg and st else None), verdict,
                     {True: "yes", False: "no"}.get(r.get("same_widths"), "-"),
                     {True: "yes", False: "no"}.get(r.get("same_ort_graph"), "-"),
                     fmt(r.get("aa"), ".3f"), fmt(prune_ratio)])
    print(bc.table(headers, body, "lr" + "r" * 7 + "lllrr"))
    print("\nA/A = t(second session of the original) / t(original), measured in the same "
          "interleaved rounds: how far two identical models drift apart here (noise).\n"
          "same widths = gpp and TP files have the same multiset of weight shapes.\n"
          "same ORT graph = after onnxruntime's graph optimisations both files hold the same ops "
          "with the same weight shapes.\n"
          "gpp >= TP: 'tie (same graph)' when the ORT graphs are the same (any measured "
          "difference is noise); 'tie' = same widths and |log(gpp/TP)| <= |log(A/A)| + 0.03.")
    notes = []
    for r in rows:
        for key in ("error", "gpp_error", "tp_error", "gpp_compare_error", "tp_compare_error",
                    "latency_error", "ort_graph_error"):
            if key in r:
                notes.append(f"{r['model']}: {r[key]}")
    if notes:
        print("\n" + "\n".join(notes))


def parse_models(text: str, size: int) -> list[tuple[str, int]]:
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, s = item.partition("@")
        out.append((name, int(s) if s else size))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--models", default=DEFAULT_MODELS,
                    help="comma-separated torchvision names; name@side sets one model's "
                         "input side")
    ap.add_argument("--size", type=int, default=224, help="input side (default 224)")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--runs", type=int, default=40, help="timed runs per model (>= 30)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    ap.add_argument("--spin", action="store_true",
                    help="leave onnxruntime's intra-op spinning on (its default; biases "
                         "interleaved timings of several sessions, see session_options)")
    ap.add_argument("--skip-tp", action="store_true")
    ap.add_argument("--timeout", type=float, default=900, help="per prune subprocess")
    ap.add_argument("--work", type=Path, default=bc.DEFAULT_WORK / "speedup")
    ap.add_argument("--fresh", action="store_true", help="re-export cached ONNX files")
    ap.add_argument("--json", type=Path, help="save all measurements here")
    args = ap.parse_args(argv)
    if args.runs < 30:
        ap.error("--runs must be at least 30")
    global SPIN
    SPIN = args.spin
    args.work.mkdir(parents=True, exist_ok=True)
    date = datetime.datetime.now().isoformat(timespec="seconds")
    print(f"# bench_speedup  {date}\n# {bc.machine()}\n# {bc.git_state()}\n# {bc.load_note('at start')}\n# ratio {args.ratio}, onnxruntime CPU, "
          f"batch 1, intra_op_num_threads={args.threads}, intra-op spinning "
          f"{'on' if args.spin else 'off'}, median of {args.runs} interleaved "
          f"runs after {args.warmup} warm-up runs\n", flush=True)
    rows = []
    for name, size in parse_models(args.models, args.size):
        t0 = time.perf_counter()
        row = bench_model(name, size, args)
        rows.append(row)
        brief = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                 if k not in ("latency", "gpp_tail", "tp_tail")}
        print(f"[{time.perf_counter() - t0:.0f} s; {bc.load_note('after')}] {brief}",
              flush=True)
        if args.json:  # keep partial results of a long run
            bc.write_json(args.json, {"date": date, "machine": bc.machine(),
                                      "git": bc.git_state(),
                                      "args": vars(args), "rows": rows})
    print(f"\n# {bc.load_note('at end')}\n")
    print_table(rows)
    if args.json:
        print(f"\nsaved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
