"""BatchNorm scale criterion (data-free; the channel-selection signal of Network Slimming,
Liu et al. 2017): a group channel's score is ``sum |gamma|`` over the BatchNormalization
nodes of the group (their scale input, ``ParamSlice`` role ``chan``, input 1), summed over
the k elements the channel owns in each BN's output.

Exporters usually fold an inference-mode BatchNorm into the preceding conv, so many
models have no BatchNormalization left; groups without one are scored by the l1 magnitude
criterion instead (``Magnitude(1)``) and one message says how many. Scores are only
compared within a group, so mixing the two scales across groups is harmless.
"""
from __future__ import annotations

import logging

import numpy as np

from ..ops import ROLE_CHAN
from .magnitude import Magnitude

logger = logging.getLogger(__name__)


class BnScaleCriterion:
    name = "bn"

    def score(self, analysis, evidence=None) -> dict[str, np.ndarray]:
        op_types = {node.name: node.op_type for node in analysis.view.nodes}
        scores: dict[str, np.ndarray] = {}
        missing = []
        for group in analysis.prunable:
            members = {m.value: m for m in group.members}
            total = np.zeros(group.width)
            found = False
            for p in group.params:
                if (p.role != ROLE_CHAN or p.input_index != 1
                        or op_types.get(p.node) != "BatchNormalization"):
                    continue
                gamma = np.abs(np.asarray(analysis.view.const(p.param), np.float64))
                gamma = np.moveaxis(gamma, p.axis, 0).reshape(gamma.shape[p.axis], -1).sum(axis=1)
                pos = p.element_positions(members[p.value].elements)
                total += gamma[pos].sum(axis=1)
                found = True
            if found:
                scores[group.key] = total
            else:
                missing.append(group.key)
        if missing:
            logger.warning("bn criterion: %d of %d prunable groups have no BatchNormalization "
                           "(folded into the convs at export?) - scored by l1 magnitude instead",
                           len(missing), len(analysis.prunable))
            fallback = Magnitude(1).score(analysis)
            scores.update((key, fallback[key]) for key in missing)
        return {g.key: scores[g.key] for g in analysis.prunable}
