"""PrunePlan: which channels of which group go. Round-trips through JSON.

Building a plan from scores:

* ``--ratio r``: each prunable group of width C loses ``floor(r*C)`` channels, the lowest
  scored, but keeps at least ``min_keep`` (never a whole group); with ``round_to = q``
  the kept width is rounded up to a multiple of q (capped at C); a group whose channels
  each span a multiple of q elements of every tensor (attention heads of width d = 64)
  is not rounded: its tensors' widths are multiples of q whatever the count.
* ``--target-macs f`` / ``--target-params f``: bisection on r until the estimated cost of
  the pruned model is at most f times the original (the cost falls as r grows). Without
  ``--round-to`` the widths are multiples of the runtime's block b (latency.py), or of
  b/2, ..., 1 when the coarser multiples cannot reach the target (``rounds``).
* ``--eta e`` (data-driven criteria, METHOD section 3): per group, the threshold is
  ``t = e * std(u[u > 0])`` (sample std); channels with ``u < t`` and all zero-utility
  channels go, the floors still apply.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .errors import InputError


@dataclass(frozen=True)
class PrunePlan:
    removed: dict[str, tuple[int, ...]]
    widths: dict[str, int]
    model_digest: str
    meta: dict = field(default_factory=dict)

    @property
    def removed_channels(self) -> int:
        return sum(len(v) for v in self.removed.values())

    def to_json(self) -> str:
        return json.dumps({"format": "gpp-onnx-plan/1", "model_digest": self.model_digest,
                           "meta": self.meta, "widths": self.widths,
                           "removed": {k: list(v) for k, v in self.removed.items()}}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "PrunePlan":
        data = json.loads(text)
        if data.get("format") != "gpp-onnx-plan/1":
            raise ValueError("not a gpp-onnx plan (format gpp-onnx-plan/1 expected)")
        return cls({k: tuple(int(i) for i in v) for k, v in data["removed"].items()},
                   {k: int(v) for k, v in data["widths"].items()}, data["model_digest"],
                   data.get("meta", {}))

    @classmethod
    def load(cls, path) -> "PrunePlan":
        try:
            return cls.from_json(Path(path).read_text())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise InputError(f"cannot read plan {path} ({err}) - pass a file written by "
                             "--plan-out") from None


def model_digest(model: onnx.ModelProto) -> str:
    """Fingerprint of a normalised graph's structure (ops, wiring, weight shapes)."""
    h = hashlib.sha256()
    for node in model.graph.node:
        h.update(f"{node.op_type}|{','.join(node.input)}|{','.join(node.output)};".encode())
    for init in model.graph.initializer:
        h.update(f"{init.name}{tuple(init.dims)};".encode())
    return h.hexdigest()[:16]


def check_plan(plan: PrunePlan, analysis, digest: str) -> None:
    if plan.model_digest != digest:
        raise InputError("the plan was made for a different model (digest "
                         f"{plan.model_digest}, this model {digest}) - make a new plan")
    for key, removed in plan.removed.items():
        try:
            group = analysis.group(key)
        except KeyError:
            raise InputError(f"plan names unknown group '{key}' - make a new plan") from None
        if not group.prunable or plan.widths.get(key) != group.width:
            raise InputError(f"plan does not fit group '{key}' - make a new plan")
        if removed and (len(set(removed)) >= group.width or min(removed) < 0
                        or max(removed) >= group.width):
            raise InputError(f"plan removes invalid channels of group '{key}'")
        if len(set(removed)) != len(removed):
            raise InputError(f"plan removes a channel of group '{key}' twice - make a new "
                             "plan (--plan-out), or list each channel once")


def keep_count(width: int, ratio: float, min_keep: int = 1, round_to: int = 1) -> int:
    keep = width - math.floor(ratio * width + 1e-9)
    return round_up(max(keep, min(min_keep, width), 1), round_to, width)


def round_up(keep: int, multiple: int, width: int) -> int:
    """`keep` rounded up to a multiple of `multiple`, at most `width`."""
    return min(width, int(math.ceil(keep / multiple) * multiple)) if multiple > 1 else keep


def group_multiple(group, round_to: int) -> int:
    """Channels of `group` are kept in multiples of this: the fewest channels that span a
    multiple of `round_to` elements of every tensor of the group, so `round_to` for plain
    channels, 1 for attention heads of width d = 64 (whose kept widths are multiples
    anyway) and 2 for heads of width 8 with blocks of 16 (two heads fill a block; rounding
    the head count itself to 16 kept every head of a 4-head layer)."""
    return math.lcm(*(round_to // math.gcd(round_to, int(m.elements.shape[1]))
                      for m in group.members)) if round_to > 1 else 1


def plan_by_ratio(analysis, scores: dict[str, np.ndarray], ratio: float, digest: str,
                  min_keep: int = 1, round_to: int = 1, meta: dict | None = None,
                  overrides: dict[str, float] | None = None) -> PrunePlan:
    """Each group loses `ratio` of its channels, or its own ratio from `overrides`."""
    removed, widths = {}, {}
    overrides = overrides or {}
    for group in analysis.prunable:
        keep = keep_count(group.width, overrides.get(group.key, ratio), min_keep,
                          group_multiple(group, round_to))
        order = np.argsort(scores[group.key], kind="stable")
        removed[group.key] = tuple(sorted(int(i) for i in order[: group.width - keep]))
        widths[group.key] = group.width
    return PrunePlan(removed, widths, digest, dict(meta or {}, ratio=ratio, round_to=round_to))


def plan_by_threshold(analysis, scores: dict[str, np.ndarray], eta: float, digest: str,
                      min_keep: int = 1, round_to: int = 1, meta: dict | None = None) -> PrunePlan:
    """METHOD section 3: per group, remove channels with u < eta * std(non-zero u); zeros go."""
    removed, widths = {}, {}
    for group in analysis.prunable:
        u = np.asarray(scores[group.key], dtype=np.float64)
        nonzero = u[u > 0]
        t = eta * float(np.std(nonzero, ddof=1)) if len(nonzero) > 1 else 0.0
        drop = (u < t) | (u <= 0)
        keep = round_up(max(int((~drop).sum()), min(min_keep, group.width), 1),
                        group_multiple(group, round_to), group.width)
        order = np.argsort(u, kind="stable")
        removed[group.key] = tuple(sorted(int(i) for i in order[: group.width - keep]))
        widths[group.key] = group.width
    return PrunePlan(removed, widths, digest, dict(meta or {}, eta=eta, round_to=round_to))


def plan_for_target(analysis, scores, digest: str, cost, fraction: float, min_keep: int = 1,
                    round_to: int = 1, meta: dict | None = None,
                    overrides: dict[str, float] | None = None) -> PrunePlan:
    """Smallest uniform ratio whose plan has cost(plan) <= fraction * cost(empty plan);
    when none has, the closest plan (the floors stop short of the target; the report
    says so). Which width multiple to try is the caller's (``rounds._plan_for_cost``)."""
    goal = fraction * cost(plan_by_ratio(analysis, scores, 0.0, digest))
    return _search_ratio(analysis, scores, digest, cost, goal, min_keep, round_to,
                         dict(meta or {}, round_to=round_to), overrides)


def _search_ratio(analysis, scores, digest, cost, goal, min_keep, round_to, meta,
                  overrides) -> PrunePlan:
    lo, hi = 0.0, 0.999
    best = plan_by_ratio(analysis, scores, hi, digest, min_keep, round_to, meta, overrides)
    if cost(best) > goal:
        return best
    for _ in range(24):
        mid = (lo + hi) / 2
        plan = plan_by_ratio(analysis, scores, mid, digest, min_keep, round_to, meta, overrides)
        if cost(plan) <= goal:
            hi, best = mid, plan
        else:
            lo = mid
    return best


def kept_elements(analysis, plan: PrunePlan) -> dict[str, np.ndarray]:
    """Kept local channel indices of every value that loses channels."""
    removed_by_value: dict[str, list[np.ndarray]] = {}
    for key, channels in plan.removed.items():
        if not channels:
            continue
        group = analysis.group(key)
        idx = np.asarray(channels, dtype=np.int64)
        for m in group.members:
            removed_by_value.setdefault(m.value, []).append(m.elements[idx].ravel())
    kept = {}
    for value, parts in removed_by_value.items():
        width = int(analysis.view.shape(value)[analysis.axes[value]])
        kept[value] = np.setdiff1d(np.arange(width), np.concatenate(parts))
    return kept
