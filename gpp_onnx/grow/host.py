"""Where a module can grow, which activation the host uses there, and how the consumers
of the grown value take the extra channels.

A module inserted on a value ``v`` (C channels) outputs ``[v, extra]`` (C + E channels,
the extra ones last). Every consumer path of ``v`` is followed forward through ops that
treat channels one by one and hold no weights (activations, max/average pools, global
pools, Dropout, Identity) or per-channel weights (BatchNormalization: the extra channels
get scale 1, bias 0, mean 0, var 1) to the ops that mix channels, whose weights get
zeros for the extra inputs:

* ``Conv`` (group 1) on ``v``'s path: ``W[:, C:C+E] = 0``;
* ``Flatten`` / ``Reshape(N, -1)`` then ``Gemm`` / ``MatMul``: the flattened position of
  channel c at pixel p is ``c * H * W + p``, so the extra channels are the last
  ``E * H * W`` rows of the weight, all 0 (a Reshape holding ``C * H * W`` gets the new
  size).

Any other consumer (a residual Add, a Concat, a depthwise Conv, a graph output) cannot
take extra channels: ``extension_plan`` says so with the node, and automatic positions
skip such values.

Automatic positions: one per resolution stage, at the end of the stage's last conv block
(Conv, optional BatchNormalization, optional activation) whose consumers can take extra
channels; deepest stage first. 1x1 maps (after a global pool, as in squeeze-excitation)
are no stage: a 3x3 branch sees only padding there.

The host activation of ``v``: its producer if that is an activation, looking through
max/average pools, Dropout and Identity (which keep the activation's range), and through
a Concat whose inputs all end in the same activation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from ..graph import GraphView

ACTIVATIONS = ("Relu", "Clip", "LeakyRelu", "Elu", "Selu", "Celu", "HardSigmoid",
               "HardSwish", "Sigmoid", "Tanh", "Softplus", "Mish", "Gelu")
# act(act(x)) == act(x): the identity branch may end in the host's activation
IDEMPOTENT = ("Relu", "Clip")
_RANGE_KEEPING = ("MaxPool", "AveragePool", "Dropout", "Identity")
_PASS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Dropout",
         "Identity", *ACTIVATIONS)
_BN_FILL = (1.0, 0.0, 0.0, 1.0)  # scale, bias, mean, var of an extra channel


class NotGrowable(Exception):
    """A value where a module cannot be inserted; the message says why."""


@dataclass(frozen=True)
class Activation:
    """An activation node to copy: op type, attributes and constant inputs (Clip bounds)."""
    op: str
    attrs: tuple = ()
    const_inputs: tuple[str, ...] = ()

    @property
    def idempotent(self) -> bool:
        return self.op in IDEMPOTENT


RELU = Activation("Relu")


@dataclass(frozen=True)
class Widen:
    """Append `count` entries of `fill` along `axis` of input `index` of node `node`."""
    node: str
    index: int
    axis: int
    count: int
    fill: float = 0.0


@dataclass(frozen=True)
class Reshaped:
    """A Reshape whose target holds the flattened size: add `extra` to entry 1."""
    node: str
    extra: int


@dataclass(frozen=True)
class Extension:
    """How the consumers of a value take `extra` more channels appended at the end."""
    widen: tuple[Widen, ...] = ()
    reshapes: tuple[Reshaped, ...] = ()


def host_activation(view: GraphView, value: str) -> Activation | None:
    """The activation that produced `value` (see the module docstring), None if none."""
    node = view.producer.get(value)
    if node is None:
        return None
    if node.op_type in ACTIVATIONS:
        consts = tuple(i for i in node.input[1:])
        if any(i and not view.is_const(i) for i in consts):
            return None
        attrs = tuple((a.name, _hashable(onnx.helper.get_attribute_value(a)))
                      for a in node.attribute)
        return Activation(node.op_type, attrs, consts)
    if node.op_type in _RANGE_KEEPING and not _pads_zeros(node):
        return host_activation(view, node.input[0])
    if node.op_type == "Concat":
        acts = {host_activation(view, x) for x in node.input}
        return acts.pop() if len(acts) == 1 else None
    return None


def _pads_zeros(node) -> bool:
    """An AveragePool that averages zero padding in (count_include_pad=1): its values near
    the border leave the activation's range (a Clip(1, 6) map averages below 1)."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    padded = any(attrs.get("pads", ())) or attrs.get("auto_pad", b"NOTSET") not in (
        b"NOTSET", b"VALID")
    return node.op_type == "AveragePool" and padded and attrs.get("count_include_pad", 0) == 1


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value


def feature_map(view: GraphView, value: str) -> tuple[int, int, int]:
    """(C, H, W) of a 4-D float value; NotGrowable otherwise."""
    shape = view.shape(value)
    if view.is_const(value) or value in view.input_names:
        raise NotGrowable(f"'{value}' is a model input or a weight, not a feature map")
    if shape is None:
        raise NotGrowable(f"'{value}' is not a value of the model")
    if len(shape) != 4 or not view.is_float(value):
        raise NotGrowable(f"'{value}' has shape {shape}, not a 4-D (N, C, H, W) feature map")
    return int(shape[1]), int(shape[2]), int(shape[3])


def extension_plan(view: GraphView, value: str, extra: int) -> Extension:
    """The weights to extend so that `value`'s consumers ignore `extra` appended channels."""
    c, h, w = feature_map(view, value)
    widen: list[Widen] = []
    reshapes: list[Reshaped] = []
    _follow(view, value, extra, h * w, c, widen, reshapes, flat=False)
    return Extension(tuple(widen), tuple(reshapes))


def _follow(view, value, extra, pixels, c, widen, reshapes, flat) -> None:
    if value in view.output_names:
        raise NotGrowable(f"'{value}' is a graph output")
    users = view.consumers.get(value, [])
    if not users:
        raise NotGrowable(f"'{value}' is not read by any node")
    for node in users:
        if list(node.input).count(value) != 1 or node.input[0] != value:
            raise NotGrowable(_refusal(node, "reads it as a weight or twice"))
        _follow_node(view, node, extra, pixels, c, widen, reshapes, flat)


def _follow_node(view, node, extra, pixels, c, widen, reshapes, flat) -> None:
    op, out = node.op_type, node.output[0]
    if flat:
        if op in ("Gemm", "MatMul"):
            widen.append(_linear_rows(view, node, extra * pixels))
            return
        if op in ("Dropout", "Identity"):
            return _follow(view, out, extra, pixels, c, widen, reshapes, flat)
        raise NotGrowable(_refusal(node, "follows the flattened features"))
    if op in _PASS and len(view.shape(out) or ()) == 4:
        return _follow(view, out, extra, pixels, c, widen, reshapes, flat)
    if op == "BatchNormalization":
        widen.extend(Widen(node.name, i, 0, extra, _BN_FILL[i - 1]) for i in range(1, 5))
        return _follow(view, out, extra, pixels, c, widen, reshapes, flat)
    if op == "Conv":
        if _attr(node, "group", 1) != 1 or not view.is_const(node.input[1]):
            raise NotGrowable(_refusal(node, "is a grouped/depthwise conv"))
        widen.append(Widen(node.name, 1, 1, extra))
        return
    # pools may have changed the map's size since v: the flattened rows count pixels here
    pixels = int(np.prod(view.shape(node.input[0])[2:]))
    if op == "Flatten" and _attr(node, "axis", 1) == 1:
        return _follow(view, out, extra, pixels, c, widen, reshapes, True)
    if op == "Reshape" and _flattening(view, node, c * pixels):
        target = view.const(node.input[1])
        if int(target[1]) != -1:
            reshapes.append(Reshaped(node.name, extra * pixels))
        return _follow(view, out, extra, pixels, c, widen, reshapes, True)
    raise NotGrowable(_refusal(node, "cannot take extra channels"))


def _linear_rows(view, node, rows: int) -> Widen:
    weight = node.input[1]
    if not view.is_const(weight) or view.rank(weight) != 2:
        raise NotGrowable(_refusal(node, "has no constant 2-D weight"))
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0):
            raise NotGrowable(_refusal(node, "transposes its input"))
        return Widen(node.name, 1, 1 if _attr(node, "transB", 0) else 0, rows)
    return Widen(node.name, 1, 0, rows)


def _flattening(view, node, size: int) -> bool:
    target = view.const(node.input[1])
    return (target is not None and target.shape == (2,) and int(target[0]) in (0, -1, 1)
            and int(target[1]) in (-1, size))


def _refusal(node, why: str) -> str:
    return f"its consumer {node.op_type} '{node.name}' {why}"


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def conv_block_ends(view: GraphView) -> list[str]:
    """Values that end a conv block (Conv [-> BatchNormalization] [-> activation]), in
    topological order."""
    ends = []
    for node in view.nodes:
        if node.op_type != "Conv":
            continue
        value = node.output[0]
        for op in ("BatchNormalization", ACTIVATIONS):
            users = view.consumers.get(value, [])
            ops = (op,) if isinstance(op, str) else op
            if len(users) == 1 and users[0].op_type in ops:
                value = users[0].output[0]
        ends.append(value)
    return ends


@dataclass(frozen=True)
class Position:
    value: str
    channels: int
    height: int
    width: int
    activation: Activation | None = field(default=None, compare=False)


def position(view: GraphView, value: str) -> Position:
    """A checked position (NotGrowable says why not)."""
    c, h, w = feature_map(view, value)
    extension_plan(view, value, 1)
    return Position(value, c, h, w, host_activation(view, value))


def auto_positions(view: GraphView) -> tuple[list[Position], str]:
    """One per resolution stage (the last growable conv block end), deepest first; and
    why the deepest block end that cannot take a module cannot (for an error where none
    can)."""
    by_stage: dict[tuple[int, int], Position] = {}
    why = "the model has no conv block end"
    for value in conv_block_ends(view):
        try:
            pos = position(view, value)
        except NotGrowable as err:
            why = f"at {value}: {err}"
            continue
        if pos.height * pos.width == 1:  # after a global pool (e.g. squeeze-excitation)
            why = f"{value} is 1x1, after a global pool"
            continue
        by_stage[(pos.height, pos.width)] = pos  # later blocks replace earlier ones
    order = {v: i for i, v in enumerate(view.producer)}
    return sorted(by_stage.values(), key=lambda p: -order.get(p.value, 0)), why


def extended(array: np.ndarray, step: Widen) -> np.ndarray:
    shape = list(array.shape)
    shape[step.axis] = step.count
    return np.concatenate([array, np.full(shape, step.fill, array.dtype)], axis=step.axis)
