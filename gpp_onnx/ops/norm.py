"""Normalisation, pooling and reductions.

* BatchNormalization, InstanceNormalization: ``y[c] = s[c] (x[c] - m[c]) / sd[c] + b[c]``,
  per channel: tied, with their parameter vectors sliced.
* LayerNormalization, Softmax, LogSoftmax, Hardmax, LpNormalization: when the
  normalised axes include the channel axis every output channel depends on every input
  channel, so the channels stay; otherwise they pass through.
* Pools (Max/Average/Lp, Global*): per channel over space: tied.
* Reduce* over axes without the channel axis: tied (the axis index shifts when
  keepdims = 0); over the channel axis: the channels stay.
"""
from __future__ import annotations

import numpy as np

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
    def analyze(self, node, ctx):
        x = node.input[0]
        axis = ctx.axis(x)
        if axis is None:
            return NodeChannels(out_axes={o: None for o in node.output if o})
        rank = len(ctx.shape(x))
        if axis in _normalised_axes(node, ctx, rank):
            return block_all(node, ctx, f"{node.op_type} mixes all channels of its input")
        res = pass_through(node, ctx)
        for extra in node.output[1:]:
            if extra:
                res.out_axes[extra] = None
        return res

    def weight_slots(self, node):
        return (1, 2) if node.op_type == "LayerNormalization" else ()

    def feature_pass(self, node, view):
        return self.logits_input(node) is not None

    def logits_input(self, node):
        return node.input[0] if node.op_type in ("Softmax", "LogSoftmax") else None


def _normalised_axes(node, ctx, rank: int) -> set[int]:
    op = node.op_type
    if op in ("GroupNormalization",):
        return {1}
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
            return block_all(node, ctx, f"{node.op_type} reduces over the channel axis")
        out_axis = axis if attr(node, "keepdims", 1) else axis - sum(a < axis for a in axes)
        return pass_through(node, ctx, out_axis)
