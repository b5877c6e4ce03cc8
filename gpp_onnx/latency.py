"""Latency in the deployment runtime (onnxruntime), and the channel widths its kernels like.

Why a pruned model can be slower than its original. onnxruntime's CPU provider runs a
Conv in the blocked NCHWc layout (MLAS, block size b = 16 here) only when its channel
counts allow it. Measured on onnxruntime 1.32 (a one-Conv graph per width, optimised):

* depthwise: channels a multiple of 4;
* other grouped convs: channels per group a multiple of b;
* ``group == 1``: input channels below b, or a multiple of 4;
* in that layout every channel count is padded up to a multiple of b, so a width of 20
  costs what 32 costs.

A Conv that misses these runs in plain NCHW, and every switch between the layouts costs a
``ReorderInput`` / ``ReorderOutput`` node. mobilenet_v2 cut to half its MACs with free
widths ran 19 of its 52 convs in NCHW behind 20 reorders and took 1.17x the original's
time; with every kept width a multiple of 8 all 52 stayed NCHWc and it took 0.64x (0.60x
with multiples of 16).

So kept widths are rounded up to b by default (``round_to = None`` means "auto"): the
widths the kernels run anyway, the channels between a pruned width and the next multiple
of b kept for free. ``b`` is read from the runtime itself (:func:`channel_alignment`): a
1-output-channel Conv is optimised and the padded output width of its NCHWc form is b.
Where the runtime has no NCHWc form (other CPUs) the default is 8, the multiple that
SIMD lanes and GPU tensor cores favour alike.
"""
from __future__ import annotations

import functools
import logging
import math
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import verify
from .config import LatencyOptions
from .errors import InputError
from .graph import random_feeds
from .session_inputs import typed_feeds

logger = logging.getLogger(__name__)

FALLBACK_ALIGNMENT = 8
TARGET_BUDGET_S = 2.0   # a ratio read against --target-latency: paired rounds for this long
NCHWC = "com.microsoft.nchwc"


@functools.lru_cache(maxsize=1)
def channel_alignment() -> int:
    """The channel multiple onnxruntime's CPU kernels need for their fast layout here."""
    w = numpy_helper.from_array(np.ones((1, 3, 1, 1), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    try:
        optimized = optimized_graph(model)
    except Exception as err:  # no runtime to ask: fall back, the plan stays valid
        logger.debug("channel alignment probe failed (%s); using %d", err, FALLBACK_ALIGNMENT)
        return FALLBACK_ALIGNMENT
    dims = {t.name: tuple(t.dims) for t in optimized.graph.initializer}
    for node in optimized.graph.node:
        if node.domain == NCHWC and node.op_type == "Conv" and dims.get(node.input[1]):
            return int(dims[node.input[1]][0])
    return FALLBACK_ALIGNMENT


def width_multiples(round_to: int | None) -> tuple[int, ...]:
    """Kept widths are multiples of the first of these that meets a cost target: the
    user's --round-to, or by default the block b, then b/2, ..., 1."""
    if round_to is not None:
        return (round_to,)
    b = channel_alignment()
    return tuple(b >> i for i in range(b.bit_length()))


def optimized_graph(model: onnx.ModelProto | bytes | str) -> onnx.ModelProto:
    """The graph onnxruntime's CPU provider runs after all its optimisations."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with tempfile.TemporaryDirectory() as tmp:
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(verify.serialized(model), opts, providers=["CPUExecutionProvider"])
        return onnx.load(opts.optimized_model_filepath)


@dataclass(frozen=True)
class Layout:
    """How many convs run in the fast NCHWc layout, how many fell back, and the reorders."""
    nchwc_convs: int
    plain_convs: int
    reorders: int

    @classmethod
    def of(cls, model: onnx.ModelProto | bytes | str) -> "Layout":
        ops = Counter((n.domain, n.op_type) for n in optimized_graph(model).graph.node)
        plain = sum(v for (d, op), v in ops.items() if d != NCHWC and op in ("Conv", "FusedConv"))
        reorders = ops[(NCHWC, "ReorderInput")] + ops[(NCHWC, "ReorderOutput")]
        return cls(ops[(NCHWC, "Conv")], plain, reorders)


@dataclass(frozen=True)
class LatencyCheck:
    """Median latency of the pruned model over the original's, timed interleaved."""
    ratio: float
    original: Layout | None = None
    pruned: Layout | None = None

    @property
    def slower(self) -> bool:
        return self.ratio >= 1.0

    def warning(self, round_to: int | None) -> str | None:
        """One line for the summary when the pruned model is slower, with the likely fix
        (`round_to` as the user gave it; None is the default)."""
        if not self.slower:
            return None
        why = ""
        if self.pruned is not None and self.original is not None and (
                self.pruned.plain_convs > self.original.plain_convs
                or self.pruned.reorders > self.original.reorders):
            left = self.pruned.plain_convs - self.original.plain_convs
            reorders = (f"{self.pruned.reorders} layout reorders, the original has "
                        f"{self.original.reorders}")
            why = (f": {left} of {self.original.nchwc_convs} convs left onnxruntime's fast "
                   f"layout ({reorders})" if left > 0 else f": {reorders}")
        b = channel_alignment()
        hint = (f"leave out --round-to (default: multiples of {b} here)"
                if round_to is not None and round_to % b else
                "cut more channels, or round widths to a larger multiple with --round-to")
        return (f"the pruned model is slower than the original here (latency x{self.ratio:.2f})"
                f"{why} - {hint}")


def providers_for(options: LatencyOptions) -> list[str]:
    """onnxruntime providers for `options.provider`; a one-line error when CUDA is asked
    for and this onnxruntime has none."""
    if options.provider == "cpu":
        return ["CPUExecutionProvider"]
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise InputError("--provider cuda needs onnxruntime-gpu with a CUDA device - install "
                         "the gpu extra (pip install -e '.[gpu]') or use --provider cpu")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def session(model, where: str, options: LatencyOptions):
    """A timing session: all graph optimisations, the options' provider and threads."""
    return verify.make_session(model, where, options.threads, providers_for(options))


def timing_for(original: onnx.ModelProto, options: LatencyOptions) -> LatencyOptions:
    """`options` for the model as the file declares it: a model whose input fixes the
    batch at b (``batch``; normalising frees it for training) is timed on batches of b,
    and another --latency-batch is refused."""
    from . import batch

    b = batch.fixed(original)
    if b is None or options.batch == b:
        return options
    if options.batch != 1:
        raise InputError(f"--latency-batch {options.batch}: the model's input fixes the "
                         f"batch at {b}, so it runs on {b} at a time - drop --latency-batch")
    return replace(options, batch=b)


def timing_feeds(view, options: LatencyOptions) -> dict:
    """Inputs for timing: the probe's (batch 1), or `options.batch` images per run."""
    if options.batch == 1 or not view.dynamic_batch:
        return view.probe_feeds
    return random_feeds(view.inputs, batch=options.batch)


def as_written(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with its byte-identical initializers shared, as surgery writes a cut model
    (and as the exporters wrote the input): normalising gives each user its own copy, and
    onnxruntime lays the two forms out differently (float16 convs run in NCHWc only where
    their bias is not shared: the normalised float16 mobilenet_v2 ran 3x faster than its
    file), so an original is timed in the form the pruned model has. Float32 models are
    timed as they are: their layout did not depend on it, and the copy and a second
    session took 0.5 s of a 3 s resnet50 prune."""
    from .model import dedupe_initializers

    if verify.low_precision(model) is None:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out if dedupe_initializers(out) else model


def measure(original: verify.Source, pruned: verify.Source, feeds,
            budget_s: float = 1.0, original_session=None,
            options: LatencyOptions = LatencyOptions(),
            target: float | None = None) -> LatencyCheck:
    """Latency ratio of the pruned model in onnxruntime, and the layouts when it is slower.
    Each model is given as a ModelProto, its bytes or its file; `original_session`: an
    optimised session of `original` already open with the default providers and threads
    (``prune`` passes the normalised model's, opened for its noise measure), used when
    `options` ask for the same. Without a latency `target` the rounds stop once it is clear
    which model is faster; with one the ratio itself is read against the target, so it is
    timed as the plan's cuts were (TARGET_BUDGET_S, no early stop)."""
    if isinstance(original, onnx.ModelProto):
        timed = as_written(original)
        original_session = original_session if timed is original else None
        original = timed
    same = options.threads == 0 and providers_for(options) == verify.providers()
    sessions = [original_session if same and original_session is not None
                else session(original, "input model", options),
                session(pruned, "pruned model", options)]
    ratio = (paired_ratio(sessions, feeds, budget_s, threshold=1.0) if target is None
             else paired_ratio(sessions, feeds, max(budget_s, TARGET_BUDGET_S)))
    layouts = (Layout.of(original), Layout.of(pruned)) if ratio >= 1.0 else (None, None)
    return LatencyCheck(ratio, *layouts)


def medians(sessions: list, feeds: dict, budget_s: float = 3.0, min_runs: int = 5,
            max_runs: int = 50) -> list[float]:
    """Median latency (seconds) of each session, runs interleaved, within a time budget."""
    each = [typed_feeds(s, feeds) for s in sessions]
    for s, f in zip(sessions, each):  # warm-up
        s.run(None, f)
    times: list[list[float]] = [[] for _ in sessions]
    start = time.perf_counter()
    while len(times[0]) < max_runs and (len(times[0]) < min_runs
                                        or time.perf_counter() - start < budget_s):
        for i, s in enumerate(sessions):
            t0 = time.perf_counter()
            s.run(None, each[i])
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def paired_ratio(sessions, feeds, budget_s: float = 1.0, min_rounds: int = 5,
                 max_rounds: int = 2000, threshold: float | None = None) -> float:
    """Median over rounds of t(second) / t(first). Each round runs both back to back, in
    alternating order, so load that comes and goes on a busy machine hits both sides of a
    pair alike; small models get many rounds within the budget. With `threshold`, the
    loop ends as soon as the rounds leave no doubt on which side of it the median lies
    (``decided``); only that side is asked for then, not the ratio's last digit."""
    each = [typed_feeds(s, feeds) for s in sessions]  # e.g. a float16 model beside its float32 one
    for s, f in zip(sessions, each):  # warm-up
        s.run(None, f)
    ratios: list[float] = []
    start = time.perf_counter()
    while len(ratios) < max_rounds and (len(ratios) < min_rounds
                                        or time.perf_counter() - start < budget_s):
        t = [0.0, 0.0]
        for i in (0, 1) if len(ratios) % 2 == 0 else (1, 0):
            t0 = time.perf_counter()
            sessions[i].run(None, each[i])
            t[i] = time.perf_counter() - t0
        ratios.append(t[1] / max(t[0], 1e-9))
        if threshold is not None and decided(ratios, threshold):
            break
    return statistics.median(ratios)


# two-sided 0.1% points of Student's t with n - 1 degrees of freedom, n = 3..16 rounds
_T_999 = (31.60, 12.92, 8.61, 6.87, 5.96, 5.41, 5.04, 4.78, 4.59, 4.44, 4.32, 4.22, 4.14, 4.07)
MIN_DECIDED = 3
DECIDED_P = 1e-3


def decided(ratios: list[float], threshold: float = 1.0) -> bool:
    """Whether paired rounds already show, at the 0.1% level, on which side of `threshold`
    the median ratio lies. Either test decides:

    * sign test: k of n rounds on one side, ``P(Binomial(n, 1/2) >= k) * 2 < 0.001``
      (no assumption on the noise; 11 of 11, 14 of 15, ... rounds);
    * t test on ``log(ratio / threshold)`` once n >= 3 rounds all lie on one side: mean over
      standard error above Student's 0.1% point (3 rounds of 0.25 +- 5% decide, 4 of
      0.25 +- 20%).

    Near the threshold neither fires and the loop runs its whole budget, as without it."""
    n = len(ratios)
    if n < MIN_DECIDED:
        return False
    below = sum(r < threshold for r in ratios)
    k = max(below, n - below)
    tail = sum(math.comb(n, j) for j in range(k, n + 1)) / 2 ** n
    if 2 * tail < DECIDED_P:
        return True
    if k < n or n - MIN_DECIDED >= len(_T_999):
        return False
    logs = [math.log(max(r, 1e-12) / threshold) for r in ratios]
    spread = statistics.stdev(logs)
    mean = statistics.fmean(logs)
    if spread == 0:
        return mean != 0
    return abs(mean) / (spread / math.sqrt(n)) > _T_999[n - MIN_DECIDED]
