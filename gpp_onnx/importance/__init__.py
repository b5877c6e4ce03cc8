"""Channel importance criteria. A criterion scores every channel of every prunable group
(higher = more important); plans remove the lowest scored channels.

A criterion is any object with ``name`` and
``score(analysis, evidence) -> {group key: scores}``; ``get_criterion`` resolves the
names the CLI accepts. ``Evidence`` carries what data-driven criteria (the discriminant
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
    data: object | None = None        # gpp_onnx.data.Dataset: labelled images to score with
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


def _bn_scale(seed: int):
    from .bn_scale import BnScaleCriterion
    return BnScaleCriterion()


_CRITERIA = {"l1": lambda seed: Magnitude(1), "l2": lambda seed: Magnitude(2),
             "random": lambda seed: RandomCriterion(seed),
             "gpp": _discriminant("gpp", rule="gradient", contribution=True,
                                  objective="lda-nll", aggregate="image"),
             "gpp-guided": _discriminant("gpp-guided", rule="guided", contribution=True),
             "gpp-deconv": _discriminant("gpp-deconv", rule="deconv"),
             "taylor": _taylor, "bn": _bn_scale}


def criterion_names() -> list[str]:
    return sorted(_CRITERIA)


def get_criterion(name: str, seed: int = 0) -> Criterion:
    try:
        return _CRITERIA[name](seed)
    except KeyError:
        raise InputError(f"unknown criterion '{name}' - choose one of "
                         f"{', '.join(criterion_names())}") from None


__all__ = ["Criterion", "Evidence", "Magnitude", "RandomCriterion", "criterion_names",
           "get_criterion"]
