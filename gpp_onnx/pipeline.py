"""The public facade of the one-way pipeline: load -> analyse -> (rounds.py: score -> plan
-> cut -> verify -> fine-tune) -> save. Models come as paths or in-memory ModelProtos."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from . import batch, distributed, files, half, latency, preflight, report, verify
from . import model as model_io
from .analysis import Analysis, analyze_model
from .config import DataOptions, LatencyOptions, PruneConfig, check_count, check_type
from .data import iter_batches
from .errors import InputError
from .evaluation import accuracy, data_input_shape, dataset_for
from .graph import GraphView
from .latency_model import LatencyModel, group_costs
from .plan import PrunePlan
from .rounds import Round, one_round
from .session_inputs import check_same_inputs
from .start import Start, check_paths, load, start_run, with_label_mode
from .stats import Estimator, ModelStats, count
from .teacher import Teacher, describe, fidelity, output_kinds

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupShare:
    key: str
    params: float
    macs: float


@dataclass(frozen=True)
class ModelAnalysis:
    analysis: Analysis
    stats: ModelStats
    shares: dict[str, GroupShare]


@dataclass(frozen=True)
class PruneResult:
    output: Path | None                 # None: nothing was written (no output asked for)
    report_path: Path | None
    plan: PrunePlan
    before: ModelStats
    after: ModelStats
    equivalence_error: float
    latency_ratio: float | None
    report: dict = field(repr=False)
    rounds: tuple = field(default=(), repr=False)
    accuracy_before: float | None = None
    tolerance: verify.Tolerance = verify.FLOOR   # what pruned vs masked had to stay under
    notes: tuple[str, ...] = ()                  # what loading changed (opset upgrade, sort)
    model: onnx.ModelProto | None = field(default=None, repr=False)  # the verified result


def load_normalized(path, input_shape=None) -> tuple[onnx.ModelProto, onnx.ModelProto, Analysis]:
    loaded, normalized, analysis = load(path, input_shape)
    return loaded.model, normalized, analysis


def analyze(path, input_shape=None) -> ModelAnalysis:
    """Channel groups of a model with the share of params / MACs each one controls."""
    _, _, analysis = load(path, input_shape)
    return ModelAnalysis(analysis, count(analysis.view), group_shares(analysis))


def group_shares(analysis: Analysis) -> dict[str, GroupShare]:
    est = Estimator(analysis)
    base = est.estimate({})
    shares = {}
    for g in analysis.groups:
        kept = {m.value: np.setdiff1d(np.arange(analysis.view.shape(m.value)[m.axis]),
                                      m.elements.ravel()) for m in g.members}
        params, macs = est.removed(kept)
        shares[g.key] = GroupShare(g.key, _share(base.params, params), _share(base.macs, macs))
    return shares


def _share(base: int, removed: float) -> float:
    """The fraction of `base` a group's removal takes; 0 where there is nothing to take
    (a model whose MACs no op counts printed 100% for every group)."""
    return removed / base if base else 0.0


def prune(model, output=None, config: PruneConfig | None = None, plan_path=None,
          plan_out=None, **options) -> PruneResult:
    """Prune `model` (a path or an onnx.ModelProto, never modified) and return the verified
    smaller model as ``result.model``. With `output` it is also written there, atomically,
    with its JSON report beside it; without, nothing is written. `options` are PruneConfig
    fields: ``prune(m, ratio=0.5)``."""
    config = with_label_mode(replace(config or PruneConfig(), **options), model)
    _check_plan_args(config, plan_path, plan_out)   # before the defaults fill in a ratio
    config = config.checked()
    src = None if isinstance(model, onnx.ModelProto) else model_io.model_path(model)
    dst = None if output is None else Path(output)
    check_paths(model, src, dst, config.data)
    if plan_path is not None and dst is not None:
        preflight.check_not_over(dst, Path(plan_path), "plan")
    if config.data is not None:
        config = replace(config, input_shape=data_input_shape(
            model, config.input_shape, config.data.source, config.data.feeds))
    if config.latency or config.target_latency is not None:
        latency.providers_for(config.timing)  # a provider that is not there: say so first
    if plan_out is not None:
        preflight.check_side_output(Path(plan_out), "--plan-out", src, dst,
                                    config.data.source if config.data is not None else None)
    t0 = time.perf_counter()
    start = start_run(model if src is None else src, config, scores=plan_path is None)
    config = replace(config, timing=latency.timing_for(start.loaded.model, config.timing))
    rounds = _run_rounds(start, config, plan_path)
    last = rounds[-1]
    result_model, source, widened = _as_written(start, last, config.mask_only)
    writer = distributed.is_writer()   # several processes: rank 0 times, writes, reports
    timing = (latency.measure(start.analysis.view.model, last.model,
                              latency.timing_feeds(start.analysis.view, config.timing),
                              original_session=start.original_session, options=config.timing,
                              target=config.target_latency)
              if config.latency and writer else None)
    ratio = timing.ratio if timing is not None else None
    slower = timing.warning(config.round_to) if timing is not None else None
    warnings = [w for w in (slower, widened,
                            _short_of_target(config, start.before, last, ratio)) if w]
    after = ModelStats(last.params, last.macs)
    tolerance = max((r.tolerance or start.tolerance for r in rounds), key=lambda t: t.value)
    report_path = None
    with files.Outputs() as out:   # the model, its report and plan: all or none
        if dst is not None and writer:
            out.save(result_model, dst, source)
        sizes = (files.file_size(src) if src else start.loaded.as_read.ByteSize(),
                 files.file_size(out.staged(dst)) if dst and writer else result_model.ByteSize())
        data_report = report.json_report(
            src or "<in-memory model>", dst, config, rounds, start.before, after, ratio,
            start.accuracy, time.perf_counter() - t0, start.loaded.to_dict(), tolerance,
            warnings, sizes, _distillation(start, config))
        if dst is not None and writer:
            report_path = out.text(dst.with_suffix(".report.json"), report.to_json(data_report))
        if plan_out is not None and writer:
            out.text(plan_out, last.plan.to_json())
    return PruneResult(dst, report_path, last.plan, start.before, after, last.error, ratio,
                       data_report, tuple(rounds), start.accuracy, tolerance,
                       start.loaded.notes, result_model)


def _as_written(start: Start, last: Round, mask_only: bool):
    """(the model to write, its bytes where the check read the same model, the warning
    where float16 weights were widened): the last round's cut (or masked model) with the
    input's float16 weights and fixed batch given back."""
    result_model = last.masked if mask_only else last.model
    source = None if mask_only else last.source
    result_model, widened = half.weights_back(start.loaded.model, start.analysis.view,
                                              result_model)
    declared = batch.declare(start.loaded.model, result_model)
    source = source if declared is result_model else None   # (bytes of the undeclared one)
    source = None if widened is not None else source
    return declared, source, widened


def _check_plan_args(config: PruneConfig, plan_path, plan_out) -> None:
    """--plan / --plan-out go with one round; a plan fixes the cut, so no target beside
    it; the plan is read before the work."""
    if (plan_path or plan_out) and config.rounds > 1:
        raise InputError("a plan describes one round - use --rounds 1 with --plan/--plan-out")
    if plan_path is not None:
        given = [flag for flag, v in (("--eta", config.eta), ("--ratio", config.ratio),
                                      ("--target-macs", config.target_macs),
                                      ("--target-params", config.target_params),
                                      ("--target-latency", config.target_latency),
                                      ("--round-to", config.round_to),
                                      ("--allocation", config.allocation),
                                      ("--group-ratio", config.group_ratios),
                                      ("--criterion", config.criterion != "auto")) if v]
        if given:
            raise InputError(f"--plan fixes the channels to cut, so {given[0]} would be "
                             "ignored - drop one of them")
        PrunePlan.load(plan_path)


def _short_of_target(config: PruneConfig, before: ModelStats, last,
                     latency_ratio: float | None = None, cut_from=None) -> str | None:
    """A warning where the cut stayed above a MACs, params or latency target (latency:
    by more than 0.05, the timing's noise here), or cut nothing from `cut_from` (a grown
    model's cost; default `before`, the input's)."""
    limits = "--min-keep, --round-to and the groups kept whole bound the cut"
    target = config.target_latency
    if target is not None and latency_ratio is not None and latency_ratio > target + 0.05:
        return (f"the cut runs at {latency_ratio:.3f} of the latency measured here, above "
                f"--target-latency {target:g}: the parts no channel cut shortens, and "
                f"{limits}")
    for flag, what, target, kept, total in (
            ("--target-macs", "MACs", config.target_macs, last.macs, before.macs),
            ("--target-params", "params", config.target_params, last.params, before.params)):
        if target is not None and kept > (target + 0.01) * total:
            return (f"the cut keeps {kept / max(total, 1):.3f} of the {what}, above "
                    f"{flag} {target:g}: {limits}")
    if last.params >= (cut_from or before).params and config.target_latency is None:
        if getattr(getattr(last, "plan", None), "removed_channels", 0):
            return (f"the cut holds {last.params} params, the input {before.params}: a "
                    "weight that several nodes read gets a copy in each whose cut differs - "
                    "cut more, or keep the groups that read it whole (--ignore)")
        return f"nothing was cut: {limits}"
    return None


def _distillation(start, config: PruneConfig) -> str | None:
    teacher = start.data.teacher if start.data is not None else None
    if teacher is None or config.train.epochs <= 0 or (
            config.data.labels and config.train.distill_weight <= 0):
        return None
    return describe(teacher.kinds)


def _run_rounds(start: Start, config: PruneConfig, plan_path) -> list[Round]:
    rounds: list[Round] = []
    analysis = start.analysis
    widths = {g.key: g.width for g in analysis.groups}
    for k in range(1, config.rounds + 1):
        if k > 1:
            analysis = analyze_model(rounds[-1].model, config.input_shape).keeping(config.ignore)
            if not analysis.prunable:
                break
        rounds.append(one_round(analysis, config, start.data, k, plan_path, start.before,
                                start.tolerance, widths))
    return rounds


@dataclass(frozen=True)
class Comparison:
    a: ModelStats
    b: ModelStats
    bytes_a: int
    bytes_b: int
    latency_a: float
    latency_b: float
    fidelity: dict | None = None      # output -> relative error, top-1 agreement (b vs a)
    images: int = 0                   # inputs the fidelity was measured on
    source: str | None = None
    paired_ratio: float | None = None  # median of t(b) / t(a) over rounds run back to back

    @property
    def latency_ratio(self) -> float:
        """The paired ratio where measured: the ratio of two medians swung from 0.15 to
        1.2 between runs on a busy machine, the paired one stays within a few percent."""
        if self.paired_ratio is not None:
            return self.paired_ratio
        return self.latency_b / self.latency_a


def compare(path_a, path_b, input_shape=None, repeats: int = 30,
            data: DataOptions | None = None) -> Comparison:
    """Params, MACs, file size and onnxruntime latency of two models, and their ratios;
    with `data`, the fidelity of b to a (teacher.fidelity) on all of its inputs (labels,
    if any, are not used)."""
    check_type("data", data, DataOptions)
    check_count("repeats", repeats)
    preflight.check_data(data.source if data is not None else None)
    a, b = model_io.open_model(path_a).model, model_io.open_model(path_b).model
    sizes = [m.ByteSize() if isinstance(p, onnx.ModelProto) else files.file_size(p)
             for m, p in ((a, path_a), (b, path_b))]
    path_a, path_b = (p if not isinstance(p, onnx.ModelProto) else f"<in-memory model {n}>"
                      for p, n in ((path_a, "a"), (path_b, "b")))
    if input_shape is None:
        input_shape = _sizes_b_fixes(a, b)
    input_shape = data_input_shape(a, input_shape, data.source if data is not None else None,
                                   data.feeds if data is not None else ())
    view_a = GraphView(a, input_shape)
    # both counted at the sizes both run at: b's free sizes were counted at 224 where a
    # fixes 64 (MACs ratio 10.085 for two copies of one model)
    # (a 0-D input, such as a temperature, has no sizes to give: --input-shape refuses ())
    input_shape = {spec.name: spec.shape for spec in view_a.inputs if spec.shape}
    sessions = [verify.make_session(a, str(path_a)), verify.make_session(b, str(path_b))]
    check_same_inputs(*sessions, str(path_a), str(path_b))
    ds = None
    if data is not None:
        ds = dataset_for(view_a, data.source, data.mean, data.std, data.resize, data.limit,
                         workers=data.workers, labels=False, feeds=data.feeds)
    la, lb = latency.medians(sessions, view_a.probe_feeds, min_runs=repeats, max_runs=repeats)
    paired = latency.paired_ratio(sessions, view_a.probe_feeds, budget_s=latency.TARGET_BUDGET_S)
    # counted and analysed on the normalised graphs (a weight behind a Cast is a constant
    # there; the channel analysis reads only normalised graphs)
    normalized = [model_io.normalize(m) for m in (a, b)]
    stats = [count(GraphView(m, input_shape)) for m in normalized]
    cmp = Comparison(*stats, *sizes, la, lb, paired_ratio=paired)
    if ds is None:
        return cmp
    teacher = Teacher(a, output_kinds(analyze_model(normalized[0], input_shape)), str(path_a))
    batches = (x for x, _ in iter_batches(ds, data.batch_size))
    return replace(cmp, fidelity=fidelity(teacher, b, batches, str(path_b)), images=len(ds),
                   source=ds.source)


def _sizes_b_fixes(a: onnx.ModelProto, b: onnx.ModelProto) -> dict | None:
    """b's input shapes where b fixes a size a leaves free (a copy exported at one size):
    both models run at them. a's free sides were probed at 224 (or the data's size),
    which b refused with an onnxruntime error."""
    def fixed(model):
        inits = {t.name for t in model.graph.initializer}
        return {v.name: [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                         for d in v.type.tensor_type.shape.dim]
                for v in model.graph.input if v.name not in inits}
    dims_a, dims_b = fixed(a), fixed(b)
    # the batch too: b exported at batch 4 refused the probe's batch of 1
    if not any(p is None and q is not None for name, sizes in dims_a.items()
               for p, q in zip(sizes, dims_b.get(name, []))):
        return None
    return {spec.name: spec.shape for spec in GraphView(b).inputs if spec.shape}


@dataclass(frozen=True)
class LatencyProfile:
    total_seconds: float
    fixed_seconds: float
    block: int
    groups: list[dict]          # latency_model.group_costs rows, largest share first


def profile(path, input_shape=None, options: LatencyOptions = LatencyOptions(),
            runs: int = 20) -> LatencyProfile:
    """Per channel group: how much of the model's onnxruntime latency its width controls
    here, and the estimated latency at each kept width."""
    check_type("options", options, LatencyOptions)
    check_count("runs", runs)
    options = options.checked()
    latency.providers_for(options)
    original, _, analysis = load_normalized(path, input_shape)
    options = latency.timing_for(original, options)
    model = LatencyModel.profile(analysis, latency.timing_feeds(analysis.view, options), runs,
                                 options)
    return LatencyProfile(model.total, model.fixed, model.block, group_costs(analysis, model))


def evaluate(path, data: DataOptions, input_shape=None) -> tuple[float, int]:
    """Top-1 accuracy of the model at `path` on all of `data` (onnxruntime)."""
    preflight.check_data(data.source)
    model = model_io.open_model(path).model
    view = GraphView(model, data_input_shape(model, input_shape, data.source, data.feeds))
    ds = dataset_for(view, data.source, data.mean, data.std, data.resize,
                     data.limit, workers=data.workers, labels=True, feeds=data.feeds)
    return accuracy(model, ds, data.batch_size), len(ds)
