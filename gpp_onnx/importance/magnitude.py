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

CHUNK = 1 << 20  # elements per float64 block of slice norms


class Magnitude:
    def __init__(self, p: int = 1):
        self.p = p
        self.name = f"l{p}"

    def _slice_norms(self, w: np.ndarray, axis: int) -> np.ndarray:
        """The norm of each slice ``w[..., i, ...]`` along `axis`, summed in float64. Slices
        go in chunks of about CHUNK elements: the same sums as one float64 copy of `w`,
        without that copy (a 25088x4096 Gemm weight would take 800 MB)."""
        rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)  # a view when axis == 0
        # numpy sums one row alone in another order than several rows: every chunk gets
        # at least two rows (very long slices: all rows at once), so the sums stay exact
        step = CHUNK // max(rows.shape[1], 1)
        starts = list(range(0, len(rows), step)) if step > 1 else [0]
        if len(starts) > 1 and len(rows) - starts[-1] == 1:
            starts.pop()
        norms = np.empty(len(rows))
        for i, j in zip(starts, starts[1:] + [len(rows)]):
            part = np.abs(rows[i:j].astype(np.float64))
            norms[i:j] = part.sum(axis=1) if self.p == 1 else np.sqrt((part ** 2).sum(axis=1))
        return norms

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
