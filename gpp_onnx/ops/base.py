"""The contract of a channel rule, and the registry that maps ONNX ops to rules.

A *channel element* is one index along the channel axis of one value (tensor). A rule
looks at one node and says, in element terms:

* the channel axis of each output (``out_axes``);
* ``ties``: pairs of elements that must be removed together
  (``a[ia[k]]`` with ``b[ib[k]]`` for every k);
* ``params``: initializer slices indexed by the elements of a value
  (``ParamSlice``: element e of ``value`` is index ``index[e]`` along ``axis`` of
  ``param``); the same slices are cut by surgery, zeroed by masking and scored by
  criteria, so analysis and surgery can never disagree;
* ``blocked``: values whose channels must stay, each with a reason;
* ``reduced``: values whose channels the node reduces over (a sum, a mean, a norm over
  the channel axis). The pruned node reduces over the kept channels only; the masked
  model stands for that with the nodes ``masked_nodes`` builds (the statistic over the
  kept channels, on the original architecture), so pruned == masked still holds.

``rewrite`` is the same rule's second half: attribute and shape-constant updates once
the kept elements of every value are known (the parameter slicing itself is generic).

The rule is also the one place for the other facts about its ops that later steps need
(defaults in ``OpRule``: nothing): which inputs are trainable weights (torch backend),
the output bias input (bias repair), MACs per weight input (stats), the bias fold and
refit of the repair, and the classifier-head walk (features, logits).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

ROLE_OUT = "out"    # weights that produce the channel (conv filters): cut, scored
ROLE_IN = "in"      # weights that consume the channel: cut, zeroed by masking, scored
ROLE_CHAN = "chan"  # per-channel parameters (bias, BN, PRelu slope): cut


@dataclass(frozen=True, eq=False)
class Tie:
    a: str
    ia: np.ndarray
    b: str
    ib: np.ndarray


@dataclass(frozen=True, eq=False)
class ParamSlice:
    node: str
    input_index: int
    param: str
    axis: int
    value: str
    role: str
    index: np.ndarray | None = None  # None: element e is index e; (width, m): e owns m

    def positions(self, elements: np.ndarray) -> np.ndarray:
        """Indices along `axis` that the given elements of `value` own (sorted, unique)."""
        idx = elements if self.index is None else self.index[elements]
        return np.unique(idx)

    def element_positions(self, elements: np.ndarray) -> np.ndarray:
        """(G, k) elements of a group member -> (G, k*m) indices along `axis` per channel."""
        idx = elements if self.index is None else self.index[elements]
        return idx.reshape(len(elements), -1)


@dataclass
class NodeChannels:
    out_axes: dict[str, int | None] = field(default_factory=dict)
    ties: list[Tie] = field(default_factory=list)
    params: list[ParamSlice] = field(default_factory=list)
    blocked: list[tuple[str, str]] = field(default_factory=list)
    reduced: list[str] = field(default_factory=list)

    def tie(self, a: str, b: str, ia=None, ib=None, width: int | None = None) -> None:
        if ia is None:
            ia = np.arange(width)
        if ib is None:
            ib = np.arange(width) if width is not None else ia
        self.ties.append(Tie(a, np.asarray(ia, dtype=np.int64), b, np.asarray(ib, dtype=np.int64)))


@dataclass(frozen=True, eq=False)
class Reduced:
    """A value a node reduces over, as the masked model sees it: ``keep`` is 1 on the
    kept channels and 0 on the removed ones (in the value's dtype), shaped to broadcast
    against the value (``shape``, channel axis ``axis``)."""
    name: str
    keep: np.ndarray
    shape: tuple[int, ...]
    axis: int


class AnalysisContext:
    """What a rule may ask while analysing: constants, shapes, channel axes so far."""

    def __init__(self, view, opset: int):
        self.view = view
        self.opset = opset
        self.axes: dict[str, int | None] = {}

    def axis(self, value: str | None) -> int | None:
        return None if value is None else self.axes.get(value)

    def shape(self, value: str | None):
        return None if value is None else self.view.shape(value)

    def width(self, value: str) -> int:
        return int(self.view.shape(value)[self.axes[value]])

    def const(self, value: str | None) -> np.ndarray | None:
        return None if value is None else self.view.const(value)

    def is_const_param(self, value: str | None) -> bool:
        return value is not None and self.view.is_const(value)

    def has_channels(self, value: str | None) -> bool:
        return value is not None and self.axes.get(value) is not None


class OpRule:
    """Base rule: subclasses implement `analyze`; `rewrite` defaults to nothing to do.

    The other methods are facts about the op that other steps read; the defaults say
    "none" (no weights, no bias, no MACs, no repair, not part of a classifier head)."""

    def analyze(self, node: onnx.NodeProto, ctx: AnalysisContext) -> NodeChannels:
        raise NotImplementedError

    def rewrite(self, node: onnx.NodeProto, edit) -> None:
        """Update attributes / constant inputs of `node` for the kept channels."""

    def weight_slots(self, node: onnx.NodeProto) -> tuple[int, ...]:
        """Inputs that are trainable weights when fed by a float constant."""
        return ()

    def scalar_weights(self, node: onnx.NodeProto) -> bool:
        """False when a 1-element constant in a weight slot stays a constant."""
        return True

    def stat_slots(self, node: onnx.NodeProto) -> tuple[int, ...]:
        """Inputs that are running statistics (buffers updated in training, written back)."""
        return ()

    def output_bias(self, node: onnx.NodeProto) -> tuple[int, float] | None:
        """(input index, scale) of the bias added to output 0 as ``scale * input``."""
        return None

    def macs(self, node: onnx.NodeProto, view) -> dict[int, int]:
        """Multiply-accumulates per sample, split by the weight input they scale with."""
        return {}

    def bias_delta(self, node: onnx.NodeProto, w: np.ndarray, removed: np.ndarray,
                   means: np.ndarray, p: "ParamSlice", in_shape) -> np.ndarray | None:
        """Change of the output bias that keeps the removed inputs' mean contribution
        (``removed`` input channels with means ``means``, read by weight ``w`` via ``p``)."""
        return None

    def masked_nodes(self, node: onnx.NodeProto, reduced: list["Reduced"], editor
                     ) -> list[onnx.NodeProto]:
        """The nodes that replace `node` in the masked model when channels of the values
        it reduces over (``NodeChannels.reduced``) are removed; they must compute what the
        pruned node computes over the kept channels. `editor` (``edit.Editor`` of the
        masked model) gives fresh names and adds constants."""
        raise NotImplementedError(f"{node.op_type} declares no masked form")

    def refittable(self, node: onnx.NodeProto, view) -> bool:
        """True when the least-squares repair can refit this node's weight and bias."""
        return False

    def feature_pass(self, node: onnx.NodeProto, view) -> bool:
        """True when the final hidden layer may be searched for behind this node (it only
        reshapes or monotonically maps a classifier's scores)."""
        return False

    def logits_input(self, node: onnx.NodeProto) -> str | None:
        """The input holding logits when this node turns them into probabilities."""
        return None


class Blocker(OpRule):
    """Rule for ops without a channel rule: their channels stay, with the reason shown."""

    def __init__(self, reason: str):
        self.reason = reason

    def analyze(self, node, ctx):
        return block_all(node, ctx, self.reason)


def pass_through(node: onnx.NodeProto, ctx: AnalysisContext,
                 out_axis: int | None = None) -> NodeChannels:
    """Output 0 carries input 0's channels one to one (on `out_axis`, default the same)."""
    x, y = node.input[0], node.output[0]
    axis = ctx.axis(x)
    res = NodeChannels(out_axes={y: axis if out_axis is None else out_axis})
    if axis is not None:
        res.tie(x, y, width=ctx.width(x))
    return res


def block_all(node: onnx.NodeProto, ctx: AnalysisContext, reason: str) -> NodeChannels:
    res = NodeChannels()
    ranks = set()
    for name in node.input:
        if ctx.has_channels(name):
            res.blocked.append((name, reason))
            ranks.add(len(ctx.shape(name)))
    for name in node.output:
        rank = ctx.view.rank(name) if name else None
        # an output of another rank than its channel inputs (a Gather of one channel, a
        # max over channels with keepdims 0) has lost the channel axis: axis 1 is another
        if rank and rank >= 2 and ctx.view.is_float(name) and (not ranks or rank in ranks):
            res.out_axes[name] = 1
            res.blocked.append((name, reason))
        elif name:
            res.out_axes[name] = None
    return res


_REGISTRY: dict[tuple[str, str], list[tuple[int, int, OpRule]]] = {}


def register(*op_types: str, domain: str = "", since: int = 1, until: int = 10 ** 6
             ) -> Callable[[type], type]:
    """Class decorator: one rule instance serves `op_types` for opsets [since, until]."""

    def deco(cls: type) -> type:
        rule = cls()
        for op in op_types:
            _REGISTRY.setdefault((domain, op), []).append((since, until, rule))
        return cls

    return deco


def lookup(node: onnx.NodeProto, opset: int) -> OpRule:
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    for since, until, rule in _REGISTRY.get((domain, node.op_type), []):
        if since <= opset <= until:
            return rule
    where = f"{node.domain}::" if domain else ""
    return Blocker(f"{where}{node.op_type} has no channel rule in gpp-onnx")


def registered_ops() -> list[str]:
    return sorted(op for _, op in _REGISTRY)


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis
