"""The one-way pipeline: load -> analyse -> score -> plan -> cut -> verify -> save."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from . import model as model_io
from . import preflight, repair, report, surgery, verify
from .analysis import Analysis, analyze_model
from .analysis.features import final_hidden_layer
from .config import DataOptions, PruneConfig, TrainOptions
from .data import iter_batches, split
from .errors import InputError
from .evaluation import accuracy, dataset_for
from .finetune import train_model
from .graph import GraphView
from .importance import Evidence, get_criterion
from .plan import (PrunePlan, check_plan, kept_elements, model_digest, plan_by_ratio,
                   plan_by_threshold, plan_for_target)
from .stats import Estimator, ModelStats, count, param_sizes

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
    output: Path
    report_path: Path
    plan: PrunePlan
    before: ModelStats
    after: ModelStats
    equivalence_error: float
    latency_ratio: float | None
    report: dict = field(repr=False)
    rounds: tuple = field(default=(), repr=False)
    accuracy_before: float | None = None


def load_normalized(path, input_shape=None) -> tuple[onnx.ModelProto, onnx.ModelProto, Analysis]:
    original = model_io.load(path)
    logger.info("loaded %s (%d nodes)", path, len(original.graph.node))
    normalized = model_io.normalize(original)
    analysis = analyze_model(normalized, input_shape)
    logger.info("analysed: %d channel groups, %d prunable", len(analysis.groups),
                len(analysis.prunable))
    return original, normalized, analysis


def analyze(path, input_shape=None) -> ModelAnalysis:
    """Channel groups of a model with the share of params / MACs each one controls."""
    _, _, analysis = load_normalized(path, input_shape)
    return ModelAnalysis(analysis, count(analysis.view), group_shares(analysis))


def group_shares(analysis: Analysis) -> dict[str, GroupShare]:
    est = Estimator(analysis)
    base = est.estimate({})
    shares = {}
    for g in analysis.groups:
        kept = {m.value: np.setdiff1d(np.arange(analysis.view.shape(m.value)[m.axis]),
                                      m.elements.ravel()) for m in g.members}
        after = est.estimate(kept)
        shares[g.key] = GroupShare(g.key, 1 - after.params / max(base.params, 1),
                                   1 - after.macs / max(base.macs, 1))
    return shares


def make_plan(analysis: Analysis, config: PruneConfig, digest: str, evidence: Evidence,
              round_no: int = 1, base: ModelStats | None = None
              ) -> tuple[PrunePlan, dict[str, np.ndarray]]:
    """Score with the criterion and turn the scores into this round's plan.

    Over K rounds: ratio r removes ``1 - (1-r)^(1/K)`` of the current widths per round;
    eta grows linearly (``eta * k``); a target fraction f of the original cost is reached
    as ``f^(k/K)`` after round k."""
    criterion = get_criterion(config.criterion, config.seed)
    scores = criterion.score(analysis, evidence)
    meta = {"criterion": config.criterion, "seed": config.seed, "round": round_no}
    if getattr(criterion, "report", None):
        meta["criterion_report"] = criterion.report
    common = dict(min_keep=config.min_keep, round_to=config.round_to, meta=meta)
    k, rounds = round_no, config.rounds
    if config.eta is not None:
        return plan_by_threshold(analysis, scores, config.eta * k, digest, **common), scores
    if config.ratio is not None:
        ratio = 1 - (1 - config.ratio) ** (1 / rounds)
        return plan_by_ratio(analysis, scores, ratio, digest, **common), scores
    est = Estimator(analysis)
    field_name, fraction = (("macs", config.target_macs) if config.target_macs is not None
                            else ("params", config.target_params))
    now = getattr(est.estimate({}), field_name)
    original = getattr(base, field_name) if base is not None else now
    goal = min(1.0, fraction ** (k / rounds) * original / max(now, 1))

    def cost(plan: PrunePlan) -> float:
        return getattr(est.estimate(kept_elements(analysis, plan)), field_name)

    return plan_for_target(analysis, scores, digest, cost, goal, **common), scores


@dataclass(frozen=True)
class Round:
    number: int
    plan: PrunePlan
    groups: list[dict]
    model: onnx.ModelProto
    masked: onnx.ModelProto
    error: float
    params: int
    macs: int
    accuracy_cut: float | None = None
    accuracy_tuned: float | None = None
    repair: dict | None = None          # what the repair changed (None: no repair)


@dataclass(frozen=True)
class Splits:
    train: object
    val: object


def load_data(view: GraphView, config: PruneConfig) -> Splits | None:
    if config.data is None:
        return None
    opts = config.data
    ds = dataset_for(view, opts.source, opts.mean, opts.std, opts.resize, opts.limit, config.seed,
                     opts.workers)
    if opts.val_split > 0:
        train, val = split(ds, opts.val_split, config.seed)
    else:
        train = val = ds
    logger.info("data: %d training and %d held-out images, %d classes from %s",
                len(train.y), len(val.y), ds.num_classes, ds.source)
    return Splits(train, val)


def _evidence(analysis: Analysis, config: PruneConfig, data: Splits | None) -> Evidence:
    if data is None:
        return Evidence(seed=config.seed)
    per_class = config.data.per_class
    scoring = _per_class(data.train, per_class, config.seed)
    criterion = get_criterion(config.criterion, config.seed)
    needs_feature = getattr(criterion, "needs_feature", False) or config.feature_tensor is not None
    feature = final_hidden_layer(analysis.view, config.feature_tensor) if needs_feature else None
    return Evidence(scoring, feature, config.train.device, config.data.batch_size, config.seed)


def _per_class(ds, per_class: int, seed: int):
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.permutation(np.flatnonzero(ds.y == c))[:per_class]
                          for c in np.unique(ds.y)])
    return ds.subset(np.sort(idx))


REPAIR_IMAGES = 1024  # at most this many scoring images feed the least-squares repair


def _repair(analysis: Analysis, kept, data: Splits | None, config: PruneConfig):
    """(bias deltas, weight replacements) for the cut, or (None, None) without repair."""
    if data is None or config.repair == "none" or not kept:
        return None, None
    values = repair.values_to_measure(analysis, kept)
    sample = _per_class(data.train, config.data.per_class, config.seed)
    batches = (x for x, _ in iter_batches(sample, config.data.batch_size))
    means = repair.channel_means(analysis.view.model, values, batches)
    deltas = repair.bias_deltas(analysis, kept, means)
    if config.repair != "lsq":
        return deltas, None
    rng = np.random.default_rng(config.seed)
    pick = np.sort(rng.permutation(len(sample.y))[:REPAIR_IMAGES])
    weights, deltas = repair.reconstruct(analysis, kept, deltas, sample.subset(pick).x,
                                         config.train.device, batch_size=config.data.batch_size,
                                         seed=config.seed)
    return deltas, weights


def _one_round(analysis: Analysis, config: PruneConfig, data: Splits | None, k: int,
               plan_path, base: ModelStats) -> Round:
    digest = model_digest(analysis.view.model)
    scores: dict[str, np.ndarray] = {}
    if plan_path is not None:
        plan = PrunePlan.load(plan_path)
        check_plan(plan, analysis, digest)
    else:
        evidence = _evidence(analysis, config, data)
        plan, scores = make_plan(analysis, config, digest, evidence, k, base)
    kept = kept_elements(analysis, plan)
    deltas, weights = _repair(analysis, kept, data, config)
    repaired = None if deltas is None else {
        "mode": config.repair, "layers_refitted": len(weights or {}),
        "biases_changed": len(deltas)}
    pruned = surgery.cut(analysis, kept, deltas, weights)
    masked = surgery.mask(analysis, kept, deltas, weights)
    logger.info("round %d: cut %d channels in %d groups", k, plan.removed_channels,
                sum(1 for v in plan.removed.values() if v))
    verify.check(pruned)
    feeds = analysis.view.check_feeds(config.seed)
    err = verify.check_equivalent(verify.run(pruned, feeds, "pruned model"),
                                  verify.run(masked, feeds, "masked model"))
    logger.info("verified: pruned == masked original (relative error %.1e)", err)
    stats = Estimator(analysis).estimate(kept)
    acc_cut = acc_tuned = None
    if data is not None:
        acc_cut = accuracy(pruned, data.val)
        logger.info("round %d: accuracy right after the cut %.4f", k, acc_cut)
        if config.train.epochs > 0:
            pruned = train_model(pruned, data.train, config.train, config.seed + k)
            acc_tuned = accuracy(pruned, data.val)
            logger.info("round %d: accuracy after fine-tuning %.4f", k, acc_tuned)
            if acc_tuned < acc_cut:
                logger.warning("round %d: fine-tuning lowered the held-out accuracy (%.4f -> "
                               "%.4f); the fine-tuned model is the one written - try a lower "
                               "--lr or fewer --finetune-epochs", k, acc_cut, acc_tuned)
    params = sum(param_sizes(pruned).values())
    groups = report.group_rows(analysis, plan, scores)
    return Round(k, plan, groups, pruned, masked, err, params, stats.macs, acc_cut, acc_tuned,
                 repaired)


def prune(path, output, config: PruneConfig = PruneConfig(), plan_path=None,
          plan_out=None) -> PruneResult:
    """Prune the model at `path` and write a verified smaller model to `output`."""
    config = config.checked()
    src, dst = Path(path), Path(output)
    if (plan_path or plan_out) and config.rounds > 1:
        raise InputError("a plan describes one round - use --rounds 1 with --plan/--plan-out")
    preflight.check_output(src, dst)
    if plan_out is not None:
        preflight.check_writable(Path(plan_out))
    preflight.check_data(config.data.source if config.data is not None else None)
    t0 = time.perf_counter()
    original, normalized, analysis = load_normalized(src, config.input_shape)
    if not analysis.prunable:
        raise InputError(f"{src}: nothing can be pruned ({_first_reasons(analysis)}) - "
                         "run 'gpp-onnx analyze' to see why each channel group is kept")
    _check_normalized(analysis.view, original)
    data = load_data(analysis.view, config)
    before = count(analysis.view)
    acc_before = accuracy(normalized, data.val) if data is not None else None
    rounds: list[Round] = []
    for k in range(1, config.rounds + 1):
        if k > 1:
            analysis = analyze_model(rounds[-1].model, config.input_shape)
            if not analysis.prunable:
                break
        rounds.append(_one_round(analysis, config, data, k, plan_path, before))
    last = rounds[-1]
    ratio = _latency(original, last.model, analysis.view.probe_feeds) if config.latency else None
    model_io.save(last.masked if config.mask_only else last.model, dst)
    after = ModelStats(last.params, last.macs)
    data_report = report.json_report(src, dst, config, rounds, before, after, ratio, acc_before,
                                     time.perf_counter() - t0)
    report_path = write_text(dst.with_suffix(".report.json"), report.to_json(data_report))
    if plan_out is not None:
        write_text(Path(plan_out), last.plan.to_json())
    return PruneResult(dst, report_path, last.plan, before, after, last.error, ratio,
                       data_report, tuple(rounds), acc_before)


def _check_normalized(view: GraphView, original: onnx.ModelProto) -> None:
    """normalize() must not change what the model computes."""
    verify.check_equivalent(view.probe_outputs, verify.run(original, view.probe_feeds),
                            "normalised model", "the input model")


def _latency(original: onnx.ModelProto, pruned: onnx.ModelProto, feeds) -> float:
    sessions = [verify.make_session(original, "input model"),
                verify.make_session(pruned, "pruned model")]
    t_original, t_pruned = verify.latency(sessions, feeds, budget_s=1.0)
    return t_pruned / t_original


def _first_reasons(analysis: Analysis) -> str:
    reasons = sorted({g.reason.split(": ", 1)[-1] for g in analysis.groups if g.reason})
    return "; ".join(reasons[:3]) or "no channel groups"


def write_text(path: Path, text: str) -> Path:
    """Atomic text write (temporary file in the same folder, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class Comparison:
    a: ModelStats
    b: ModelStats
    bytes_a: int
    bytes_b: int
    latency_a: float
    latency_b: float

    @property
    def latency_ratio(self) -> float:
        return self.latency_b / self.latency_a


def compare(path_a, path_b, input_shape=None, repeats: int = 30) -> Comparison:
    """Params, MACs, file size and onnxruntime latency of two models, and their ratios."""
    a, b = model_io.load(path_a), model_io.load(path_b)
    view_a, view_b = GraphView(a, input_shape), GraphView(b, input_shape)
    sessions = [verify.make_session(a, str(path_a)), verify.make_session(b, str(path_b))]
    la, lb = verify.latency(sessions, view_a.probe_feeds, min_runs=repeats, max_runs=repeats)
    return Comparison(count(view_a), count(view_b), Path(path_a).stat().st_size,
                      Path(path_b).stat().st_size, la, lb)


def evaluate(path, data: DataOptions) -> tuple[float, int]:
    """Top-1 accuracy of the model at `path` on all of `data` (onnxruntime)."""
    preflight.check_data(data.source)
    model = model_io.load(path)
    ds = dataset_for(GraphView(model), data.source, data.mean, data.std, data.resize,
                     data.limit, workers=data.workers)
    return accuracy(model, ds, data.batch_size), len(ds.y)


def demo(folder: Path, ratio: float = 0.5, epochs: float = 10, finetune: float = 2,
         seed: int = 0) -> PruneResult:
    """The README's main job on embedded data: train the digits CNN, prune it with the
    GPP criterion, fine-tune, and report accuracy, params, MACs and latency."""
    from .samples import digits_cnn

    folder.mkdir(parents=True, exist_ok=True)
    data = DataOptions("digits")
    model = digits_cnn(seed)
    splits = load_data(GraphView(model), PruneConfig(data=data, seed=seed))
    logger.info("training the sample digits CNN (%g epochs)", epochs)
    trained = train_model(model, splits.train, TrainOptions(epochs=epochs, lr=0.05), seed,
                          desc="training")
    src = model_io.save(trained, folder / "digits_cnn.onnx")
    logger.info("wrote the trained sample model to %s", src)
    config = PruneConfig(ratio=ratio, data=data, train=TrainOptions(epochs=finetune),
                         seed=seed)
    return prune(src, folder / "digits_cnn.pruned.onnx", config,
                 plan_out=folder / "digits_cnn.plan.json")
