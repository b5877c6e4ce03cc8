"""Shared helpers for tools/bench_speed.py and tools/bench_speedup.py.

Also a small command line, used as the *subprocess* side of the benchmarks (so that each
flow pays its own interpreter start and imports, like a user running it):

    python tools/_bench_common.py export MODEL OUT.onnx [--size 224]
    python tools/_bench_common.py tp MODEL OUT.onnx [--size 224] [--ratio 0.5]
    python tools/_bench_common.py profile-gpp [--wrap ROWS.json] -- <gpp-onnx arguments>

MODEL is a torchvision classifier name (``resnet50``) or ``deep_resnet:30,40,60,30``
(torchvision's ResNet with Bottleneck blocks and that many blocks per stage; resnet50 is
``deep_resnet:3,4,6,3``). The module imports only the standard library at top level:
the ``tp`` subprocess must pay for ``import torch, torch_pruning`` inside its timing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

_T_START = time.perf_counter()  # for the in-process breakdowns of the subprocess commands

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
_SCRIPT = Path(PYTHON).with_name("gpp-onnx")  # the console script beside this interpreter
GPP = [str(_SCRIPT)] if _SCRIPT.exists() else [PYTHON, "-m", "gpp_onnx"]
DEFAULT_WORK = Path("/tmp/bench-work")


def byte_compile(tree: Path = ROOT) -> None:
    """Write the bytecode of `tree`'s gpp_onnx package, as pip does when it installs a
    package (torch and Torch-Pruning are timed installed that way). An editable install
    under PYTHONDONTWRITEBYTECODE (set on these machines) otherwise compiles every
    module at every start: 0.1 s of a 2 s run. Stale files are ignored by Python."""
    import compileall

    compileall.compile_dir(str(tree / "gpp_onnx"), quiet=1)


# --------------------------------------------------------------------------- models
def build_model(spec: str):
    """An eval-mode torch model for a torchvision name or a ``deep_resnet:a,b,c,d`` spec."""
    from adapters.pytorch import load_torchvision

    if spec.startswith("deep_resnet:"):
        blocks = [int(v) for v in spec.split(":", 1)[1].split(",")]
        ref = load_torchvision("resnet50")  # imports torchvision through the adapter
        resnet_cls, bottleneck_cls = type(ref), type(ref.layer1[0])
        return resnet_cls(bottleneck_cls, blocks).eval()
    return load_torchvision(spec).eval()


def final_classifier(model):
    """The last nn.Linear of a model (torchvision classifiers end with one)."""
    import torch

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError("no nn.Linear found for the final classifier")
    return linears[-1]


def export(spec: str, path: Path, size: int) -> Path:
    from adapters.pytorch import export_torch

    return export_torch(build_model(spec), path, (1, 3, size, size), exporter="legacy", opset=17)


def cached_export(spec: str, size: int, work: Path, fresh: bool = False) -> Path:
    """Export in a subprocess (keeps torch out of the benchmark process); reuse if present."""
    name = spec.replace(":", "_").replace(",", "-")
    path = work / f"{name}_{size}.onnx"
    if fresh or not path.exists():
        work.mkdir(parents=True, exist_ok=True)
        res = run_timed([PYTHON, __file__, "export", spec, str(path), "--size", str(size)],
                        timeout=1800)
        if res["rc"] != 0:
            raise RuntimeError(f"export of {spec} failed:\n{res['tail']}")
    return path


# --------------------------------------------------------------------------- timing
def run_timed(cmd: list[str], timeout: float | None = None, env: dict | None = None) -> dict:
    """Run a subprocess; wall seconds from start to exit, rc, stdout, stderr tail."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=full_env, cwd=str(ROOT))
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out, err = -9, _text(exc.stdout), _text(exc.stderr) + f"\n[timeout after {timeout}s]"
    seconds = time.perf_counter() - t0
    tail = "\n".join((err or "").strip().splitlines()[-15:])
    return {"seconds": seconds, "rc": rc, "stdout": out or "", "stderr": err or "", "tail": tail}


def _text(b) -> str:
    if b is None:
        return ""
    return b.decode(errors="replace") if isinstance(b, bytes) else b


def last_json_line(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def verify_onnx(path: Path) -> str | None:
    """None when `path` is a valid ONNX model file, else the reason."""
    import onnx

    if not path.exists():
        return "no output file"
    try:
        onnx.checker.check_model(str(path))
    except Exception as err:  # noqa: BLE001 - report, not raise
        return f"checker: {str(err).splitlines()[0][:160]}"
    return None


def median(values):
    return statistics.median(values) if values else float("nan")


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib import metadata

    versions = []
    for dist in ("torch", "torchvision", "onnxruntime", "onnx", "torch-pruning"):
        try:
            versions.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    gpu = "no GPU" if not Path("/dev/nvidia0").exists() else "GPU present"
    return (f"{os.cpu_count()}-core {cpu}, {gpu}, Python {platform.python_version()}, "
            + ", ".join(versions))


def git_state() -> str:
    """Commit of the gpp-onnx checkout and whether gpp_onnx/ has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "gpp_onnx"], cwd=ROOT,
                               capture_output=True, text=True).stdout.split("\n")
    except OSError:
        return "git: unknown"
    changed = [line[3:] for line in dirty if line.strip()]
    return f"gpp-onnx at {head}" + (f" + uncommitted changes in {', '.join(changed)}"
                                    if changed else "")


def load_note(when: str) -> str:
    """The 1/5/15-minute load averages: other work on the machine skews absolute times."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return f"load average {when}: unknown"
    return (f"load average {when}: {one:.1f} / {five:.1f} / {fifteen:.1f} "
            f"(1/5/15 min) on {os.cpu_count()} cores")


def table(headers, rows, align=None) -> str:
    from gpp_onnx.report import table as _table

    return _table(headers, rows, align)


def write_json(path, data) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1, default=str))


# --------------------------------------------------------------------------- Torch-Pruning
def tp_prune(spec: str, out: Path, size: int, ratio: float) -> dict:
    """Torch-Pruning's flow: build, MagnitudePruner(L1) at `ratio`, prune, legacy ONNX export."""
    times = {}
    t = time.perf_counter()
    import torch
    import torch_pruning as tp

    from adapters.pytorch import export_torch
    times["import torch + torch_pruning"] = time.perf_counter() - t
    t = time.perf_counter()
    model = build_model(spec)
    times["import torchvision + build model"] = time.perf_counter() - t
    t = time.perf_counter()
    example = torch.randn(1, 3, size, size)
    pruner = tp.pruner.MagnitudePruner(
        model, example, importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio, ignored_layers=[final_classifier(model)], round_to=None)
    times["dependency graph (pruner init)"] = time.perf_counter() - t
    t = time.perf_counter()
    pruner.step()
    times["prune step"] = time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad():
        model(example)  # the pruned model still runs in torch
    export_torch(model, out, (1, 3, size, size), exporter="legacy", opset=17)
    times["check + ONNX export"] = time.perf_counter() - t
    return times


# --------------------------------------------------------------------------- gpp stage profile
# The stage breakdown is read off cProfile's call graph instead of wrapping a fixed list of
# gpp_onnx functions: the pipeline keeps changing, and the tree below follows it. cProfile's
# overhead inflates pure-Python parts (op rules, grouping) somewhat; C parts (onnxruntime,
# protobuf) are timed almost exactly.
_CROSS_CUTTING = [  # (file suffix or "~", function name, label): totals over all callers
    ("gpp_onnx/verify.py", "make_session", "gpp verify.make_session (ORT session creation)"),
    ("~", "<method 'SerializeToString' of 'google._upb._message.Message' objects>",
     "protobuf SerializeToString"),
    ("onnxruntime_inference_collection.py", "run", "onnxruntime InferenceSession.run"),
    ("onnx/checker.py", "check_model", "onnx.checker.check_model"),
    ("gpp_onnx/graph.py", "_probe", "gpp graph._probe (shape probe)"),
    ("gpp_onnx/analysis/groups.py", "build_groups", "gpp build_groups (channel grouping)"),
    ("gpp_onnx/latency.py", "medians", "gpp latency.medians (latency loop)"),
]


def _func_name(key) -> str:
    path, _line, func = key
    if path == "~":
        return func.replace("<built-in method ", "<").replace(
            " of 'google._upb._message.Message' objects", "")
    path = path.replace("\\", "/")
    if "/gpp_onnx/" in path:
        mod = "gpp_onnx." + path.split("/gpp_onnx/", 1)[1][:-3].replace("/", ".")
        mod = mod.replace(".__init__", "")
    elif "site-packages/" in path:
        mod = path.split("site-packages/", 1)[1][:-3].replace("/", ".")
    else:
        mod = Path(path).stem
    return f"{mod}.{func}"


def _import_gpp():
    t = time.perf_counter()
    import gpp_onnx.cli as cli
    import onnxruntime  # noqa: F401 - gpp imports it lazily; counted with the imports here
    return cli, time.perf_counter() - t


def profile_gpp(argv: list[str], depth: int = 4, min_share: float = 0.02) -> dict:
    """Pass 1: gpp-onnx's CLI under cProfile; the call tree below pipeline.prune as rows
    ``[level, name, seconds, calls, key, sole]`` (key = [file, line, function]; sole: all of
    the function's calls come from the row's parent)."""
    import cProfile
    import pstats

    cli, imports = _import_gpp()
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    rc = cli.main(argv)
    prof.disable()
    run = time.perf_counter() - t
    stats = pstats.Stats(prof).stats  # key -> (cc, nc, tt, ct, callers{key: (cc,nc,tt,ct)})
    callees: dict = {}
    for key, (_cc, _nc, _tt, _ct, callers) in stats.items():
        for caller, edge in callers.items():
            callees.setdefault(caller, []).append((key, edge))
    roots = [k for k in stats if k[0].replace("\\", "/").endswith("gpp_onnx/pipeline.py")
             and k[2] == "prune"]
    rows = [[0, "imports (gpp_onnx + onnxruntime)", imports, 1, None, True],
            [0, "cli.main", run, 1, None, True]]
    floor = min_share * run

    def walk(key, level, seen):
        for kid, edge in sorted(callees.get(key, []), key=lambda kv: -kv[1][3]):
            if edge[3] >= floor and kid not in seen:
                sole = stats[kid][1] == edge[1]  # every call of `kid` comes from `key`
                rows.append([level, _func_name(kid), edge[3], edge[1], list(kid), sole])
                # a function also called from elsewhere: its callees' times would mix callers
                if level < depth and sole:
                    walk(kid, level + 1, seen | {kid})

    for root in roots:
        rows.append([1, _func_name(root), stats[root][3], stats[root][1], list(root), True])
        walk(root, 2, {root})
    totals = {}
    for suffix, func, label in _CROSS_CUTTING:
        for key, (_cc, nc, _tt, ct, _callers) in stats.items():
            if key[2] == func and (key[0] == suffix if suffix == "~"
                                   else key[0].replace("\\", "/").endswith(suffix)):
                old = totals.get(label, [0.0, 0])
                totals[label] = [old[0] + ct, old[1] + nc]
    return {"rc": rc, "rows": rows, "totals": totals,
            "in_process_total": time.perf_counter() - _T_START}


def _gpp_function_slots(key):
    """(owner, attribute, function) for every place the gpp function of `key` is reachable:
    its module or class, and modules that imported it by name."""
    import inspect

    path, line, func = key
    path = path.replace("\\", "/")
    if "/gpp_onnx/" not in path:
        return []
    slots, target = [], None
    for mod_name, mod in list(sys.modules.items()):
        if not mod_name.startswith("gpp_onnx") or mod is None:
            continue
        for attr, obj in list(vars(mod).items()):
            cands = [(mod, attr, obj)]
            if inspect.isclass(obj) and getattr(obj, "__module__", "").startswith("gpp_onnx"):
                cands += [(obj, a, o) for a, o in vars(obj).items()]
            for owner, a, o in cands:
                code = getattr(o, "__code__", None)
                if (inspect.isfunction(o) and code is not None and o.__name__ == func
                        and code.co_firstlineno == line
                        and code.co_filename.replace("\\", "/") == path):
                    slots.append((owner, a, o))
                    target = o
    return slots if target is not None else []


def wrapped_gpp(argv: list[str], rows: list) -> dict:
    """Pass 2: no profiler; the gpp functions of pass 1's rows wrapped with timers
    (outermost call only, so recursion is not counted twice). Seconds and calls per key."""
    cli, imports = _import_gpp()
    import gpp_onnx.pipeline  # noqa: F401 - make sure every gpp module is imported

    acc: dict[str, list] = {}

    def wrap(fn, label):
        active = [0]

        def timed(*args, **kwargs):
            if active[0]:
                return fn(*args, **kwargs)
            active[0] += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                active[0] -= 1
                cell = acc.setdefault(label, [0.0, 0])
                cell[0] += time.perf_counter() - t0
                cell[1] += 1
        timed.__wrapped__ = fn
        return timed

    done = set()
    for row in rows:
        key = row[4]
        if key is None or tuple(key) in done:
            continue
        done.add(tuple(key))
        label = "|".join(str(k) for k in key)
        wrapper = None
        for owner, attr, fn in _gpp_function_slots(tuple(key)):
            wrapper = wrapper or wrap(fn, label)
            setattr(owner, attr, wrapper)
    t = time.perf_counter()
    rc = cli.main(argv)
    run = time.perf_counter() - t
    return {"rc": rc, "imports": imports, "run": run, "times": acc,
            "in_process_total": time.perf_counter() - _T_START}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export")
    ex.add_argument("model")
    ex.add_argument("out")
    ex.add_argument("--size", type=int, default=224)
    tpp = sub.add_parser("tp")
    tpp.add_argument("model")
    tpp.add_argument("out")
    tpp.add_argument("--size", type=int, default=224)
    tpp.add_argument("--ratio", type=float, default=0.5)
    prof = sub.add_parser("profile-gpp")
    prof.add_argument("--wrap", help="pass 2: JSON rows of a pass-1 run to time unprofiled")
    prof.add_argument("gpp_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.cmd == "export":
        export(args.model, Path(args.out), args.size)
        return 0
    if args.cmd == "tp":
        try:
            times = tp_prune(args.model, Path(args.out), args.size, args.ratio)
        except Exception as err:  # noqa: BLE001 - the benchmark records the reason
            import traceback

            traceback.print_exc()
            reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
            print(json.dumps({"error": reason}))
            return 3
        print(json.dumps({"stages": times}))
        return 0
    gpp_args = [a for a in args.gpp_args if a != "--"]
    if args.wrap:
        result = wrapped_gpp(gpp_args, json.loads(Path(args.wrap).read_text()))
    else:
        result = profile_gpp(gpp_args)
    print(json.dumps(result))
    return int(result["rc"])


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
