"""The one-way pipeline: load -> analyse -> score -> plan -> cut -> verify -> save."""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from . import model as model_io
from . import surgery, verify
from .analysis import Analysis, analyze_model
from .config import PruneConfig
from .errors import InputError
from .graph import GraphView, random_feeds
from .importance import get_criterion
from .plan import (PrunePlan, check_plan, kept_elements, model_digest, plan_by_ratio,
                   plan_for_target)
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


def make_plan(analysis: Analysis, config: PruneConfig, digest: str) -> PrunePlan:
    scores = get_criterion(config.criterion, config.seed).score(analysis)
    meta = {"criterion": config.criterion, "seed": config.seed}
    common = dict(min_keep=config.min_keep, round_to=config.round_to, meta=meta)
    if config.ratio is not None:
        return plan_by_ratio(analysis, scores, config.ratio, digest, **common)
    est = Estimator(analysis)
    field_name, fraction = (("macs", config.target_macs) if config.target_macs is not None
                            else ("params", config.target_params))

    def cost(plan: PrunePlan) -> float:
        return getattr(est.estimate(kept_elements(analysis, plan)), field_name)

    return plan_for_target(analysis, scores, digest, cost, fraction, **common)


def prune(path, output, config: PruneConfig = PruneConfig(), plan_path=None,
          plan_out=None) -> PruneResult:
    """Prune the model at `path` and write a verified smaller model to `output`."""
    config = config.checked()
    src, dst = Path(path), Path(output)
    _check_output(src, dst)
    t0 = time.perf_counter()
    original, normalized, analysis = load_normalized(src, config.input_shape)
    if not analysis.prunable:
        raise InputError(f"{src}: nothing can be pruned ({_first_reasons(analysis)}) - "
                         "run 'gpp-onnx analyze' to see why each channel group is kept")
    digest = model_digest(normalized)
    if plan_path is not None:
        plan = PrunePlan.load(plan_path)
        check_plan(plan, analysis, digest)
    else:
        plan = make_plan(analysis, config, digest)
    kept = kept_elements(analysis, plan)
    pruned, masked = surgery.cut(analysis, kept), surgery.mask(analysis, kept)
    logger.info("cut %d channels in %d groups", plan.removed_channels,
                sum(1 for v in plan.removed.values() if v))
    feeds = random_feeds(analysis.view.inputs, seed=config.seed)
    verify.check(pruned)
    verify.equivalence(normalized, original, feeds, where="normalised model")
    err = verify.equivalence(pruned, masked, feeds)
    logger.info("verified: pruned == masked original (relative error %.1e)", err)
    before = count(analysis.view)
    after = ModelStats(sum(param_sizes(pruned).values()), Estimator(analysis).estimate(kept).macs)
    ratio = _latency(original, pruned, feeds) if config.latency else None
    result_model = masked if config.mask_only else pruned
    model_io.save(result_model, dst)
    report = _report(src, dst, config, plan, before, after, err, ratio, analysis,
                     time.perf_counter() - t0)
    report_path = _write_json(dst.with_suffix(".report.json"), report)
    if plan_out is not None:
        _write_text(Path(plan_out), plan.to_json())
    return PruneResult(dst, report_path, plan, before, after, err, ratio, report)


def _check_output(src: Path, dst: Path) -> None:
    if dst.suffix == "":
        raise InputError(f"output {dst} has no extension - name it like model.pruned.onnx")
    same = dst.resolve() == src.resolve() or (dst.exists() and src.exists()
                                               and os.path.samefile(src, dst))
    if same:
        raise InputError(f"output {dst} is the input model - choose another path with -o; "
                         "gpp-onnx never overwrites its input")


def _first_reasons(analysis: Analysis) -> str:
    reasons = sorted({g.reason.split(": ", 1)[-1] for g in analysis.groups if g.reason})
    return "; ".join(reasons[:3]) or "no channel groups"


def _latency(original, pruned, feeds) -> float | None:
    try:
        return verify.latency_ratio(original, pruned, feeds, repeats=20)[2]
    except Exception as err:  # latency is information, never a reason to fail
        logger.warning("latency not measured: %s", err)
        return None


def _report(src, dst, config, plan, before, after, err, latency, analysis, seconds) -> dict:
    kept = {k: plan.widths[k] - len(v) for k, v in plan.removed.items()}
    return {
        "input": str(src), "output": str(dst), "config": config.to_dict(),
        "seconds": round(seconds, 3),
        "before": {"params": before.params, "macs": before.macs,
                   "file_bytes": src.stat().st_size},
        "after": {"params": after.params, "macs": after.macs,
                  "file_bytes": dst.stat().st_size},
        "ratios": {"params": after.params / max(before.params, 1),
                   "macs": after.macs / max(before.macs, 1),
                   "latency": latency},
        "equivalence_relative_error": err,
        "groups": [{"key": g.key, "width": g.width, "kept": kept.get(g.key, g.width),
                    "prunable": g.prunable, "reason": g.reason} for g in analysis.groups],
        "plan": json.loads(plan.to_json()),
    }


def _write_json(path: Path, data: dict) -> Path:
    return _write_text(path, json.dumps(data, indent=1, default=_jsonable))


def _jsonable(obj):
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, (tuple, set)):
        return list(obj)
    return str(obj)


def _write_text(path: Path, text: str) -> Path:
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
    feeds = random_feeds(view_a.inputs)
    la, lb, _ = verify.latency_ratio(a, b, feeds, repeats=repeats)
    return Comparison(count(view_a), count(view_b), Path(path_a).stat().st_size,
                      Path(path_b).stat().st_size, la, lb)


def demo(folder: Path, ratio: float = 0.5) -> PruneResult:
    """Write the embedded sample CNN to `folder` and prune it (the README's main job)."""
    from .samples import sample_cnn

    folder.mkdir(parents=True, exist_ok=True)
    src = model_io.save(sample_cnn(), folder / "sample_cnn.onnx")
    logger.info("wrote the embedded sample CNN to %s", src)
    return prune(src, folder / "sample_cnn.pruned.onnx", PruneConfig(ratio=ratio),
                 plan_out=folder / "sample_cnn.plan.json")
