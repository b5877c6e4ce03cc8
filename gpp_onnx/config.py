"""One configuration object for a pruning run (instead of many keyword arguments)."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from numbers import Integral, Real

from .errors import InputError


@dataclass(frozen=True)
class DataOptions:
    """Data for data-driven criteria, repair, fine-tuning, accuracy (labels) and fidelity."""
    source: str                          # folder, .npz, IDX, 'fashion-mnist', 'digits'
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    resize: bool = True
    limit: int | None = None             # load at most this many images (stratified)
    val_split: float = 0.1               # held out for accuracy
    per_class: int = 32                  # images per class for scoring (tracing, LDA)
    batch_size: int = 64
    workers: int | None = None           # batch-preparing processes (None: by source)
    labels: bool | None = None           # False: ignore labels (--no-labels); None: use
    #                                      them where the source has them (prune resolves it)
    # (input name, values) for the inputs of a model with several that the data does not
    # hold (--feed): the same values for every sample
    feeds: tuple[tuple[str, tuple[float, ...]], ...] = ()


@dataclass(frozen=True)
class TrainOptions:
    """Fine-tuning after each cut (through the torch backend): cross-entropy with labels,
    plus ``distill`` x the distillation loss; the distillation loss alone without labels."""
    epochs: float = 0.0
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 64
    device: str = "auto"                 # auto | cpu | cuda
    amp: bool = False                    # float16 autocast + loss scaling (CUDA only)
    clip_grad: float = 2.0               # max global gradient norm per step (0: no clipping)
    distill: float | None = None         # weight of distillation next to cross-entropy
    #                                      (None: DISTILL in the fine-tune after a cut,
    #                                      PruneConfig; 0 elsewhere)
    # softmax temperature of the distillation KL: 2 was chosen on held-out top-1 agreement
    # with the teacher (label-free, 8-epoch Fashion-MNIST VGG, 0.222 MACs, 2 epochs):
    # T=1 0.9358, 2 0.9436, 3 0.9384, 4 0.9398, 8 0.9338 (docs/nolabel.md)
    temperature: float = 2.0
    batchnorm: str = "auto"              # train: batch statistics (updating the running
    #                                      ones); frozen: the running statistics; auto:
    #                                      frozen when distilling without labels (finetune)
    # a BatchNorm (batch statistics) on each conv the exporter folded one into, folded back
    # at the end (train.renorm; finetune turns it off for batchnorm "frozen"). On in the
    # fine-tune after a cut (PruneConfig), chosen there on validation accuracy
    # (Fashion-MNIST VGG / Inception nets, 0.25 of the MACs, 2 epochs, seeds 0-2; without
    # labels on agreement with the original): at lr 0.01 up on every seed, +0.13 /
    # +1.11 points on average; at RENORM_LR +0.46 / +2.09 (docs/fashion-mnist.md). Off in
    # push and grow (not measured there) and in the rounds after a grow (it cost 1 point
    # there, docs/grow.md).
    renorm: bool | None = None           # None: on in the fine-tune after a cut, else off
    renorm_lr: float | None = None       # the learning rate while it is on (None: lr;
    #                                      after a cut RENORM_LR unless lr is set)

    @property
    def distill_weight(self) -> float:
        """`distill`, 0 where it is left unset (the fine-tune after a cut sets it:
        ``finetune_defaults``)."""
        return self.distill or 0.0

    def checked(self) -> "TrainOptions":
        """The checks the CLI's flags make (--finetune-epochs, --lr, --batch-size), for
        options given from Python: a value out of range failed inside torch after the
        cut (a negative rate, a batch of 0) or was ignored (negative epochs)."""
        import math

        for name, low, above in (("epochs", 0, False), ("lr", 0, True),
                                 ("batch_size", 1, False)):
            value = getattr(self, name)
            whole = name == "batch_size"
            if isinstance(value, bool) or not isinstance(value, Integral if whole else Real) \
                    or not math.isfinite(value) or value < low or (above and value <= low):
                need = f"> {low}" if above else f">= {low}"
                raise InputError(f"TrainOptions {name}={value!r} must be a "
                                 f"{'whole ' if whole else ''}number {need}")
        return self


# the fine-tune's learning rate while BatchNorm is put back (TrainOptions.renorm), chosen
# on validation accuracy (mean of 3 seeds, VGG / Inception): 0.01 0.9153 / 0.8883, 0.03
# 0.9186 / 0.8982, 0.05 0.9155 / 0.8994; without BatchNorm 0.03 did not pay (0.9128 /
# 0.8839 against 0.9140 / 0.8773 at 0.01, the plain default) (docs/fashion-mnist.md)
RENORM_LR = 0.03

# with labels, the fine-tune after a cut adds this weight times the distillation loss (the
# original model as teacher) to cross-entropy (--distill), chosen on validation accuracy
# (Fashion-MNIST VGG / Inception nets at 0.25 and 0.1 of the MACs, 2 epochs, seeds 0-2,
# mean of the four): W = 0 0.9000, 0.5 0.9026, 1 0.9033, 3 0.9012 (docs/fashion-mnist.md)
DISTILL = 1.0


def finetune_defaults(train: TrainOptions) -> TrainOptions:
    """`train` for the fine-tune after a cut: what it leaves unset (None) takes that
    fine-tune's defaults - distillation at DISTILL, the BatchNorm put back at RENORM_LR
    (at `train.lr` where that is not the default rate, as ``--lr`` sets both)."""
    fill = {}
    if train.distill is None:
        fill["distill"] = DISTILL
    if train.renorm is None:
        fill["renorm"] = True
    if fill.get("renorm", train.renorm) and train.renorm_lr is None:
        fill["renorm_lr"] = RENORM_LR if train.lr == TrainOptions.lr else train.lr
    return replace(train, **fill) if fill else train


def with_lr(train: TrainOptions, lr: float | None) -> TrainOptions:
    """`train` after ``--lr``: a given rate is both the plain one and the one while
    BatchNorm is put back; None leaves the defaults."""
    return train if lr is None else replace(train, lr=lr, renorm_lr=lr)


def user_cache() -> str:
    """gpp-onnx's cache folder: under $XDG_CACHE_HOME where that is set to an absolute
    path (the freedesktop rule), else ~/.cache/gpp-onnx."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    return os.path.join(base, "gpp-onnx") if os.path.isabs(base) else "~/.cache/gpp-onnx"


@dataclass(frozen=True)
class LatencyOptions:
    """How latency is measured (the summary's ratio, --target-latency, profile)."""
    provider: str = "cpu"               # cpu | cuda (needs onnxruntime-gpu)
    threads: int = 0                    # onnxruntime intra-op threads (0: its own choice)
    batch: int = 1                      # images per run (models with a dynamic batch)
    cache: str | None = field(default_factory=user_cache)  # kernel profiles per model, machine

    def checked(self) -> "LatencyOptions":
        if self.provider not in ("cpu", "cuda"):
            raise InputError(f"--provider {self.provider} is unknown - use cpu or cuda")
        if self.threads < 0 or self.batch < 1:
            raise InputError("--latency-threads must be >= 0 and --latency-batch >= 1")
        return self


LDA_CRITERIA = ("gpp", "gpp-guided", "gpp-deconv")
LABEL_CRITERIA = (*LDA_CRITERIA, "taylor")
DATA_CRITERIA = (*LABEL_CRITERIA, "fisher")
REPAIRS = ("lsq", "bias", "none")
ALLOCATIONS = ("uniform", "global")  # least-squares refit, mean fold into biases, nothing


@dataclass(frozen=True)
class PruneConfig:
    ratio: float | None = None          # fraction of each prunable group's channels to remove
    target_macs: float | None = None    # keep this fraction of the MACs (search the ratio)
    target_params: float | None = None  # keep this fraction of the parameters
    target_latency: float | None = None # keep this fraction of the onnxruntime latency here
    allocation: str | None = None       # uniform ratio | global ranking (None: uniform for
    #                                     MACs/params, global for --target-latency)
    criterion: str = "auto"             # gpp with data, l1 without
    eta: float | None = None            # METHOD 3 threshold factor (per round: eta * round)
    rounds: int = 1
    seed: int = 0
    min_keep: int = 1                   # never keep fewer channels in a group
    round_to: int | None = None         # kept widths rounded up to a multiple of this
    #                                     (None: the runtime's fast-layout block, latency.py)
    mask_only: bool = False             # write the original shapes with removed channels zeroed
    input_shape: tuple[int, ...] | dict[str, tuple[int, ...]] | None = None  # or per input name
    latency: bool = True                # measure onnxruntime latency before/after
    timing: LatencyOptions = LatencyOptions()
    data: DataOptions | None = None
    train: TrainOptions = TrainOptions()  # unset distill / renorm: the fine-tune's defaults
    feature_tensor: str | None = None   # final hidden layer override
    repair: str = "lsq"                 # after the cut (needs data): lsq | bias | none
    ignore: tuple[str, ...] = ()        # groups kept whole: group keys, values or node names
    group_ratios: tuple[tuple[str, float], ...] = ()   # (group/value/node name, its ratio)

    def checked(self) -> "PruneConfig":
        """Validate; default to ratio 0.5 when no target is given."""
        self = self._typed()
        targets = [t for t in (self.ratio, self.target_macs, self.target_params,
                               self.target_latency, self.eta) if t is not None]
        if len(targets) > 1:
            raise InputError("give only one of --ratio, --target-macs, --target-params, "
                             "--target-latency, --eta")
        self._check_data_options()
        self._check_targets()
        self.timing.checked()
        if self.min_keep < 1 or (self.round_to is not None and self.round_to < 1):
            raise InputError("--min-keep and --round-to must be at least 1")
        changes = {}
        if self.input_shape is not None:
            changes["input_shape"] = checked_input_shape(self.input_shape)
        if self.train.batchnorm not in ("auto", "train", "frozen"):
            raise InputError(f"--batchnorm {self.train.batchnorm} is unknown - use auto, "
                             "train or frozen")
        if isinstance(self.repair, bool):  # older spelling: True / False
            changes["repair"] = "lsq" if self.repair else "none"
        elif self.repair not in REPAIRS:
            raise InputError(f"--repair {self.repair} is unknown - use one of "
                             f"{', '.join(REPAIRS)}")
        if not targets:
            changes["ratio"] = 0.5
        train = finetune_defaults(self.train)
        if train != self.train:
            changes["train"] = train
        if self.criterion == "auto":
            changes["criterion"] = ("l1" if self.data is None else
                                    "fisher" if self.data.labels is False else "gpp")
        if changes.get("criterion", self.criterion) in LDA_CRITERIA and \
                self.data is not None and self.data.per_class < 2:
            raise InputError(f"--per-class {self.data.per_class}: the discriminant "
                             "criterion's LDA needs two images of every class or more (its "
                             "within-class scatter) - give --per-class 2 or more (default 32)")
        return replace(self, **changes) if changes else self

    def _typed(self) -> "PruneConfig":
        """The fields the Python API may be given in another type: numbers as numbers,
        options as their classes; a dict of group ratios is taken as its items."""
        numbers = {}   # numpy scalars (np.float32(0.5), np.int64(2)) as Python numbers
        for name in ("ratio", "target_macs", "target_params", "target_latency", "eta"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, Real)):
                raise InputError(f"{name}={value!r} is not a number - e.g. {name}=0.5")
            if value is not None and not isinstance(value, (int, float)):
                numbers[name] = float(value)
        for name in ("rounds", "min_keep", "round_to", "seed"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, Integral)):
                raise InputError(f"{name}={value!r} is not a whole number - e.g. {name}=2")
            if value is not None and not isinstance(value, int):
                numbers[name] = int(value)
        if numbers:
            self = replace(self, **numbers)
        for name, cls in (("data", DataOptions), ("train", TrainOptions),
                          ("timing", LatencyOptions)):
            check_type(name, getattr(self, name), cls)
        if self.train is not None:
            self.train.checked()
        if isinstance(self.ignore, (str, bytes)):
            raise InputError(f"ignore={self.ignore!r} is one name - give a list of names, "
                             f"ignore=[{self.ignore!r}]")
        pairs = tuple(self.group_ratios.items() if isinstance(self.group_ratios, dict)
                      else self.group_ratios)
        for pair in pairs:
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2
                    and isinstance(pair[1], Real) and not isinstance(pair[1], bool)):
                raise InputError(f"group_ratios entry {pair!r} is not a (name, ratio) pair - "
                                 "e.g. group_ratios={'conv1': 0.25}")
        if isinstance(self.group_ratios, dict):
            return replace(self, group_ratios=pairs)
        return self

    def _check_targets(self) -> None:
        if self.allocation is not None and self.allocation not in ALLOCATIONS:
            raise InputError(f"--allocation {self.allocation} is unknown - use one of "
                             f"{', '.join(ALLOCATIONS)}")
        if self.allocation == "global" and self.target_macs is None and (
                self.target_params is None and self.target_latency is None):
            raise InputError("--allocation global ranks channels against a cost target - "
                             "give --target-macs, --target-params or --target-latency")
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise InputError(f"--ratio {self.ratio} is outside [0, 1) - e.g. --ratio 0.5 "
                             "removes half of each group's channels")
        for flag, value in (("--target-macs", self.target_macs),
                            ("--target-params", self.target_params),
                            ("--target-latency", self.target_latency)):
            if value is not None and not 0.0 < value <= 1.0:
                raise InputError(f"{flag} {value} is outside (0, 1] - it is the fraction to "
                                 "keep, e.g. 0.25 keeps a quarter")
        if self.group_ratios and (self.eta is not None or self.target_latency is not None
                                  or self.allocation == "global"):
            raise InputError("per-group ratios go with --ratio or a uniform --target-macs / "
                             "--target-params")
        names = [name for name, _ in self.group_ratios]
        twice = next((n for n in names if names.count(n) > 1), None)
        if twice is not None:
            raise InputError(f"'{twice}' is given two ratios (--group-ratio) - give it one")
        for name, r in self.group_ratios:
            if not 0.0 <= r < 1.0:
                raise InputError(f"the ratio {r} for '{name}' is outside [0, 1)")
            if name in self.ignore:
                raise InputError(f"'{name}' is both kept whole (--ignore) and given a ratio "
                                 "(--group-ratio) - drop one of them")

    def _check_data_options(self) -> None:
        from .importance import criterion_names

        if isinstance(self.criterion, str) and self.criterion not in ("auto",
                                                                      *criterion_names()):
            raise InputError(f"unknown criterion '{self.criterion}' - choose one of "
                             f"{', '.join(criterion_names())}")
        if self.criterion in DATA_CRITERIA and self.data is None:
            what = "labelled data" if self.criterion in LABEL_CRITERIA else "data"
            raise InputError(f"criterion '{self.criterion}' needs {what} - pass --data "
                             "(a folder, .npz, IDX file, fashion-mnist or digits)")
        if self.criterion in LABEL_CRITERIA and self.data.labels is False:
            raise InputError(f"criterion '{self.criterion}' needs labels and the data has "
                             "none (or --no-labels) - use --criterion fisher, or give labels")
        if self.train.epochs > 0 and self.data is None:
            raise InputError("fine-tuning needs data - pass --data")
        if self.train.distill_weight < 0 or self.train.temperature <= 0:
            raise InputError("--distill must be >= 0 and --temperature > 0")
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


def check_type(name: str, value, cls, module: str = "config") -> None:
    """InputError unless `value` (an option given from Python) is None or a `cls`."""
    if value is not None and not isinstance(value, cls):
        raise InputError(f"{name}={value!r} is not a {cls.__name__} - give "
                         f"{name}=gpp_onnx.{module}.{cls.__name__}(...)")


def check_count(name: str, value, low: int = 1) -> None:
    """InputError unless `value` is a whole number of at least `low`."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        raise InputError(f"{name}={value!r} must be a whole number >= {low}")


def checked_input_shape(value) -> tuple[int, ...] | dict[str, tuple[int, ...]]:
    """One shape, or ``{input name: shape}``; sizes positive integers (lists become tuples)."""
    named = value.items() if isinstance(value, dict) else [(None, value)]
    out = {}
    for name, dims in named:
        try:
            shape = tuple(int(d) for d in dims)
        except (TypeError, ValueError):
            shape = ()
        if not shape or min(shape) <= 0 or (name is not None and not isinstance(name, str)):
            label = "" if name is None else f"{name}:"
            raise InputError(f"--input-shape {label}{dims} is not a shape - give positive "
                             "sizes like 1,3,224,224 (NAME:1,3,224,224 per input)")
        out[name] = shape
    return out[None] if None in out else out
