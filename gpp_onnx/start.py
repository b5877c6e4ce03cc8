"""The start every run shares (prune, gpp, push, StepPruner): paths and data checked
before the work, the model loaded, normalised and analysed, what cannot be pruned
refused, the equivalence tolerance measured, the data loaded and the starting accuracy
taken (``start_run``)."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx

from . import distributed, latency, preflight, skeleton, verify
from . import model as model_io
from .analysis import Analysis, analyze_model
from .config import DataOptions, PruneConfig
from .errors import InputError, UnsupportedModelError
from .evaluation import accuracy, check_class_scores
from .plan import model_digest
from .sources import has_labels
from .splits import load_data
from .stats import ModelStats, count

logger = logging.getLogger(__name__)


def load(model, input_shape) -> tuple[model_io.Loaded, onnx.ModelProto, Analysis]:
    """`model`: a path or an in-memory ModelProto."""
    loaded = model_io.open_model(model)
    logger.info("loaded %s (%d nodes)", "the model" if isinstance(model, onnx.ModelProto)
                else model, len(loaded.model.graph.node))
    normalized = model_io.normalize(loaded.model)
    distributed.check_same("models", {"model": model_digest(normalized)},
                           "start every process with the same model")
    analysis = analyze_model(normalized, input_shape)
    logger.info("analysed: %d channel groups, %d prunable", len(analysis.groups),
                len(analysis.prunable))
    return loaded, normalized, analysis


def with_label_mode(config: PruneConfig, model=None) -> PruneConfig:
    """Settle whether the data's labels are used (DataOptions.labels None: where the source
    has them), before the criterion is chosen and anything is loaded (`model`, a path or
    a ModelProto: the names of its inputs where it has several, ``sources.has_labels``)."""
    data = config.data
    if not isinstance(data, DataOptions) or data.labels is not None:
        return config   # (a data= of another type is refused by PruneConfig.checked)
    preflight.check_data(data.source)
    labels = has_labels(data.source)
    if labels and str(data.source).lower().endswith(".npz"):   # its y may be an input's
        labels = has_labels(data.source, _several_inputs(model))
    return replace(config, data=replace(data, labels=labels))


def _several_inputs(model) -> tuple[str, ...]:
    """The names of `model`'s inputs where it has several (none where it has one or cannot
    be read: loading it says why)."""
    if model is None:
        return ()
    try:
        proto = model if isinstance(model, onnx.ModelProto) else onnx.load_model(
            str(model), load_external_data=False)
    except Exception:
        return ()
    inits = {t.name for t in proto.graph.initializer}
    names = tuple(v.name for v in proto.graph.input if v.name not in inits)
    return names if len(names) > 1 else ()


@dataclass(frozen=True)
class Start:
    """Everything a run needs before its first cut, checked."""
    loaded: model_io.Loaded
    normalized: onnx.ModelProto
    analysis: Analysis
    tolerance: verify.Tolerance
    data: object                         # splits.Splits or None
    before: ModelStats
    accuracy: float | None
    # the normalised original, ORT-optimised: its noise measure's session, kept for the
    # latency measure (None without it). The pruned model is cut from the normalised one,
    # whose folded constants ORT's optimiser folds in the file's model too.
    original_session: object = field(default=None, repr=False, compare=False)


def start_run(model, config: PruneConfig, per_class: int = 0, scores: bool = True) -> Start:
    """Load, normalise and analyse; refuse what cannot be pruned (and, where channels will
    be `scores`d, a criterion that cannot find its feature); measure the tolerance; load
    the data (every class with `per_class` training images) and the starting accuracy."""
    loaded, normalized, analysis = load(model, config.input_shape)
    check_declared_shapes(normalized, "the model" if isinstance(model, onnx.ModelProto)
                          else model)
    distributed.check_same("options", {"options": config.to_dict()},
                           "start every process with the same options")
    analysis = analysis.keeping(config.ignore)
    for name, _ in config.group_ratios:  # a name that designates nothing: before the work
        analysis.find_group(name)
    latency.timing_for(loaded.model, config.timing)   # a --latency-batch it refuses, too
    if not analysis.prunable:
        where = "the model" if isinstance(model, onnx.ModelProto) else model
        raise InputError(f"{where}: nothing can be pruned ({first_reasons(analysis)}) - "
                         "run 'gpp-onnx analyze' to see why each channel group is kept")
    check_precision(normalized, config)
    if scores:
        check_feature(analysis, config)
    # the noise is measured on the shape probe's inputs, whose unoptimised outputs the
    # probe has (and whose optimised run warms the latency measure's session up); the
    # unchanged check, where it must run both models, uses the check inputs
    view = analysis.view
    optimised = verify.make_session(view.detached, "input model") if config.latency else None
    tolerance = verify.measure_tolerance(normalized, view.probe_feeds, source=view.detached,
                                         plain=view.probe_outputs, optimised_session=optimised)
    feeds = view.check_feeds(config.seed)
    loaded.check_unchanged(normalized, feeds, tolerance,
                           lambda: view.plain_outputs(feeds, "normalised model"), view.const)
    data = load_data(analysis.view, config, analysis, per_class)
    acc = accuracy(normalized, data.val) if data is not None and data.val.labelled else None
    if acc is not None:
        warn_if_chance(acc, len(set(data.val.y.tolist())))  # the classes present
    return Start(loaded, normalized, analysis, tolerance, data, count(analysis.view), acc,
                 optimised)


def check_declared_shapes(normalized: onnx.ModelProto, where) -> None:
    """The outputs' declared sizes agree with what the nodes compute: the written model
    keeps them and must pass the full checker, which otherwise refused it only after the
    cut (and the scoring and repair before it), as a fault of the pruned model. Inferred
    on the skeleton with the outputs' shapes left open (the full checker on the whole
    model cost 0.6 s of a resnet50 run)."""
    bare = skeleton.strip(normalized)[0]
    for out in bare.graph.output:
        out.type.tensor_type.ClearField("shape")
    try:
        computed = onnx.shape_inference.infer_shapes(bare, strict_mode=False).graph.output
    except Exception:   # (no inferable shapes: nothing to compare)
        return
    for said, got in zip(normalized.graph.output, computed):
        a, b = _dims(said), _dims(got)
        if a is None or b is None:
            continue
        if len(a) != len(b) or any(x and y and x != y for x, y in zip(a, b)):
            raise InputError(f"{where}: output '{said.name}' is declared {_shown(a)} but its "
                             f"nodes compute {_shown(b)}: its declared shapes contradict the "
                             "graph - fix or remove the stale output shape, or export the "
                             "model again")


def _dims(value: onnx.ValueInfoProto) -> list[int] | None:
    t = value.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else 0 for d in t.shape.dim]


def _shown(dims: list[int]) -> str:
    return "(" + ", ".join(str(d) if d else "?" for d in dims) + ")"


def check_feature(analysis: Analysis, config: PruneConfig) -> None:
    """A criterion that reads the final hidden layer finds it before the data is loaded
    (InputError naming --feature-tensor where it cannot), after labels are known to fit
    the model's first output."""
    if config.data is None:
        return
    from .analysis.features import final_hidden_layer
    from .evaluation import check_inputs_source
    from .importance import get_criterion

    check_inputs_source(analysis.view, config.data.source, config.data.feeds)   # first

    if getattr(get_criterion(config.criterion, config.seed), "needs_feature", False) \
            or config.feature_tensor is not None:
        # labels need (N, classes) scores: a per-position (N, T, K) output was sent to
        # --feature-tensor first, which only led to this refusal
        if config.data.labels:
            check_class_scores(analysis.view)
        final_hidden_layer(analysis.view, config.feature_tensor)


def warn_if_chance(acc: float, classes: int) -> None:
    """An input model at chance on its own data: the labels or the scaling do not match."""
    if classes >= 3 and acc <= 1.5 / classes:
        logger.warning("the input model's held-out accuracy is %.3f, about chance for %d "
                       "classes: check that the labels follow the model's class order and "
                       "the input scaling (--mean/--std)", acc, classes)


def check_precision(model: onnx.ModelProto, config: PruneConfig) -> None:
    low = verify.low_precision(model) or _float64(model)
    if low is not None and config.data is not None:
        raise UnsupportedModelError(
            f"the model holds {low} tensors and --data runs it through the float32 torch "
            "backend (scoring, repair, training) - give the float32 version of the model "
            "(or, to prune this one, prune it without --data, e.g. --criterion l1)")


def _float64(model: onnx.ModelProto) -> str | None:
    """'float64' where the model takes double input (onnxruntime runs double MatMul and
    Gemm; the torch backend would feed such a model float32 images and fail)."""
    if any(v.type.tensor_type.elem_type == onnx.TensorProto.DOUBLE for v in model.graph.input):
        return "float64"
    return None


def check_paths(model, src: Path | None, dst: Path | None, data: DataOptions | None) -> None:
    """Output writable with room, data readable: checked before any expensive work."""
    if dst is not None:
        preflight.check_output(src, dst, model.ByteSize() if src is None else 0)
    preflight.check_data(data.source if data is not None else None, dst)


def first_reasons(analysis: Analysis) -> str:
    """Up to three distinct reasons, each once however many nodes it names (a graph of
    fused ops gave the same reason three times, for three nodes)."""
    reasons: dict[str, str] = {}
    for g in analysis.groups:
        if g.reason:
            reason = g.reason.split(": ", 1)[-1]
            reasons.setdefault(re.sub(r" \(node [^)]*\)$", "", reason), reason)
    return "; ".join(sorted(reasons.values())[:3]) or "no channel groups"
