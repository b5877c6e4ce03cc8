"""One round of the pipeline: score -> plan -> cut (with repair) -> verify -> fine-tune.

``one_round`` takes the analysis of the current model and returns a ``Round``: the plan,
the pruned and masked models, the equivalence error, the accuracies (with labels) and the
fidelity to the original model on the held-out inputs (``teacher.fidelity``: after the
bare cut, after the repair, after fine-tuning). Without labels, fine-tuning distils the
original's outputs (``finetune.default_losses``). The facade
(``pipeline.prune``) and the step-wise pruner (``stepwise.StepPruner``) run it once per
round; nothing here reads or writes files except a ``--plan`` being replayed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from . import (batch, distributed, exact, files, latency, logits, repair, report, surgery,
               verify, widened)
from .allocate import fill, plan_global
from .analysis import Analysis
from .config import PruneConfig
from .data import iter_batches
from .evaluation import accuracy
from .finetune import train_model
from .importance import Evidence, checked_scores, get_criterion
from .latency_model import plan_for_latency
from .scoring import evidence_for, images_per_class, in_whole_batches
from .plan import (PrunePlan, check_plan, kept_elements, model_digest, plan_by_ratio,
                   plan_by_threshold, plan_for_target)
from .splits import Splits
from .stats import Estimator, ModelStats, param_sizes
from .teacher import Teacher, fidelity

logger = logging.getLogger(__name__)


def make_plan(analysis: Analysis, config: PruneConfig, digest: str, evidence: Evidence,
              round_no: int = 1, base: ModelStats | None = None,
              original_widths: dict[str, int] | None = None
              ) -> tuple[PrunePlan, dict[str, np.ndarray]]:
    """Score with the criterion and turn the scores into this round's plan.

    Over K rounds: ratio r keeps ``(1-r)^(k/K)`` of each group's original width after round
    k (`original_widths`, by group key; without them ``1 - (1-r)^(1/K)`` of the current
    widths per round, which widths rounded up to a block can undo);
    eta grows linearly (``eta * k``); a target fraction f of the original cost is reached
    as ``f^(k/K)`` after round k (latency: ``f^(1/K)`` of the current model per round).
    Several processes: rank 0 scores and plans, every rank gets its plan and scores
    (``distributed.from_writer``; why a broadcast and not an average: see there)."""
    return distributed.from_writer(_make_plan, analysis, config, digest, evidence, round_no,
                                   base, original_widths)


def _make_plan(analysis, config, digest, evidence, round_no, base, original_widths):
    criterion = get_criterion(config.criterion, config.seed)
    scores = checked_scores(criterion, analysis, criterion.score(analysis, evidence))
    meta = {"criterion": criterion.name, "seed": config.seed, "round": round_no}
    if getattr(criterion, "report", None):
        meta["criterion_report"] = criterion.report
    multiples = latency.width_multiples(config.round_to)
    common = dict(min_keep=config.min_keep, round_to=multiples[0], meta=meta)
    k, rounds = round_no, config.rounds
    if config.eta is not None:
        return plan_by_threshold(analysis, scores, config.eta * k, digest, **common), scores
    overrides = {analysis.find_group(name): 1 - (1 - r) ** (1 / rounds)
                 for name, r in config.group_ratios}
    if config.ratio is not None:
        ratio = 1 - (1 - config.ratio) ** (1 / rounds)
        if original_widths and rounds > 1:
            overrides = {**_cumulative(analysis, original_widths, config.ratio, k, rounds),
                         **overrides}
        return plan_by_ratio(analysis, scores, ratio, digest, **common,
                             overrides=overrides), scores
    if config.target_latency is not None:
        found = plan_for_latency(analysis, scores, digest, config.target_latency ** (1 / rounds),
                                 latency.timing_feeds(analysis.view, config.timing), **common,
                                 allocation=config.allocation or "global", options=config.timing)
        meta = dict(found.plan.meta, latency_tries=[list(t) for t in found.tries],
                    latency_measured=found.measured, latency_groups=list(found.groups))
        return replace(found.plan, meta=meta), scores
    multiples = _dividing_cut_widths(analysis, multiples, original_widths)
    return _plan_for_cost(analysis, config, scores, digest, k, base, multiples, meta,
                          overrides), scores


def _dividing_cut_widths(analysis: Analysis, multiples: tuple[int, ...],
                         original_widths: dict[str, int] | None) -> tuple[int, ...]:
    """The width multiples that divide every width an earlier round cut. A later round
    in coarser blocks than the earlier cut leaves too little to cut: on a 16/32-channel
    net at 0.4 of the MACs, round 1 cut 16 to 8 in blocks of 8, and the last round, in
    blocks of 16, could only halve the 32 (0.281 of the MACs kept, one cut 0.394)."""
    cut = [g.width for g in analysis.prunable
           if original_widths and original_widths.get(g.key, g.width) != g.width]
    return tuple(q for q in multiples if all(w % q == 0 for w in cut)) or (1,)


def _cumulative(analysis: Analysis, widths: dict[str, int], ratio: float, k: int,
                rounds: int) -> dict[str, float]:
    """Per group, the ratio of its current width that leaves ``(1-r)^(k/K)`` of its
    original width."""
    out = {}
    for g in analysis.prunable:
        if g.key in widths:
            keep = widths[g.key] * (1 - ratio) ** (k / rounds)
            out[g.key] = min(max(1 - keep / g.width, 0.0), 1.0)
    return out


def _plan_for_cost(analysis, config, scores, digest, k, base, multiples, meta,
                   overrides) -> PrunePlan:
    """A MACs or params target: uniform ratio search (the budget its rounded widths leave
    given back by ``allocate.fill``) or global allocation, with the coarsest width
    multiple that reaches the goal.

    Before the last of several rounds, only the multiples the last round's goal can be
    reached with are tried: an early round that rounds to a coarser block (its goal is
    milder) leaves widths the later rounds cannot cut evenly. On the Fashion-MNIST
    Inception net at 0.1 of the MACs, three cuts without push ended at 0.8468 held-out
    after rounds of 8- and 4-channel blocks, 0.8780 with 2-channel blocks throughout."""
    est = Estimator(analysis)
    field_name, fraction = (("macs", config.target_macs) if config.target_macs is not None
                            else ("params", config.target_params))
    now = getattr(est.estimate({}), field_name)
    original = getattr(base, field_name) if base is not None else now

    def cost(kept) -> float:
        return getattr(est.estimate(kept), field_name)

    def plan_at(goal, q) -> PrunePlan:
        if config.allocation == "global":
            return plan_global(analysis, scores, digest, cost, goal * now, config.min_keep, q,
                               meta)
        plan = plan_for_target(analysis, scores, digest, lambda p: cost(kept_elements(analysis, p)),
                               goal, config.min_keep, q, meta, overrides)
        return fill(analysis, plan, scores, cost, goal * now, q, overrides)

    def coarsest(goal, qs) -> tuple[int, PrunePlan]:
        for q in qs:
            plan = plan_at(goal, q)
            if cost(kept_elements(analysis, plan)) <= goal * now:
                break
        return q, plan

    if k == config.rounds:
        return coarsest(min(1.0, fraction * original / max(now, 1)), multiples)[1]
    last, final = coarsest(min(1.0, fraction * original / max(now, 1)), multiples)
    multiples = tuple(q for q in multiples if q <= last)
    plan = coarsest(min(1.0, fraction ** (k / config.rounds) * original / max(now, 1)),
                    multiples)[1]
    return _no_narrower(plan, final)


def _no_narrower(plan: PrunePlan, final: PrunePlan) -> PrunePlan:
    """`plan` (an early round's) with no group cut narrower than the plan for the whole
    target, made now, keeps it: a round that cut a group past it would leave the last
    round only the coarse steps left. On a 16/32-channel net in blocks of 8 at half the
    MACs, the rounds cut 32 to 16, and the last round could only halve the 16 (0.278 of
    the MACs kept, where one cut to 8/24 keeps 0.389)."""
    removed = {key: final.removed[key] if len(gone) > len(final.removed.get(key, gone)) else gone
               for key, gone in plan.removed.items()}
    if removed == plan.removed:
        return plan
    return replace(plan, removed=removed, meta=dict(plan.meta, widened_to_final=sorted(
        key for key in removed if removed[key] != plan.removed[key])))


@dataclass(frozen=True)
class Round:
    number: int
    plan: PrunePlan
    groups: list[dict]
    model: onnx.ModelProto
    masked_form: surgery.Deferred  # the masked original; ``masked`` is its ModelProto
    error: float
    params: int
    macs: int
    accuracy_cut: float | None = None
    accuracy_tuned: float | None = None
    repair: dict | None = None          # what the repair changed (None: no repair)
    error_float32: float | None = None  # float16 models: pruned vs masked computed in float32
    # `model` serialised (what the checker read), for the write; None when fine-tuning
    # changed the model after the check
    source: bytes | None = field(default=None, repr=False, compare=False)
    fidelity: dict | None = None        # stage -> output -> relative error, top-1 agreement
    error_float64: float | None = None  # pruned vs masked in float64 (exact.py), when run
    tolerance: verify.Tolerance | None = None  # what the float32 error was held to
    finetuned: bool = False             # `model` is the fine-tuned one (else the cut:
    #                                     no fine-tuning, or it did worse on held-out data)

    @property
    def kept(self) -> str | None:
        """Which model a round that fine-tuned kept: 'fine-tuned', or 'cut' where the
        fine-tune did worse on held-out data; None where it did not fine-tune."""
        if self.finetuned:
            return "fine-tuned"
        ran = self.accuracy_tuned is not None or (self.fidelity or {}).get("finetuned")
        return "cut" if ran else None

    @property
    def masked(self) -> onnx.ModelProto:
        """The masked original, written into a ModelProto on first use."""
        return self.masked_form.model


REPAIR_IMAGES = 1024  # at most this many scoring images feed the least-squares repair


def _repair(analysis: Analysis, kept, data: Splits | None, config: PruneConfig):
    """(bias deltas, weight replacements) for the cut, or (None, None) without repair."""
    if data is None or config.repair == "none" or not kept:
        return None, None
    values = repair.values_to_measure(analysis, kept)
    size, sample = in_whole_batches(
        analysis, config, images_per_class(data.train, config.data.per_class, config.seed))
    probe = repair.probe_batch(analysis.view, values, size)
    batches = (x for x, _ in iter_batches(sample, probe))
    means = repair.channel_means(analysis.view.model, values, batches)
    deltas = repair.bias_deltas(analysis, kept, means)
    if config.repair != "lsq":
        return deltas, None
    rng = np.random.default_rng(config.seed)
    limit = REPAIR_IMAGES - (REPAIR_IMAGES % size if batch.fixed(analysis.view.model) else 0)
    pick = np.sort(rng.permutation(len(sample))[:limit])
    weights, deltas = repair.reconstruct(analysis, kept, deltas, sample.subset(pick).x,
                                         config.train.device, batch_size=size,
                                         seed=config.seed)
    return deltas, weights


def one_round(analysis: Analysis, config: PruneConfig, data: Splits | None, k: int,
               plan_path, base: ModelStats, tolerance: verify.Tolerance,
               original_widths: dict[str, int] | None = None) -> Round:
    digest = model_digest(analysis.view.model)
    scores: dict[str, np.ndarray] = {}
    if plan_path is not None:
        plan = PrunePlan.load(plan_path)
        check_plan(plan, analysis, digest)
    else:
        evidence = evidence_for(analysis, config, data)
        plan, scores = make_plan(analysis, config, digest, evidence, k, base, original_widths)
    kept = kept_elements(analysis, plan)
    deltas, weights = distributed.from_writer(_repair, analysis, kept, data, config)
    repaired = None if deltas is None else {
        "mode": config.repair, "layers_refitted": len(weights or {}),
        "biases_changed": len(deltas)}
    pruned, pruned_values = surgery.cut_with_values(analysis, kept, deltas, weights)
    masked = surgery.mask_deferred(analysis, kept, deltas, weights)
    logger.info("round %d: cut %s in %s", k, report.plural(plan.removed_channels, "channel"),
                report.plural(sum(1 for v in plan.removed.values() if v), "group"))
    source = files.serialize(pruned)   # None over 2 GB: checked from a file, saved with .data
    verify.check(pruned if source is None else source)
    feeds = analysis.view.check_feeds(config.seed)
    # sessions take the arrays the tensors were written from (no reading them back); the
    # logits in front of a final Softmax/Sigmoid are compared too (a saturated one hides them)
    made = {o for n in masked.skeleton.graph.node for o in n.output}
    extra = [name for name in logits.saturated_inputs(pruned) if name in made]
    got = verify.run(logits.exposing(verify.session_source(pruned, pruned_values), extra),
                     feeds, "pruned model")
    reference = verify.run(logits.exposing(masked.session(), extra), feeds, "masked model")
    verdict = exact.check(pruned, lambda: masked.model, feeds, got, reference, tolerance,
                          extra)
    err = verdict.error
    logger.info("verified: pruned == masked original (relative error %.1e < %.1e)", err,
                verdict.tolerance.value)
    wide = (widened.check_in_float32(pruned, masked.model, feeds)
            if verify.low_precision(pruned) is not None else None)
    stats = Estimator(analysis).estimate(kept)
    bare = None if deltas is None else surgery.cut(analysis, kept, None, None)
    acc_cut, acc_tuned, pruned, tuned, fid = _measure(pruned, bare, data, config, k)
    params = sum(param_sizes(pruned).values())
    groups = report.group_rows(analysis, plan, scores)
    return Round(k, plan, groups, pruned, masked, err, params, stats.macs, acc_cut, acc_tuned,
                 repaired, wide, None if tuned else source, fid, verdict.error_float64,
                 verdict.tolerance, tuned)


def _measure(pruned, bare, data: Splits | None, config: PruneConfig, k: int):
    """Accuracy (with labels) and fidelity after the cut, fine-tuning, and both again:
    (acc_cut, acc_tuned, model, whether it was fine-tuned, fidelity).

    The model returned is the fine-tuned one unless fine-tuning made it worse on the
    held-out data: with labels, a lower accuracy than the repaired cut's; without, a lower
    fidelity to the original on some output and a higher one on none
    (``lowered_fidelity``). Then the repaired cut is kept and a warning says so: both
    are measured on the same held-out images, the choice a validation split is for."""
    if data is None:
        return None, None, pruned, False, None
    labelled, teacher = data.val.labelled, data.teacher
    acc_cut = accuracy(pruned, data.val) if labelled else None
    fid = None
    if teacher is not None:
        fid = {"cut": _fidelity(teacher, bare if bare is not None else pruned, data, config),
               "repaired": _fidelity(teacher, pruned, data, config) if bare is not None
               else None}
    if labelled:
        logger.info("round %d: accuracy right after the cut %.4f", k, acc_cut)
    if config.train.epochs <= 0:
        return acc_cut, None, pruned, False, fid
    distil = teacher if not labelled or config.train.distill_weight > 0 else None
    tuned = train_model(pruned, data.train, config.train, config.seed + k, teacher=distil)
    acc_tuned = accuracy(tuned, data.val) if labelled else None
    worse = better = None
    if fid is not None:
        fid["finetuned"] = _fidelity(teacher, tuned, data, config)
        worse = lowered_fidelity(fid["repaired"] or fid["cut"], fid["finetuned"])
        better = lowered_fidelity(fid["repaired"] or fid["cut"], fid["finetuned"], raised=True)
    if labelled:
        logger.info("round %d: accuracy after fine-tuning %.4f", k, acc_tuned)
        if acc_tuned < acc_cut:
            logger.warning("round %d: fine-tuning lowered the held-out accuracy (%.4f -> "
                           "%.4f); the repaired cut is kept - try a lower --lr or fewer "
                           "--finetune-epochs", k, acc_cut, acc_tuned)
            return acc_cut, acc_tuned, pruned, False, fid
    elif worse:
        logger.warning("round %d: distillation lowered the held-out fidelity to the "
                       "original (%s); %s - try a lower --lr or fewer --finetune-epochs", k,
                       "; ".join(worse), "it raised it on no output, so the repaired cut is "
                       "kept" if not better else f"the fine-tuned model is kept (it raised the "
                       f"fidelity of {len(better)} other output(s))")
        if not better:
            return acc_cut, acc_tuned, pruned, False, fid
    return acc_cut, acc_tuned, tuned, True, fid


def lowered_fidelity(before: dict, after: dict, raised: bool = False) -> list[str]:
    """The outputs whose fidelity `after` is worse than `before`, each as 'name measure
    before -> after'; with `raised`, those whose fidelity is better instead. Class outputs
    compare top-1 agreement, and on a tie relative error; discrete outputs the share of
    values equal; others relative error."""
    changed = []
    for name, row in after.items():
        for key in ("top1_agreement", "agreement", "relative_error"):
            if key not in row or row[key] == before[name][key]:
                continue
            was, now = before[name][key], row[key]
            if ((now > was) if key == "relative_error" else (now < was)) != raised:
                changed.append(f"{name} {key.replace('_', ' ')} {was:.3f} -> {now:.3f}")
            break
    return changed


def _fidelity(teacher: Teacher, model, data: Splits, config: PruneConfig) -> dict:
    batches = (x for x, _ in iter_batches(data.val, config.data.batch_size))
    return fidelity(teacher, model, batches)
