"""Magnitude criteria (data-free).

For each weight slice that produces or consumes a channel (roles ``out`` and ``in``:
a conv filter ``W[m]``, a consumer's input column ``W[:, c]``, a Gemm's rows), the slice
norm ``||W_slice||_p`` (p = 1 or 2). Each member's norms are divided by their mean so
that large and small layers weigh alike, then a group channel's score is the sum over
all its members and elements: coupled channels are judged together.
"""
from __future__ import annotations

import numpy as np

from ..ops import ROLE_IN, ROLE_OUT


class Magnitude:
    def __init__(self, p: int = 1):
        self.p = p
        self.name = f"l{p}"

    def _slice_norms(self, w: np.ndarray, axis: int) -> np.ndarray:
        moved = np.moveaxis(np.abs(w.astype(np.float64)), axis, 0).reshape(w.shape[axis], -1)
        return moved.sum(axis=1) if self.p == 1 else np.sqrt((moved ** 2).sum(axis=1))

    def score(self, analysis, evidence=None) -> dict[str, np.ndarray]:
        scores = {}
        for group in analysis.prunable:
            total = np.zeros(group.width)
            members = {m.value: m for m in group.members}
            for p in group.params:
                if p.role not in (ROLE_OUT, ROLE_IN):
                    continue
                norms = self._slice_norms(analysis.view.const(p.param), p.axis)
                pos = p.element_positions(members[p.value].elements)
                per_channel = norms[pos].sum(axis=1)
                mean = per_channel.mean()
                total += per_channel / mean if mean > 0 else per_channel
            scores[group.key] = total
        return scores
