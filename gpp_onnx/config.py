"""One configuration object for a pruning run (instead of many keyword arguments)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import InputError


@dataclass(frozen=True)
class PruneConfig:
    ratio: float | None = None          # fraction of each prunable group's channels to remove
    target_macs: float | None = None    # keep this fraction of the MACs (search the ratio)
    target_params: float | None = None  # keep this fraction of the parameters
    criterion: str = "l1"
    seed: int = 0
    min_keep: int = 1                   # never keep fewer channels in a group
    round_to: int = 1                   # kept widths rounded up to a multiple of this
    mask_only: bool = False             # write the original shapes with removed channels zeroed
    input_shape: tuple[int, ...] | None = None
    latency: bool = True                # measure onnxruntime latency before/after

    def checked(self) -> "PruneConfig":
        """Validate; default to ratio 0.5 when no target is given."""
        targets = [t for t in (self.ratio, self.target_macs, self.target_params) if t is not None]
        if len(targets) > 1:
            raise InputError("give only one of --ratio, --target-macs, --target-params")
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise InputError(f"--ratio {self.ratio} is outside [0, 1) - e.g. --ratio 0.5 "
                             "removes half of each group's channels")
        for flag, value in (("--target-macs", self.target_macs),
                            ("--target-params", self.target_params)):
            if value is not None and not 0.0 < value <= 1.0:
                raise InputError(f"{flag} {value} is outside (0, 1] - it is the fraction to "
                                 "keep, e.g. 0.25 keeps a quarter")
        if self.min_keep < 1 or self.round_to < 1:
            raise InputError("--min-keep and --round-to must be at least 1")
        if not targets:
            return PruneConfig(**{**asdict(self), "ratio": 0.5})
        return self

    def to_dict(self) -> dict:
        return asdict(self)
