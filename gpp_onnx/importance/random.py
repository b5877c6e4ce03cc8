"""Random criterion (seeded): the baseline every other criterion must beat."""
from __future__ import annotations

import numpy as np


class RandomCriterion:
    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def score(self, analysis, evidence=None) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        return {g.key: rng.random(g.width) for g in analysis.prunable}
