"""Gemm and MatMul with a constant weight (fully connected layers).

Gemm: ``Y = alpha * A' B' + beta * C`` with ``A' = A`` (transA = 0), ``B'`` of shape
``(K, N)``: input feature k is read by row k of ``B'``; output feature n is produced by
column n and bias ``C[n]``. After ``Flatten`` of an ``(N, C, H, W)`` map, features
``c*H*W .. (c+1)*H*W - 1`` are channel c's (the Flatten rule ties them), so removing a
channel removes its H*W rows.

MatMul ``Y = A @ B`` with constant 2-D ``B (K, N)``: the channel axis of A is its last
axis; the same row/column rule. MatMul of two computed tensors (attention) blocks.

MACs per sample: ``rows * K * N`` (rows: the output's elements before its last axis).
Bias fold of the repair (Gemm; removed features k with means m_k):
``C[o] += alpha / beta * sum_k m_k * B'[k, o]`` (the scale 1 / beta is applied where the
bias is written, ``output_bias``).
"""
from __future__ import annotations

import numpy as np

from .base import (ROLE_CHAN, ROLE_IN, ROLE_OUT, NodeChannels, OpRule, ParamSlice, attr,
                   block_all, register)
from .conv import OPTIMISED


@register("Gemm")
class GemmRule(OpRule):
    def analyze(self, node, ctx):
        a, b, y = node.input[0], node.input[1], node.output[0]
        if not ctx.is_const_param(b) or attr(node, "transA", 0):
            return block_all(node, ctx, "Gemm needs a constant B and transA = 0")
        trans_b = attr(node, "transB", 0)
        in_axis, out_axis = (1, 0) if trans_b else (0, 1)
        res = NodeChannels(out_axes={y: 1})
        res.params.append(ParamSlice(node.name, 1, b, out_axis, y, ROLE_OUT))
        _bias(node, ctx, res, 2, y)
        if ctx.axis(a) == 1:
            res.params.append(ParamSlice(node.name, 1, b, in_axis, a, ROLE_IN))
        elif ctx.has_channels(a):
            res.blocked.append((a, "Gemm reads features on axis 1"))
        return res

    def weight_slots(self, node):
        return (1, 2)

    def output_bias(self, node):
        return (2, float(attr(node, "beta", 1.0)))

    def macs(self, node, view):
        return _matrix_macs(node, view)

    def bias_delta(self, node, w, removed, means, p, in_shape):
        if not _has_bias_term(node):   # beta 0: C is ignored, delta / beta is infinite
            return None
        w = w.astype(np.float64)
        rows = w.T if attr(node, "transB", 0) else w              # (K, N)
        return attr(node, "alpha", 1.0) * (means @ rows[removed])

    def refittable(self, node, view):
        """One row per image (not a sequence head's (T*b, F) rows), constant B, transA 0."""
        per_image = view.shape(node.input[0])[0] == view.batch_input.shape[0]
        return (per_image and view.is_const(node.input[1]) and not attr(node, "transA", 0)
                and _has_bias_term(node)    # the refit writes its bias as C = bias / beta
                and float(attr(node, "alpha", 1.0)) != 0.0)   # and its weight as W / alpha


def _has_bias_term(node) -> bool:
    """False for beta 0: ``beta * C`` is no bias, so a repair has none to write (it wrote
    C = delta / 0, infinities: NaN by the spec's 0 * inf, a model gpp-onnx refuses)."""
    return float(attr(node, "beta", 1.0)) != 0.0


@register("FusedGemm", domain="com.microsoft")
class FusedGemmRule(OpRule):
    """onnxruntime's Gemm + activation: its channels stay, it counts a Gemm's MACs."""

    def analyze(self, node, ctx):
        return block_all(node, ctx, f"com.microsoft::FusedGemm: {OPTIMISED}")

    def macs(self, node, view):
        return _matrix_macs(node, view)


@register("MatMul")
class MatMulRule(OpRule):
    def analyze(self, node, ctx):
        a, b, y = node.input[0], node.input[1], node.output[0]
        if not ctx.is_const_param(b) or len(ctx.shape(b)) != 2:
            return block_all(node, ctx, "MatMul of two computed tensors (or a batched "
                                        "constant) mixes channels gpp-onnx cannot follow")
        rank = len(ctx.shape(y))
        res = NodeChannels(out_axes={y: rank - 1})
        res.params.append(ParamSlice(node.name, 1, b, 1, y, ROLE_OUT))
        if ctx.axis(a) == len(ctx.shape(a)) - 1:
            res.params.append(ParamSlice(node.name, 1, b, 0, a, ROLE_IN))
        elif ctx.has_channels(a):
            res.blocked.append((a, "MatMul reads features on the last axis, but channels "
                                   f"arrive on axis {ctx.axis(a)}"))
        return res

    def weight_slots(self, node):
        return (0, 1)

    def macs(self, node, view):
        return _matrix_macs(node, view)


def _matrix_macs(node, view) -> dict[int, int]:
    b = view.input(node, 1)
    w = view.shape(b) if b and view.is_const(b) else None
    if w is None or len(w) != 2:
        return {}
    # per sample, as a conv's: the rows of every sample the probe ran (batch 1 unless
    # the input fixes another), wherever the batch axis lies (N, T, K) or (T, N, K)
    first = np.shape(next(iter(view.probe_feeds.values()), 0))
    batch = max(int(first[0]), 1) if first else 1
    rows = int(np.prod(view.shape(node.output[0])[:-1])) // batch
    return {1: rows * int(np.prod(w))}


def _bias(node, ctx, res: NodeChannels, index: int, y: str) -> None:
    c = ctx.view.input(node, index)
    if not c:
        return
    shape = ctx.shape(c)
    width = ctx.shape(y)[-1]
    if not ctx.is_const_param(c):
        res.blocked.append((y, "Gemm bias is computed, not constant"))
    elif shape and shape[-1] == width and width != 1:
        res.params.append(ParamSlice(node.name, index, c, len(shape) - 1, y, ROLE_CHAN))
