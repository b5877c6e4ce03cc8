"""Normalisation, pooling and reductions.

* BatchNormalization, InstanceNormalization: ``y[c] = s[c] (x[c] - m[c]) / sd[c] + b[c]``,
  per channel: tied, with their parameter vectors sliced.
* LayerNormalization over axes that include the channel axis: tied, its scale and bias
  sliced; the pruned node normalises over the kept channels (ConvNeXt, a transformer's
  embedding). The masked model writes the same statistics out (``masked_nodes``: the
  mean and variance as sums over the 0/1 kept-channel mask divided by the kept count),
  so pruned == masked holds exactly.
* Softmax, LogSoftmax, Hardmax, LpNormalization and MeanVarianceNormalization over the
  channel axis: every output channel depends on every input channel, so the channels
  stay; over other axes they pass through. GroupNormalization takes its statistics over
  every axis from 1 (a group of axis-1 entries and all positions), so channels on any of
  those axes stay, channels-last ones included; its scale and bias are trained weights.
* Pools (Max/Average/Lp, Global*): per channel over space: tied.
* Reduce* over axes without the channel axis: tied (the axis index shifts when
  keepdims = 0). Over the channel axis, the reductions a removed channel can leave by
  contributing 0 (ReduceSum, ReduceMean, ReduceSumSquare, ReduceL1, ReduceL2,
  ReduceLogSum) reduce over the kept channels (a LayerNorm written out as ReduceMean,
  Sub, Pow, ReduceMean, ...); the masked model multiplies their input by the 0/1
  kept-channel mask (and a mean by ``width / kept``: the mean over the kept channels).
  Max, Min, Prod and LogSumExp over the channel axis keep the channels.
"""
from __future__ import annotations

import numpy as np

from onnx import helper

from .base import (ROLE_CHAN, NodeChannels, OpRule, ParamSlice, attr, block_all, norm_axis,
                   pass_through, register)


@register("BatchNormalization", "InstanceNormalization")
class PerChannelNorm(OpRule):
    def analyze(self, node, ctx):
        x = node.input[0]
        if ctx.axis(x) != 1:
            return block_all(node, ctx, f"{node.op_type} input has no channel axis 1")
        params = [p for p in node.input[1:] if p]
        if not all(ctx.is_const_param(p) for p in params):
            return block_all(node, ctx, f"{node.op_type} parameters are computed, not constant")
        res = pass_through(node, ctx)
        for extra in node.output[1:]:  # training-mode running stats outputs
            if extra:
                res.out_axes[extra] = None
        for i, p in enumerate(node.input[1:], start=1):
            if p:
                res.params.append(ParamSlice(node.name, i, p, 0, node.output[0], ROLE_CHAN))
        return res

    def weight_slots(self, node):
        return (1, 2)

    def stat_slots(self, node):
        return (3, 4) if node.op_type == "BatchNormalization" else ()


@register("LayerNormalization", "Softmax", "LogSoftmax", "Hardmax", "LpNormalization",
          "MeanVarianceNormalization", "GroupNormalization")
class CrossChannelNorm(OpRule):
    """Normalisations whose statistics may run over the channel axis."""

    def analyze(self, node, ctx):
        x = node.input[0]
        axis = ctx.axis(x)
        if axis is None:
            return NodeChannels(out_axes={o: None for o in node.output if o})
        rank = len(ctx.shape(x))
        if axis in _normalised_axes(node, ctx, rank):
            if node.op_type == "LayerNormalization":
                return _layer_norm(node, ctx, axis, rank)
            return block_all(node, ctx, f"{node.op_type} mixes all channels of its input")
        res = pass_through(node, ctx)
        for extra in node.output[1:]:
            if extra:
                res.out_axes[extra] = None
        return res

    def weight_slots(self, node):
        return (1, 2) if node.op_type in ("LayerNormalization", "GroupNormalization") else ()

    def feature_pass(self, node, view):
        return self.logits_input(node) is not None

    def logits_input(self, node):
        return node.input[0] if node.op_type in ("Softmax", "LogSoftmax") else None

    def masked_nodes(self, node, reduced, editor):
        """LayerNormalization over the kept channels, written out on the full width:
        ``mean = sum(x k) / n``, ``var = sum((x - mean)^2 k) / n`` with ``k`` the 0/1
        kept-channel mask and ``n`` the kept count, then
        ``(x - mean) / sqrt(var + eps) * scale + bias``."""
        (r,) = reduced
        rank = len(r.shape)
        axes = np.arange(norm_axis(attr(node, "axis", -1), rank), rank, dtype=np.int64)
        others = np.prod([r.shape[a] for a in axes if a != r.axis])
        g = _Nodes(node, editor, r.keep.dtype)
        k, ax = g.const("keep", r.keep), g.const("axes", axes)
        n = g.number("count", float(r.keep.sum()) * float(others))
        eps = g.number("eps", attr(node, "epsilon", 1e-5))
        mean = g.op("Div", g.op("ReduceSum", g.op("Mul", node.input[0], k), ax, keepdims=1), n)
        d = g.op("Sub", node.input[0], mean)
        var = g.op("Div", g.op("ReduceSum", g.op("Mul", g.op("Mul", d, d), k), ax, keepdims=1), n)
        y = g.op("Div", d, g.op("Sqrt", g.op("Add", var, eps)))
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        y = g.op("Mul", y, node.input[1], out=node.output[0] if bias is None else None)
        if bias is not None:
            g.op("Add", y, bias, out=node.output[0])
        return g.nodes


class _Nodes:
    """The nodes that stand for `node` in the masked model, under fresh names. Numbers
    are float32 constants cast to the value's dtype: integers (a count) and the
    LayerNorm's epsilon then stay exact where the check runs in float64."""

    def __init__(self, node, editor, dtype):
        self.node, self.editor, self.dtype = node, editor, np.dtype(dtype)
        self.nodes: list = []

    def const(self, key: str, array: np.ndarray) -> str:
        return self.editor.add_initializer(f"{self.node.name}.{key}", array)

    def number(self, key: str, value: float) -> str:
        name = self.const(key, np.asarray(value, dtype=np.float32))
        if self.dtype == np.float32:
            return name
        to = helper.np_dtype_to_tensor_dtype(self.dtype)
        return self.op("Cast", name, to=to)

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        out = out or self.editor.fresh(f"{self.node.name}.{op_type.lower()}")
        self.nodes.append(helper.make_node(op_type, list(inputs), [out],
                                           name=self.editor.fresh(out), **attrs))
        return out


def _layer_norm(node, ctx, axis: int, rank: int) -> NodeChannels:
    """LayerNormalization over axes that include the channel axis: output tied to input,
    scale and bias sliced along the channel, the input's channels reduced over."""
    used = ctx.view.consumers
    if 0 in _normalised_axes(node, ctx, rank):
        return block_all(node, ctx, "LayerNormalization normalises over the batch axis")
    if any(o and o in used for o in node.output[1:]):
        return block_all(node, ctx, "LayerNormalization statistics outputs are used")
    params = [p for p in node.input[1:] if p]
    if not all(ctx.is_const_param(p) for p in params):
        return block_all(node, ctx, "LayerNormalization parameters are computed, not constant")
    res = pass_through(node, ctx)
    for extra in node.output[1:]:
        if extra:
            res.out_axes[extra] = None
    width = ctx.width(node.input[0])
    for i, p in enumerate(node.input[1:], start=1):
        shape = ctx.shape(p) if p else None
        pos = axis - (rank - len(shape)) if shape is not None else -1
        if pos >= 0 and shape[pos] == width and width != 1:
            res.params.append(ParamSlice(node.name, i, p, pos, node.output[0], ROLE_CHAN))
    res.reduced.append(node.input[0])
    return res


def _normalised_axes(node, ctx, rank: int) -> set[int]:
    op = node.op_type
    if op == "GroupNormalization":   # axis 1 split into groups, statistics over all after
        return set(range(1, rank))
    if op == "MeanVarianceNormalization":
        return {norm_axis(a, rank) for a in attr(node, "axes", [0, 2, 3])}
    if op == "LayerNormalization":
        return set(range(norm_axis(attr(node, "axis", -1), rank), rank))
    if op == "LpNormalization" or ctx.opset >= 13:
        return {norm_axis(attr(node, "axis", -1), rank)}
    return set(range(norm_axis(attr(node, "axis", 1), rank), rank))  # old: flattens from axis


@register("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
          "GlobalLpPool", "MaxRoiPool")
class Pool(OpRule):
    def analyze(self, node, ctx):
        x = node.input[0]
        if ctx.axis(x) not in (None, 1):
            return block_all(node, ctx, f"{node.op_type} expects channels on axis 1")
        if len(node.output) > 1 and node.output[1] and node.output[1] in ctx.view.consumers:
            return block_all(node, ctx, "MaxPool indices encode channel positions")
        res = pass_through(node, ctx)
        for extra in node.output[1:]:
            if extra:
                res.out_axes[extra] = None
        return res


ZERO_SAFE = ("ReduceSum", "ReduceMean", "ReduceSumSquare", "ReduceL1", "ReduceL2",
             "ReduceLogSum")  # a removed channel leaves them by contributing 0
REDUCE = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1",
          "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")


@register(*REDUCE)
class Reduce(OpRule):
    def analyze(self, node, ctx):
        x, y = node.input[0], node.output[0]
        axis = ctx.axis(x)
        if axis is None:
            return NodeChannels(out_axes={y: None})
        rank = len(ctx.shape(x))
        axes = attr(node, "axes")
        if len(node.input) > 1 and node.input[1]:
            const = ctx.const(node.input[1])
            if const is None:
                return block_all(node, ctx, f"{node.op_type} axes are computed, not constant")
            axes = const.tolist()
        if not axes:
            if attr(node, "noop_with_empty_axes", 0):
                return pass_through(node, ctx)
            axes = list(range(rank))
        axes = {norm_axis(int(a), rank) for a in np.ravel(axes)}
        if axis in axes:
            if node.op_type not in ZERO_SAFE:
                return block_all(node, ctx, f"{node.op_type} reduces over the channel axis")
            return NodeChannels(out_axes={y: None}, reduced=[x])
        out_axis = axis if attr(node, "keepdims", 1) else axis - sum(a < axis for a in axes)
        return pass_through(node, ctx, out_axis)

    def masked_nodes(self, node, reduced, editor):
        """The same reduction of ``x * keep`` (0/1); a mean is then rescaled to the mean
        over the kept channels: ``* width / kept``."""
        (r,) = reduced
        g = _Nodes(node, editor, r.keep.dtype)
        xk = g.op("Mul", node.input[0], g.const("keep", r.keep))
        mean = node.op_type == "ReduceMean"
        again = helper.make_node(node.op_type, [xk, *node.input[1:]],
                                 [editor.fresh(f"{node.name}.sum")] if mean
                                 else list(node.output), name=node.name)
        again.attribute.extend(node.attribute)
        g.nodes.append(again)
        if mean:
            scaled = g.op("Mul", again.output[0], g.number("width", r.keep.size))
            g.op("Div", scaled, g.number("kept", float(r.keep.sum())), out=node.output[0])
        return g.nodes
