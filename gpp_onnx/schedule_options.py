"""The settings of a ``gpp`` run (``GppOptions``) and the checks that need no model or
data beyond the training split's size; ``schedule`` runs them."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from .config import PruneConfig
from .errors import InputError
from .grow.loop import GrowConfig
from .push import PushWeights

GPP_ROUNDS = 3         # default rounds of the gpp command
MIN_ROUND_STEPS = 20   # training steps one round needs (push statistics, fine-tune)
SPLITS = ("even", "final")


@dataclass(frozen=True)
class GppOptions:
    budget_epochs: float = 2.0      # training epochs in all (push + fine-tune)
    push_share: float = 0.25        # of the budget spent on push (evenly over the rounds)
    split: str = "final"            # fine-tuning: after every cut (even) | after the last (final)
    acc_floor: float = 0.05         # stop when held-out accuracy falls more than this
    # --cov 3 in the rounds (push's own default is 1, chosen on the digits): on validation
    # at 50/75/90% MACs removed it kept -0.22/-0.34/+0.06 (VGG) and -0.90/+1.42/+0.92
    # (Inception) points against --cov 1, and S_w's off-diagonal energy ends at 0.01-0.04
    # where --cov 1 left up to 0.51 (docs/fashion-mnist.md)
    weights: PushWeights = PushWeights(cov=3.0)
    work_dir: Path | None = None    # checkpoints (None: nothing kept between rounds)
    resume: bool = False
    # grow before the rounds: max_modules, at, widths, min_gain (None: no grow); its data,
    # training and seed are the run's (grow_settings)
    grow: GrowConfig | None = None
    # of the budget spent growing (evenly over the modules): with --grow 2 and 6 epochs,
    # 1.5 per module and 3 for the rounds
    grow_share: float = 0.5

    def round_budget(self) -> float:
        """The rounds' epochs (push and fine-tune): what the grow phase leaves."""
        return self.budget_epochs * (1 - self.grow_share if self.grow else 1.0)

    def grow_settings(self, config: PruneConfig) -> GrowConfig:
        """The grow phase's GrowConfig: each module trains its share of the budget with the
        run's data, learning rate, batch size and seed."""
        epochs = self.budget_epochs * self.grow_share / self.grow.max_modules
        return replace(self.grow, data=config.data, seed=config.seed,
                       input_shape=config.input_shape,
                       train=replace(config.train, epochs=epochs, distill=0.0))

    def check_grow(self, config: PruneConfig) -> None:
        """Grow settings that need no model or data (before any work)."""
        if self.grow is None:
            return
        if config.target_macs is None and config.target_params is None:
            raise InputError("--grow prunes back to a cost relative to the input model - give "
                             "--target-macs or --target-params (--ratio, --eta and "
                             "--target-latency have no meaning after a grow)")
        if not 0.0 < self.grow_share < 1.0:
            raise InputError(f"--grow-share {self.grow_share} is outside (0, 1) - e.g. 0.5 "
                             "grows with half of --budget-epochs")
        self.grow_settings(config).checked()

    def steps(self, config: PruneConfig, train_size: int) -> tuple[dict, float, int]:
        """Training steps per round (and per grown module), each in proportion to
        --budget-epochs; the budget (to 0.1 epoch) that gives each MIN_ROUND_STEPS; the
        batches an epoch of `train_size` images holds."""
        batches = math.ceil(train_size / config.train.batch_size)
        steps = {"round": self.round_budget() / config.rounds * batches}
        if self.grow is not None:
            steps["module"] = self.grow_settings(config).train.epochs * batches
        enough = max(math.ceil(10 * self.budget_epochs * MIN_ROUND_STEPS / n) / 10
                     for n in steps.values())
        return steps, enough, batches

    def checked(self, config: PruneConfig, train_size: int) -> "GppOptions":
        if not 0.0 <= self.push_share <= 1.0:
            raise InputError(f"--push-share {self.push_share} is outside [0, 1] - e.g. "
                             f"{GppOptions.push_share} (the share of --budget-epochs that "
                             "pushes)")
        if self.split not in SPLITS:
            raise InputError(f"--split {self.split} is unknown - use one of {', '.join(SPLITS)}")
        if self.acc_floor < 0:
            raise InputError(f"--acc-floor {self.acc_floor} must be >= 0 (e.g. 0.05)")
        steps, enough, batches = self.steps(config, train_size)
        per = f"{batches} batches of {config.train.batch_size} an epoch"
        if steps.get("module", MIN_ROUND_STEPS) < MIN_ROUND_STEPS:
            raise InputError(
                f"--budget-epochs {self.budget_epochs:g} gives {steps['module']:.0f} training "
                f"steps per grown module (--grow-share {self.grow_share:g} over "
                f"{self.grow.max_modules} modules, {per}); a module needs at least "
                f"{MIN_ROUND_STEPS} - raise --budget-epochs to {enough:g} or --grow-share, "
                "lower --batch-size, or grow fewer modules")
        if steps["round"] < MIN_ROUND_STEPS:
            raise InputError(
                f"--budget-epochs {self.budget_epochs:g} gives {steps['round']:.0f} training "
                f"steps per round over {config.rounds} rounds ({per}); a round needs at least "
                f"{MIN_ROUND_STEPS} - raise --budget-epochs to {enough:g}, or lower "
                "--batch-size or --rounds" + (" or --grow-share" if self.grow else ""))
        return self
