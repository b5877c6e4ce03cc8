"""Channel importance criteria. A criterion scores every channel of every prunable group
(higher = more important); plans remove the lowest scored channels.

A criterion is any object with ``name`` and
``score(analysis, evidence) -> {group key: scores}``; ``get_criterion`` resolves the
names the CLI accepts, ``register_criterion`` adds one, and a criterion object can be
given wherever a name can (``PruneConfig(criterion=MyCriterion())``). ``Evidence`` carries what data-driven criteria (the discriminant
criterion of Grow-Push-Prune, Taylor) need; data-free criteria ignore it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..errors import InputError
from .magnitude import Magnitude
from .random import RandomCriterion


@dataclass(frozen=True, eq=False)
class Evidence:
    data: object | None = None        # gpp_onnx.data.Dataset: images (labels or not) to score
    feature: str | None = None        # value name of the final hidden layer
    device: str = "auto"
    batch_size: int = 64
    seed: int = 0


class Criterion(Protocol):
    name: str

    def score(self, analysis, evidence: Evidence | None = None) -> dict[str, np.ndarray]: ...


def _discriminant(name: str, **variant):
    def make(seed: int):
        from .discriminant import DiscriminantCriterion  # torch is imported only when used
        return DiscriminantCriterion(name, **variant)
    return make


def _taylor(seed: int):
    from .taylor import TaylorCriterion  # torch is imported only when used
    return TaylorCriterion()


def _fisher(seed: int):
    from .taylor import TaylorCriterion
    return TaylorCriterion(objective="fisher")


def _bn_scale(seed: int):
    from .bn_scale import BnScaleCriterion
    return BnScaleCriterion()


_CRITERIA = {"l1": lambda seed: Magnitude(1), "l2": lambda seed: Magnitude(2),
             "random": lambda seed: RandomCriterion(seed),
             "gpp": _discriminant("gpp", rule="gradient", contribution=True,
                                  objective="lda-nll", aggregate="image"),
             "gpp-guided": _discriminant("gpp-guided", rule="guided", contribution=True),
             "gpp-deconv": _discriminant("gpp-deconv", rule="deconv"),
             "taylor": _taylor, "fisher": _fisher, "bn": _bn_scale}


def criterion_names() -> list[str]:
    return sorted(_CRITERIA)


def register_criterion(name: str, factory) -> None:
    """Make `name` usable wherever a criterion is named (--criterion, PruneConfig):
    `factory(seed)` returns an object with ``name`` and ``score(analysis, evidence)``."""
    if not isinstance(name, str) or not name:
        raise InputError(f"criterion name {name!r} is not a name - register under a string, "
                         "e.g. 'position'")
    if not callable(factory):
        raise InputError(f"criterion '{name}': the factory is not callable - give a "
                         "function of the seed that returns the criterion")
    if name in _CRITERIA:
        raise InputError(f"criterion '{name}' exists already - register under another name")
    _CRITERIA[name] = factory


def checked_scores(criterion, analysis, scores) -> dict[str, np.ndarray]:
    """`scores` as float arrays, one finite score per channel of every prunable group;
    InputError naming the criterion and the group otherwise."""
    name = getattr(criterion, "name", type(criterion).__name__)
    if not isinstance(scores, dict):
        raise InputError(f"criterion '{name}' returned {type(scores).__name__}, not a dict of "
                         "group key -> scores")
    out = dict(scores)
    for group in analysis.prunable:
        if group.key not in scores:
            raise InputError(f"criterion '{name}' gave no scores for group '{group.key}' - "
                             "score every group of analysis.prunable")
        try:
            values = np.asarray(scores[group.key], dtype=np.float64)
        except (TypeError, ValueError):
            values = np.zeros(0)
        if values.shape != (group.width,) or not np.all(np.isfinite(values)):
            raise InputError(f"criterion '{name}' gave {values.size} scores for group "
                             f"'{group.key}' of width {group.width} - give one finite score "
                             "per channel")
        out[group.key] = values
    return out


def get_criterion(name, seed: int = 0) -> Criterion:
    """The criterion called `name`; a criterion object is used as it is."""
    if not isinstance(name, str):
        if not callable(getattr(name, "score", None)) or not hasattr(name, "name"):
            raise InputError(f"{name!r} is not a criterion - give a name or an object with "
                             "'name' and 'score(analysis, evidence)'")
        return name
    try:
        return _CRITERIA[name](seed)
    except KeyError:
        raise InputError(f"unknown criterion '{name}' - choose one of "
                         f"{', '.join(criterion_names())}") from None


__all__ = ["Criterion", "Evidence", "Magnitude", "RandomCriterion", "checked_scores",
           "criterion_names", "get_criterion", "register_criterion"]
