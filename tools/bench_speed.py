#!/usr/bin/env python
"""How long does `gpp-onnx prune` take, against Torch-Pruning, and as the graph grows?

Three tables, all measured in this one run (machines are noisy: compare the ratios):

1. resnet50, ratio 0.5, each flow a fresh subprocess, wall time from start to a saved file
   that passes the ONNX checker (checked after the process exits, outside the timing):
   * ``gpp-onnx prune resnet50.onnx --ratio 0.5 -o out.onnx`` (the ONNX file is exported
     beforehand; gpp's default measures onnxruntime latency) and the same with
     ``--no-latency``;
   * Torch-Pruning: ``import torch, torch_pruning``, build torchvision resnet50,
     ``tp.pruner.MagnitudePruner`` (L1 magnitude, ``pruning_ratio=0.5``,
     ``ignored_layers=[model.fc]``), prune, export with the legacy exporter.
   Flows alternate (order rotated every repeat); medians and gpp/TP ratios are reported.
2. Scaling: ``gpp-onnx prune`` on resnet50 and on a ~10x deeper torchvision ResNet
   (Bottleneck blocks [30,40,60,30] instead of [3,4,6,3]; same widths, so nodes, params and
   MACs all grow ~10x), at a smaller input side so the big one stays under two minutes.
3. Where gpp's time goes: the pipeline stages of one in-process run of each model
   (tools/_bench_common.py wraps gpp_onnx's functions by name; gpp_onnx is not modified).

    python tools/bench_speed.py [--repeats 3] [--skip-tp] [--no-latency] [--skip-scale]
    python tools/bench_speed.py --models resnet50,vgg11_bn --skip-scale   # table 1 per model
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc  # noqa: E402

BASE_BLOCKS = "3,4,6,3"  # resnet50


def gpp_cmd(model: Path, out: Path, ratio: float, no_latency: bool) -> list[str]:
    return [*bc.GPP, "prune", str(model), "--ratio", str(ratio), "-o", str(out)] + (
        ["--no-latency"] if no_latency else [])


def timed_flow(kind: str, model_onnx: Path, spec: str, size: int, out: Path, ratio: float,
               no_latency: bool = False, timeout: float = 900) -> dict:
    """One run of one flow as a subprocess; the output file is checked afterwards."""
    out.unlink(missing_ok=True)
    if kind == "gpp":
        res = bc.run_timed(gpp_cmd(model_onnx, out, ratio, no_latency), timeout)
    else:
        res = bc.run_timed([bc.PYTHON, str(Path(bc.__file__)), "tp", spec, str(out),
                            "--size", str(size), "--ratio", str(ratio)], timeout)
    problem = bc.verify_onnx(out) if res["rc"] == 0 else f"exit {res['rc']}"
    info = bc.last_json_line(res["stdout"]) if kind == "tp" else None
    return {"seconds": res["seconds"], "ok": problem is None, "problem": problem,
            "tail": res["tail"] if problem else "", "stages": (info or {}).get("stages")}


def node_count(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def fmt_s(values: list[float]) -> str:
    return f"{bc.median(values):.2f}" if values else "-"


LABEL = {False: "gpp-onnx prune (default: measures latency)",
         True: "gpp-onnx prune --no-latency"}


def compare_with_tp(spec: str, args, work: Path, variants: list, results: dict) -> Path:
    """Table 1 for one model: gpp and the TP flow alternating; returns the ONNX path."""
    onnx_path = bc.cached_export(spec, args.size, work, args.fresh)
    flows = [("gpp", nl) for nl in variants] + ([] if args.skip_tp else [("tp", False)])
    runs: dict = {f: [] for f in flows}
    for rep in range(args.repeats):
        order = flows[rep % len(flows):] + flows[:rep % len(flows)]
        for kind, nl in order:
            out = work / f"{spec}.{kind}{'.nolat' if nl else ''}.onnx"
            r = timed_flow(kind, onnx_path, spec, args.size, out, args.ratio, nl)
            runs[(kind, nl)].append(r)
            status = "ok" if r["ok"] else f"FAILED ({r['problem']})"
            print(f"  run {rep + 1}: {kind}{' --no-latency' if nl else ''}: "
                  f"{r['seconds']:.2f} s {status}", flush=True)
            if not r["ok"]:
                print("    " + r["tail"].replace("\n", "\n    "))
    med = {f: bc.median([r["seconds"] for r in rs if r["ok"]]) for f, rs in runs.items()}
    tp_med = med.get(("tp", False))
    rows = []
    for f in flows:
        secs = [r["seconds"] for r in runs[f] if r["ok"]]
        name = LABEL[f[1]] if f[0] == "gpp" else "Torch-Pruning (build, prune, export)"
        ratio = f"{med[f] / tp_med:.2f}" if tp_med and secs else "-"
        rows.append([name, f"{len(secs)}/{len(runs[f])}", fmt_s(secs),
                     f"{min(secs):.2f}-{max(secs):.2f}" if secs else "-", ratio])
    print(f"\n## {spec} ({args.size}x{args.size}), ratio {args.ratio}: whole process, "
          f"{args.repeats} alternating runs\n")
    print(bc.table(["flow", "ok", "median s", "range s", "ratio to TP"], rows))
    tp_runs = [r for r in runs.get(("tp", False), []) if r["ok"] and r["stages"]]
    if tp_runs:
        names = list(tp_runs[0]["stages"])
        print("\nTorch-Pruning subprocess, median seconds per step (in-process timers):")
        print(bc.table(["step", "median s"],
                       [[n, f"{bc.median([r['stages'][n] for r in tp_runs]):.2f}"]
                        for n in names]))
    results[spec] = {"runs": {f"{k}{'-nolat' if nl else ''}": v
                              for (k, nl), v in runs.items()},
                     "medians": {f"{k}{'-nolat' if nl else ''}": v
                                 for (k, nl), v in med.items()}}
    return onnx_path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--repeats", type=int, default=3, help="runs of each flow (default 3)")
    ap.add_argument("--models", default="resnet50",
                    help="comma-separated torchvision names for table 1 (default resnet50; "
                         "the speed bar also uses vgg11_bn)")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--size", type=int, default=224, help="input side of the table 1 models' runs")
    ap.add_argument("--skip-tp", action="store_true", help="no Torch-Pruning runs")
    ap.add_argument("--no-latency", action="store_true",
                    help="only time `gpp-onnx prune --no-latency` (default: time gpp both "
                         "with its default latency measurement and with --no-latency)")
    ap.add_argument("--skip-scale", action="store_true", help="no graph-size scaling table")
    ap.add_argument("--scale-blocks", default="30,40,60,30",
                    help="Bottleneck blocks per stage of the big ResNet (resnet50: 3,4,6,3)")
    ap.add_argument("--scale-size", type=int, default=112,
                    help="input side for the scaling table (default 112: the 10x graph "
                         "then stays under two minutes)")
    ap.add_argument("--scale-repeats", type=int, default=1)
    ap.add_argument("--no-profile", action="store_true", help="no stage breakdown")
    ap.add_argument("--profile-extra", type=Path, nargs="*", default=[], metavar="ONNX",
                    help="also break down gpp-onnx prune on these ONNX files (own table)")
    ap.add_argument("--work", type=Path, default=bc.DEFAULT_WORK / "speed")
    ap.add_argument("--fresh", action="store_true", help="re-export cached ONNX files")
    ap.add_argument("--json", type=Path, help="also save all measurements here")
    args = ap.parse_args(argv)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    bc.byte_compile()
    variants = [True] if args.no_latency else [False, True]  # no_latency flag values
    results: dict = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                     "machine": bc.machine(), "git": bc.git_state(), "args": vars(args)}
    print(f"# bench_speed  {results['date']}\n# {results['machine']}\n# {results['git']}\n"
          f"# {bc.load_note('at start')}\n")

    # ---- 1. gpp vs Torch-Pruning, one model after the other ---------------------------
    onnx_path, profiled = None, None    # resnet50 if it was timed, else the first model
    for spec in args.models.split(","):
        path = compare_with_tp(spec, args, work, variants, results)
        if spec == "resnet50" or onnx_path is None:
            onnx_path, profiled = path, spec

    # ---- 2. scaling with graph size -----------------------------------------------------
    scale_models = []
    if not args.skip_scale:
        base = ("resnet50", "deep_resnet:" + BASE_BLOCKS)
        big = (f"ResNet[{args.scale_blocks}]", "deep_resnet:" + args.scale_blocks)
        scale_models = [base, big]
        paths = {name: bc.cached_export(s, args.scale_size, work, args.fresh)
                 for name, s in scale_models}
        times: dict = {(name, nl): [] for name, _ in scale_models for nl in variants}
        for rep in range(args.scale_repeats):
            for name, _s in scale_models:
                for nl in variants:
                    out = work / f"scale.{name.replace('[', '').replace(']', '')}.onnx"
                    r = timed_flow("gpp", paths[name], "", args.scale_size, out, args.ratio,
                                   nl)
                    print(f"  scale run {rep + 1}: {name}{' --no-latency' if nl else ''}: "
                          f"{r['seconds']:.2f} s {'ok' if r['ok'] else 'FAILED'}", flush=True)
                    if not r["ok"]:
                        print("    " + r["tail"].replace("\n", "\n    "))
                    times[(name, nl)].append(r["seconds"] if r["ok"] else float("nan"))
        info = {name: {"nodes": node_count(p), "bytes": p.stat().st_size}
                for name, p in paths.items()}
        rows = []
        for name, _s in scale_models:
            rows.append([name, info[name]["nodes"], f"{info[name]['bytes'] / 1e6:.0f}"]
                        + [fmt_s(times[(name, nl)]) for nl in variants])
        (bn, _), (gn, _) = scale_models
        rows.append(["ratio big/base", f"{info[gn]['nodes'] / info[bn]['nodes']:.2f}",
                     f"{info[gn]['bytes'] / info[bn]['bytes']:.2f}"]
                    + [f"{bc.median(times[(gn, nl)]) / bc.median(times[(bn, nl)]):.2f}"
                       for nl in variants])
        print(f"\n## scaling: gpp-onnx prune --ratio {args.ratio}, input "
              f"{args.scale_size}x{args.scale_size}, median of {args.scale_repeats}\n")
        print(bc.table(["model", "nodes", "file MB"]
                       + [f"s {'--no-latency' if nl else '(default)'}" for nl in variants],
                       rows))
        results["scaling"] = {"info": info, "times": {f"{n}{'-nolat' if nl else ''}": v
                                                      for (n, nl), v in times.items()}}

    # ---- 3. stage breakdown --------------------------------------------------------------
    if not args.no_profile:
        targets = [(profiled, onnx_path, args.size)]
        if scale_models:
            targets = [("resnet50", paths[scale_models[0][0]], args.scale_size),
                       (scale_models[1][0], paths[scale_models[1][0]], args.scale_size)]
            if args.scale_size != args.size:
                targets.insert(0, (profiled, onnx_path, args.size))
        profiles = []
        for name, path, size in targets:
            prof = profile(name, path, args.ratio, work)
            if prof is not None:
                profiles.append((f"{name} @{size}", prof))
        if profiles:
            print_profiles(profiles)
            results["profiles"] = {n: p for n, p in profiles}
    for path in args.profile_extra:
        prof = profile(path.stem, path, args.ratio, work)
        if prof is not None:
            print_profiles([(path.stem, prof)])
            results.setdefault("profiles", {})[path.stem] = prof
    results["load_end"] = bc.load_note("at end")
    print(f"\n# {results['load_end']}")
    if args.json:
        bc.write_json(args.json, results)
        print(f"\nsaved {args.json}")
    return 0


def profile(name: str, path: Path, ratio: float, work: Path) -> dict | None:
    """Two subprocess runs of `gpp-onnx prune` (default flags): pass 1 under cProfile finds
    the call tree below pipeline.prune; pass 2 times those gpp functions without a profiler."""
    out = work / "profile.out.onnx"
    gpp_args = ["prune", str(path), "--ratio", str(ratio), "-o", str(out)]
    script = str(Path(bc.__file__))
    res = bc.run_timed([bc.PYTHON, script, "profile-gpp", "--", *gpp_args], timeout=900)
    p1 = bc.last_json_line(res["stdout"])
    if res["rc"] != 0 or p1 is None:
        print(f"profile of {name} failed:\n{res['tail']}")
        return None
    rows_file = work / "profile.rows.json"
    rows_file.write_text(json.dumps(p1["rows"]))
    res2 = bc.run_timed([bc.PYTHON, script, "profile-gpp", "--wrap", str(rows_file), "--",
                         *gpp_args], timeout=900)
    p2 = bc.last_json_line(res2["stdout"])
    if res2["rc"] != 0 or p2 is None:
        print(f"profile pass 2 of {name} failed:\n{res2['tail']}")
        return None
    entries, stack = [], []
    for level, fname, secs, calls, key, sole in p1["rows"]:
        stack[level:] = [fname]
        label = "|".join(str(k) for k in key) if key else None
        if fname == "cli.main":
            secs, exact = p2["run"], True
        elif fname.startswith("imports"):
            secs, exact = p2["imports"], True
        elif sole and label in p2["times"]:
            secs, calls = p2["times"][label]
            exact = True
        else:
            exact = False  # not a gpp function (or not found): cProfile's time
        entries.append({"path": tuple(stack), "level": level, "seconds": secs,
                        "calls": calls, "exact": exact})
    entries.append({"path": ("interpreter start/exit",), "level": 0, "exact": True, "calls": 1,
                    "seconds": res2["seconds"] - p2["in_process_total"]})
    return {"wall": res2["seconds"], "wall_profiled": res["seconds"], "entries": entries,
            "totals": p1["totals"]}


def print_profiles(profiles) -> None:
    children: dict[tuple, list[tuple]] = {(): []}  # merged call trees, first-seen order
    level: dict[tuple, int] = {}
    for _n, p in profiles:
        for e in p["entries"]:
            path = e["path"]
            if path not in level:
                level[path] = e["level"]
                children.setdefault(path, [])
                children.setdefault(path[:-1], []).append(path)
    order: list[tuple] = []

    def walk(node):
        for kid in children.get(node, []):
            order.append(kid)
            walk(kid)

    walk(())
    headers = ["call tree below gpp-onnx prune (default flags)"]
    for n, _p in profiles:
        headers += [f"{n} s", "calls", "%"]
    two = len(profiles) > 1
    if two:
        headers.append("last/prev")
    rows = []
    for path in order:
        row = ["  " * level[path] + path[-1]]
        vals = []
        for _n, p in profiles:
            e = next((e for e in p["entries"] if e["path"] == path), None)
            vals.append(None if e is None else e["seconds"])
            if e is None:
                row += ["-", "", ""]
            else:
                row += [f"{e['seconds']:.2f}{'' if e['exact'] else '*'}", e["calls"],
                        f"{100 * e['seconds'] / p['wall']:.0f}"]
        if two:
            a, b = vals[-2], vals[-1]
            row.append(f"{b / a:.1f}x" if a and b and a >= 0.05 else "")
        rows.append(row)
    total = ["total wall (subprocess, no profiler)"]
    for _n, p in profiles:
        total += [f"{p['wall']:.2f}", "", "100"]
    if two:
        total.append(f"{profiles[-1][1]['wall'] / profiles[-2][1]['wall']:.1f}x")
    rows.append(total)
    print("\n## where gpp-onnx prune's time goes\n\nCall tree from a cProfile run (callees "
          "with >= 2% of the run; children are shown only for functions with a single "
          "caller); times from a second, unprofiled run with those gpp_onnx functions "
          "wrapped in timers (* = cProfile time: not a gpp_onnx function, or one with several callers). last/prev = "
          "ratio of the last two columns.\n")
    print(bc.table(headers, rows, "l" + "rrr" * len(profiles) + ("r" if two else "")))
    labels = []
    for _n, p in profiles:
        labels += [k for k in p["totals"] if k not in labels]
    rows = []
    for k in labels:
        row = [k]
        for _n, p in profiles:
            v = p["totals"].get(k)
            row += ["-", ""] if v is None else [f"{v[0]:.2f}", v[1]]
        rows.append(row)
    print("\nCross-cutting totals over all callers (cProfile run, overlapping):\n")
    print(bc.table(["function"] + [h for n, _p in profiles for h in (f"{n} s", "calls")], rows))


if __name__ == "__main__":
    sys.exit(main())
