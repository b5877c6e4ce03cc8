"""The growing loop (METHOD 5): add a module, train, keep it while it pays.

For k = 1 .. max_modules, at the k-th position (``--at`` values in the order given, or
``host.auto_positions``: one per resolution stage, deepest first):

1. insert module k (function-preserving: the grown model computes what the current one
   does, checked to 1e-5);
2. with data and ``epochs > 0``: train the grown model ``epochs`` epochs with the one
   trainer (``finetune.train_model``: cross-entropy, SGD, cosine schedule) and measure
   held-out accuracy;
3. keep the module when that accuracy beats the current model's by more than
   ``min_gain`` points; otherwise drop it (the current model stays) and stop.

Without data or with ``epochs == 0`` the modules are only inserted. The gain is measured
against the current model as it is, not against it trained for the same extra epochs, so
part of a gain can come from the extra training itself (``tools/grow_bench.py`` compares
with a base trained for the same total epochs).

``min_gain`` defaults to 0.1 points: 6 of the 6000 images Fashion-MNIST's default
held-out tenth has, i.e. "the module helped at all". It sits below that split's
binomial standard error (about 0.35 points at 90%), so it stops growth only where a
module does not pay; raise it for small held-out sets.

Memory is estimated before the first insertion (``estimate_bytes``): weights four times
(model, torch copy, gradients, momentum) plus, per training image, every new activation
three times (value, gradient, what autograd keeps). A grow needing more than the memory
available is refused.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from numbers import Integral, Real

import onnx

from ..config import DataOptions, TrainOptions, check_type
from ..errors import InputError
from ..evaluation import accuracy
from ..finetune import train_model
from ..graph import GraphView
from ..stats import count
from .host import Position, position
from .module import Module, Widths, insert_module

logger = logging.getLogger(__name__)

MIN_GAIN = 0.1   # accuracy points a module must add to be kept


@dataclass(frozen=True)
class GrowConfig:
    max_modules: int = 3
    at: tuple[str, ...] = ()              # positions (value names); () = automatic
    widths: Widths = Widths()
    min_gain: float = MIN_GAIN            # accuracy points
    data: DataOptions | None = None
    train: TrainOptions | None = None     # None: 2 epochs with data, else 0 (insert only)
    seed: int = 0
    input_shape: object = None

    def checked(self) -> "GrowConfig":
        check_type("data", self.data, DataOptions)
        check_type("train", self.train, TrainOptions)
        if not isinstance(self.widths, Widths):
            raise InputError(f"widths={self.widths!r} is not a Widths - give "
                             "widths=gpp_onnx.grow.Widths(32, 16, 16)")
        numbers = (("min_gain", self.min_gain, Real, "0.5"), ("seed", self.seed, Integral, "1"),
                   *((f"widths.{k}", w, Integral, "16") for k, w in vars(self.widths).items()
                     if w is not None))
        for name, value, kind, example in numbers:
            if isinstance(value, bool) or not isinstance(value, kind):
                raise InputError(f"{name}={value!r} is not a "
                                 f"{'whole number' if kind is Integral else 'number'} - "
                                 f"e.g. {name}={example}")
        if isinstance(self.max_modules, bool) or not isinstance(self.max_modules, int):
            raise InputError(f"max_modules={self.max_modules!r} is not a whole number - e.g. "
                             "max_modules=2")
        if self.train is None:
            return replace(self, train=TrainOptions(
                epochs=2.0 if self.data is not None else 0.0)).checked()
        if self.max_modules < 1:
            raise InputError(f"--max-modules {self.max_modules} must be >= 1")
        if not self.min_gain >= 0:   # NaN too: no gain would ever pass it
            raise InputError(f"--min-gain {self.min_gain} must be >= 0 (accuracy points)")
        self.train.checked()
        if self.train.epochs < 0:
            raise InputError(f"--epochs {self.train.epochs} must be >= 0")
        if self.train.epochs > 0 and self.data is None:
            raise InputError(f"--epochs {self.train.epochs:g} trains each grown model and "
                             "needs --data - pass labelled data, or --epochs 0 to insert only")
        if isinstance(self.at, str):
            raise InputError(f"at={self.at!r} is one name - give a list of names, e.g. "
                             f"at=[{self.at!r}]")
        if len(set(self.at)) != len(self.at):
            raise InputError("--at names a value twice - give each position once")
        if len(self.at) > self.max_modules:
            raise InputError(f"--at names {len(self.at)} positions and at most "
                             f"{self.max_modules} modules are grown - raise the number of "
                             "modules (--max-modules, or gpp's --grow) or drop positions")
        for w in (self.widths.b3x3, self.widths.b3x3dbl, self.widths.pool):
            if w is not None and w < 1:
                raise InputError(f"--branch-widths must be positive, got {w}")
        return self


@dataclass(frozen=True)
class ModuleRow:
    """One grown module as reported: where, how wide, its cost and what it gained."""
    module: Module
    params: int                 # added parameters (module and extended consumer weights)
    macs: int                   # added MACs per image
    accuracy: float | None      # held-out accuracy after training (None: not measured)
    gain: float | None          # accuracy points over the model before it
    kept: bool

    def to_dict(self) -> dict:
        m = self.module
        return {"index": m.index, "at": m.at, "output": m.output, "in_channels": m.channels,
                "size": [m.height, m.width], "branches": m.branch_channels(),
                "activation": m.activation, "identity_activation": m.identity_activation,
                "params": self.params, "macs": self.macs, "accuracy": self.accuracy,
                "gain_points": self.gain, "kept": self.kept,
                "insertion_relative_error": m.error}


@dataclass
class GrowState:
    model: onnx.ModelProto
    accuracy: float | None                 # the current model's held-out accuracy
    rows: list[ModuleRow] = field(default_factory=list)
    base_accuracy: float | None = None


def plan_positions(view: GraphView, config: GrowConfig) -> list[Position]:
    """Where modules 1, 2, ... go (InputError for a --at value that cannot take one)."""
    from .host import NotGrowable, auto_positions

    if not any(n.op_type == "Conv" for n in view.nodes):
        raise InputError("the model has no Conv - grow inserts Inception modules after conv "
                         "blocks; pass a CNN")
    if not config.at:
        found, why = auto_positions(view)
        if not found:
            raise InputError(f"no conv block's output can take a module ({why}) - name a "
                             "value with --at")
        return found[: config.max_modules]
    positions = []
    for value in config.at:
        try:
            positions.append(position(view, value))
        except NotGrowable as err:
            raise InputError(f"--at {value}: cannot grow there ({err}) - name the output "
                             "of a conv block whose consumers are convs or the classifier, "
                             "or leave --at out for automatic positions") from None
    return positions


def estimate_bytes(params: int, positions: list[Position], widths: Widths,
                   batch: int) -> int:
    """Memory a grow needs (see the module docstring), in bytes."""
    total_params, activations = params, 0
    for p in positions:
        c = p.channels
        w2, w3, w4 = widths.resolved(c)
        total_params += (c * c + c * w2 + 9 * w2 * w2 + c * w3 + 18 * w3 * w3 + c * w4
                         + (w2 + w3 + w4) * c * 9)   # consumers' new inputs, up to 3x3
        per_pixel = 2 * c + 4 * w2 + 6 * w3 + c + 2 * w4 + (c + w2 + w3 + w4)
        c += w2 + w3 + w4
        activations += per_pixel * p.height * p.width
    return 4 * (4 * total_params + 3 * batch * activations)


def available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(view: GraphView, positions: list[Position], config: GrowConfig) -> int:
    batch = config.train.batch_size if config.train.epochs > 0 else 2
    need = estimate_bytes(count(view).params, positions, config.widths, batch)
    weights = estimate_bytes(count(view).params, positions, config.widths, 0) // 4
    if weights >= 2 ** 31:
        raise InputError(f"the grown model would hold about {weights / 2**30:.1f} GiB of "
                         "weights, over the 2 GiB an ONNX file holds without external data "
                         "- use smaller --branch-widths or fewer modules (--max-modules, "
                         "gpp's --grow N)")
    have = available_bytes()
    if have is not None and need > have:
        raise InputError(f"growing {len(positions)} module(s) needs about {need / 2**30:.1f} "
                         f"GiB, {have / 2**30:.1f} GiB is available - use smaller "
                         "--branch-widths, fewer modules (--max-modules, gpp's --grow N) or "
                         "a smaller --batch-size")
    return need


def grow_model(model: onnx.ModelProto, positions: list[Position], config: GrowConfig,
               splits=None) -> GrowState:
    """The loop of the module docstring; `splits`: splits.Splits (train, val) or None."""
    acc = accuracy(model, splits.val) if splits is not None else None
    state = GrowState(model, acc, base_accuracy=acc)
    train = splits is not None and config.train.epochs > 0
    for k, pos in enumerate(positions, 1):
        view = GraphView(state.model, config.input_shape)
        before = count(view)
        grown, module = insert_module(state.model, position(view, pos.value), config.widths,
                                      k, config.seed, config.input_shape, view)
        after = count(GraphView(grown, config.input_shape))
        acc = gain = None
        if train:
            # grow's figures were measured without BatchNorm put back on folded convs
            grown = train_model(grown, splits.train, replace(config.train, renorm=False),
                                config.seed + k, desc=f"grow {k}")
            acc = accuracy(grown, splits.val)
            gain = 100 * (acc - state.accuracy)
        elif splits is not None:
            acc = state.accuracy
        kept = not train or gain > config.min_gain
        state.rows.append(ModuleRow(module, after.params - before.params,
                                    after.macs - before.macs, acc, gain, kept))
        if not kept:
            logger.info("module %d gained %.2f points (needs > %.2f): dropped; growth stops",
                        k, gain, config.min_gain)
            break
        if train:
            logger.info("module %d kept: held-out accuracy %.4f (%+.2f points)", k, acc, gain)
        state.model, state.accuracy = grown, acc if acc is not None else state.accuracy
    return state
