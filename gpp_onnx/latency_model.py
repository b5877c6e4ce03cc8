"""A latency cost model of a model's pruned variants, from one onnxruntime profile.

The original model is profiled in onnxruntime (all optimisations, the session options
the user deploys with: threads, batch). Each kernel k of the optimised graph is named
after the node or value it computes, so its median time t_k is charged to that value v_k
of the analysed graph, and to the input u_k of the weighted node (Conv, Gemm, MatMul)
that produces v_k through element-wise ops (fused activations, BN). A plan that keeps
``kept_v`` of the ``w_v`` channels of v is estimated at

    t(kept) = t_fixed + sum_k t_k * f(v_k) * f(u_k),   f(v) = pad(kept_v) / pad(w_v)

with ``pad(n)`` = n rounded up to the runtime's block b (latency.py): the NCHWc kernels
compute padded channels anyway. Depthwise and other grouped convs count their output
only (input and output are the same channels). Kernels that map to no value (layout
reorders) are ``t_fixed``. The model is a guide for allocation: the pruned model itself
is timed afterwards and the goal corrected (latency.plan_for_latency).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import statistics
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import allocate, latency, surgery
from .config import LatencyOptions
from .latency import channel_alignment
from .errors import GppError, InputError
from .files import write_text
from .plan import PrunePlan, kept_elements, plan_for_target

logger = logging.getLogger(__name__)

WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
_SUFFIXES = ("_nchwc",)


@dataclass(frozen=True)
class Kernel:
    seconds: float
    values: tuple[str, ...]      # values whose kept fraction scales this kernel's time


class LatencyModel:
    def __init__(self, analysis, kernels: list[Kernel], fixed: float):
        self.analysis = analysis
        self.kernels = kernels
        self.fixed = fixed
        self.block = channel_alignment()
        self.widths = {v: int(analysis.view.shape(v)[a]) for k in kernels for v in k.values
                       if (a := analysis.axes.get(v)) is not None}

    @property
    def total(self) -> float:
        return self.fixed + sum(k.seconds for k in self.kernels)

    def estimate(self, kept: dict[str, np.ndarray]) -> float:
        """Estimated seconds per run of the model with `kept` elements of each value."""
        t = self.fixed
        for k in self.kernels:
            f = 1.0
            for v in k.values:
                if v in kept and v in self.widths:
                    f *= self._pad(len(kept[v])) / self._pad(self.widths[v])
            t += k.seconds * f
        return t

    def _pad(self, n: int) -> int:
        return int(math.ceil(n / self.block) * self.block) if n >= self.block else n

    @classmethod
    def profile(cls, analysis, feeds: dict, runs: int = 20,
                options: LatencyOptions = LatencyOptions()) -> "LatencyModel":
        """Profile the analysed model in onnxruntime (the options' provider and threads)
        and build the model. Kernel times are cached per model structure, input shapes,
        provider, threads, onnxruntime version and processor under `options.cache`."""
        times = _cached_kernel_times(analysis.view.model, feeds, runs, options)
        by_name = {n.name: n for n in analysis.view.nodes}
        kernels, fixed = [], 0.0
        for name, seconds in times.items():
            values = _scaled_values(analysis, by_name, name)
            if values:
                kernels.append(Kernel(seconds, values))
            else:
                fixed += seconds
        logger.info("latency model: %d kernels, %.2f ms (%.2f ms not tied to channels)",
                    len(kernels), 1e3 * (fixed + sum(k.seconds for k in kernels)), 1e3 * fixed)
        return cls(analysis, kernels, fixed)


def _cached_kernel_times(model, feeds: dict, runs: int, options: LatencyOptions
                         ) -> dict[str, float]:
    if not options.cache:
        return _kernel_times(model, feeds, runs, options)
    import onnxruntime as ort

    from .plan import model_digest

    key = json.dumps([model_digest(model), {k: list(v.shape) for k, v in feeds.items()},
                      options.provider, options.threads, runs, ort.__version__, _processor()])
    path = (Path(options.cache).expanduser() / "latency"
            / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json")
    if path.is_file():
        try:
            times = json.loads(path.read_text())["kernels"]
            if isinstance(times, dict) and all(
                    isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                    and math.isfinite(v) and v >= 0 for k, v in times.items()) \
                    and sum(times.values()) > 0:        # an all-zero profile times nothing
                logger.info("latency model: kernel times from %s", path)
                return {k: float(v) for k, v in times.items()}
        except (OSError, ValueError, KeyError, TypeError):
            pass
        logger.debug("latency cache entry %s is damaged: measured again", path)
    times = _kernel_times(model, feeds, runs, options)
    try:
        write_text(path, json.dumps({"key": json.loads(key), "kernels": times}))
    except (OSError, GppError) as err:  # a cache that cannot be written only costs time
        logger.debug("latency cache not written (%s)", err)
    return times


def _processor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()}"


def _kernel_times(model, feeds: dict, runs: int, options: LatencyOptions) -> dict[str, float]:
    """Median seconds of each kernel over `runs` profiled runs (after one warm-up)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.enable_profiling = True
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if options.threads:
        opts.intra_op_num_threads = options.threads
    try:
        folder = tempfile.TemporaryDirectory()
    except OSError as err:
        raise _no_profile(tempfile.gettempdir(), err.strerror or type(err).__name__) from None
    with folder as tmp:
        opts.profile_file_prefix = os.path.join(tmp, "profile")
        session = ort.InferenceSession(model.SerializeToString(), opts,
                                       providers=latency.providers_for(options))
        for _ in range(runs + 1):
            session.run(None, feeds)
        try:
            with open(session.end_profiling()) as f:
                events = json.load(f)
        except (OSError, ValueError):   # onnxruntime cuts its profile short on a full disk
            raise _no_profile(os.path.dirname(tmp), "incomplete - is its disk full?") from None
    per_kernel: dict[str, list[float]] = defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_kernel[e["name"][: -len("_kernel_time")]].append(e["dur"] * 1e-6)
    # the first run of a profiled session allocates: drop it
    return {k: statistics.median(v[1:] or v) for k, v in per_kernel.items()}


def _no_profile(folder, why: str) -> InputError:
    return InputError(f"onnxruntime's kernel profile in the temporary folder {folder} could "
                      f"not be written ({why}) - free some space there or set TMPDIR to "
                      "another folder")


def _scaled_values(analysis, by_name: dict, kernel: str) -> tuple[str, ...]:
    """The channel values whose widths scale a kernel: its output and its weighted input."""
    view = analysis.view
    name = kernel
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    node = by_name.get(name)
    value = node.output[0] if node is not None else name
    if value not in view.producer:
        return ()
    out = (value,) if analysis.axes.get(value) is not None else ()
    node = view.producer[value]
    while node.op_type not in WEIGHTED:
        data = [i for i in node.input if i and not view.is_const(i)]
        if len(data) != 1 or data[0] not in view.producer:
            return out
        node = view.producer[data[0]]
    if node.op_type == "Conv" and _group(node) > 1:
        return out
    source = node.input[0]
    return out + ((source,) if analysis.axes.get(source) is not None else ())


def _group(node) -> int:
    return next((a.i for a in node.attribute if a.name == "group"), 1)


@dataclass(frozen=True)
class LatencyPlan:
    plan: object                 # PrunePlan
    measured: float              # latency ratio of the cut model, timed in onnxruntime
    tries: tuple[tuple[float, float], ...]   # (goal given to the allocation, measured)
    groups: tuple[dict, ...] = ()            # group_costs of the profiled model


def plan_for_latency(analysis, scores, digest: str, fraction: float, feeds: dict,
                     min_keep: int = 1, round_to: int = 1, meta: dict | None = None,
                     tries: int = 4, tolerance: float = 0.03,
                     allocation: str = "global",
                     options: LatencyOptions = LatencyOptions()) -> LatencyPlan:
    """Global allocation (or, with `allocation` "uniform", the uniform ratio search) against
    the latency model, then the real cut model is timed
    against the original and the model's goal corrected, until the measured ratio is
    within `tolerance` (relative) of `fraction` or `tries` run out. The next goal
    interpolates between the closest goals measured above and below the target, or scales
    the last goal by target / measured before both sides are known. The plan kept is the
    slowest one that meets the target, else the fastest tried."""
    model = LatencyModel.profile(analysis, feeds, options=options)
    original = latency.session(latency.as_written(analysis.view.model), "input model", options)
    goal, done = fraction, []
    for _ in range(tries):
        if allocation == "global":
            plan = allocate.plan_global(analysis, scores, digest, model.estimate,
                                        goal * model.total, min_keep, round_to, meta)
        else:
            plan = plan_for_target(analysis, scores, digest,
                                   lambda p: model.estimate(kept_elements(analysis, p)), goal,
                                   min_keep, round_to, dict(meta or {}, allocation="uniform"))
        pruned = surgery.cut(analysis, kept_elements(analysis, plan))
        measured = latency.paired_ratio(
            [original, latency.session(pruned, "pruned model", options)], feeds,
            budget_s=latency.TARGET_BUDGET_S)
        logger.info("latency target %.3f: model goal %.3f -> measured %.3f", fraction, goal,
                    measured)
        done.append((plan, goal, measured))
        if abs(measured / fraction - 1) <= tolerance:
            break
        goal = _next_goal([(g, m) for _, g, m in done], fraction)
    meeting = [d for d in done if d[2] <= fraction * (1 + tolerance)]
    plan, _, measured = (max(meeting, key=lambda d: d[2]) if meeting
                         else min(done, key=lambda d: d[2]))
    groups = tuple({k: v for k, v in row.items() if k != "curve"}
                   for row in group_costs(analysis, model, points=1))
    return LatencyPlan(plan, measured, tuple((g, m) for _, g, m in done), groups)


def _next_goal(tried: list[tuple[float, float]], target: float) -> float:
    """(goal, measured) pairs -> the next goal for the latency model."""
    above = [t for t in tried if t[1] > target]
    below = [t for t in tried if t[1] < target]
    if above and below:
        (g0, m0), (g1, m1) = min(above, key=lambda t: t[1]), max(below, key=lambda t: t[1])
        return g1 + (target - m1) * (g0 - g1) / (m0 - m1)
    g, m = tried[-1]
    return g * target / m


def group_costs(analysis, model: LatencyModel, points: int = 8) -> list[dict]:
    """Per prunable group: the share of the latency its width controls (cut to its first
    multiple of the block) and the estimated latency at up to `points` kept widths."""
    rows = []
    for g in analysis.prunable:
        step = max(model.block, -(-g.width // points))
        widths = sorted({min(g.width, w) for w in range(step, g.width + step, step)}
                        | {min(g.width, model.block)})   # the share's point, at any `points`
        curve = []
        for keep in widths:
            plan = PrunePlan({g.key: tuple(range(g.width - keep))}, {g.key: g.width}, "")
            curve.append([keep, model.estimate(kept_elements(analysis, plan))])
        saved = model.total - curve[0][1]
        rows.append({"key": g.key, "width": g.width, "share": saved / max(model.total, 1e-12),
                     "us_per_channel": 1e6 * saved / max(g.width - curve[0][0], 1),
                     "curve": curve})
    return sorted(rows, key=lambda r: -r["share"])
