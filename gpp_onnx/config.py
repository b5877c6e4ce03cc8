"""One configuration object for a pruning run (instead of many keyword arguments)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .errors import InputError


@dataclass(frozen=True)
class DataOptions:
    """Labelled data for data-driven criteria, repair, fine-tuning and accuracy."""
    source: str                          # folder, .npz, IDX, 'fashion-mnist', 'digits'
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    resize: bool = True
    limit: int | None = None             # load at most this many images (stratified)
    val_split: float = 0.1               # held out for accuracy
    per_class: int = 32                  # images per class for scoring (tracing, LDA)
    batch_size: int = 64
    workers: int | None = None           # batch-preparing processes (None: by source)


@dataclass(frozen=True)
class TrainOptions:
    """Cross-entropy fine-tuning after each cut (through the torch backend)."""
    epochs: float = 0.0
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 64
    device: str = "auto"                 # auto | cpu | cuda
    clip_grad: float = 2.0               # max global gradient norm per step (0: no clipping)


DATA_CRITERIA = ("gpp", "gpp-guided", "gpp-deconv", "taylor")
REPAIRS = ("lsq", "bias", "none")  # least-squares refit, mean fold into biases, nothing


@dataclass(frozen=True)
class PruneConfig:
    ratio: float | None = None          # fraction of each prunable group's channels to remove
    target_macs: float | None = None    # keep this fraction of the MACs (search the ratio)
    target_params: float | None = None  # keep this fraction of the parameters
    criterion: str = "auto"             # gpp with data, l1 without
    eta: float | None = None            # METHOD 3 threshold factor (per round: eta * round)
    rounds: int = 1
    seed: int = 0
    min_keep: int = 1                   # never keep fewer channels in a group
    round_to: int = 1                   # kept widths rounded up to a multiple of this
    mask_only: bool = False             # write the original shapes with removed channels zeroed
    input_shape: tuple[int, ...] | None = None
    latency: bool = True                # measure onnxruntime latency before/after
    data: DataOptions | None = None
    train: TrainOptions = TrainOptions()
    feature_tensor: str | None = None   # final hidden layer override
    repair: str = "lsq"                 # after the cut (needs data): lsq | bias | none

    def checked(self) -> "PruneConfig":
        """Validate; default to ratio 0.5 when no target is given."""
        targets = [t for t in (self.ratio, self.target_macs, self.target_params, self.eta)
                   if t is not None]
        if len(targets) > 1:
            raise InputError("give only one of --ratio, --target-macs, --target-params, --eta")
        self._check_data_options()
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
        changes = {}
        if isinstance(self.repair, bool):  # older spelling: True / False
            changes["repair"] = "lsq" if self.repair else "none"
        elif self.repair not in REPAIRS:
            raise InputError(f"--repair {self.repair} is unknown - use one of "
                             f"{', '.join(REPAIRS)}")
        if not targets:
            changes["ratio"] = 0.5
        if self.criterion == "auto":
            changes["criterion"] = "gpp" if self.data is not None else "l1"
        return replace(self, **changes) if changes else self

    def _check_data_options(self) -> None:
        if self.criterion in DATA_CRITERIA and self.data is None:
            raise InputError(f"criterion '{self.criterion}' needs labelled data - pass --data "
                             "(a folder, .npz, IDX file, fashion-mnist or digits)")
        if self.train.epochs > 0 and self.data is None:
            raise InputError("fine-tuning needs labelled data - pass --data")
        if self.eta is not None and self.eta < 0:
            raise InputError(f"--eta {self.eta} must be >= 0 (e.g. 0.1)")
        if self.rounds < 1:
            raise InputError("--rounds must be at least 1")
        if self.mask_only and (self.rounds > 1 or self.train.epochs > 0):
            raise InputError("--mask-only writes one cut without training - drop --rounds / "
                             "--finetune-epochs")
        if self.data is not None and not 0.0 <= self.data.val_split < 1.0:
            raise InputError(f"--val-split {self.data.val_split} is outside [0, 1)")

    def to_dict(self) -> dict:
        return asdict(self)
