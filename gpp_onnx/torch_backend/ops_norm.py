"""Normalizations whose statistics span several channels or a chosen axis: Group, Lp and
mean-variance normalization (batch, instance and layer normalization are in ``ops_nn``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops import Node, register


def _check_group_norm(node: Node) -> None:
    if node.attr("num_groups") is None:
        raise node.fail("the num_groups attribute is missing; the model is invalid")


@register("GroupNormalization", check=_check_group_norm)
def group_norm(node: Node, x, scale, bias):
    """Per sample, each of num_groups groups of C / G consecutive channels is normalised
    over its channels and all positions: ``(x - mean) / sqrt(var + epsilon)`` (biased
    variance, epsilon 1e-5), then scaled and shifted. Opset 18 has one scale / bias per
    group (a channel takes its group's), opset 21 one per channel. stash_type=1 (the
    default) computes the statistics in float32: half-precision inputs are widened."""
    groups = node.attr("num_groups")
    if node.opset < 21:
        scale = scale.repeat_interleave(x.shape[1] // groups)
        bias = bias.repeat_interleave(x.shape[1] // groups)
    wide = node.attr("stash_type", 1) == 1 and x.dtype in (torch.float16, torch.bfloat16)
    work = x.float() if wide else x
    y = F.group_norm(work, groups, scale.to(work.dtype), bias.to(work.dtype),
                     node.attr("epsilon", 1e-5))
    return y.to(x.dtype)


def _check_lp_norm(node: Node) -> None:
    if node.attr("p", 2) not in (1, 2):
        raise node.fail(f"p={node.attr('p')} is not defined; LpNormalization takes p 1 or 2")


@register("LpNormalization", check=_check_lp_norm)
def lp_normalization(node: Node, x):
    """``x / ||x||_p`` along ``axis`` (default -1), p 1 or 2 (default 2). A zero norm
    gives 0, as in onnxruntime (not NaN); its gradient there is 0."""
    norm = torch.linalg.vector_norm(x, ord=node.attr("p", 2), dim=node.attr("axis", -1),
                                    keepdim=True)
    return x / torch.where(norm == 0, torch.ones_like(norm), norm)


@register("MeanVarianceNormalization")
def mean_variance_normalization(node: Node, x):
    """``(x - mean) / sqrt(var)`` over ``axes`` (default [0, 2, 3]), biased variance.
    onnxruntime adds no epsilon (the ONNX function body's 1e-9): a constant slice is
    NaN there, and here."""
    dims = tuple(sorted({a % x.dim() for a in node.attr("axes", [0, 2, 3])}))
    centred = x - x.mean(dims, keepdim=True)
    return centred / torch.sqrt((centred * centred).mean(dims, keepdim=True))


@register("LRN")
def lrn(node: Node, x):
    """Local response normalization across channels (AlexNet, GoogLeNet, CaffeNet):
    ``x / (bias + alpha / size * s) ** beta``, ``s`` the sum of squares over channels
    ``c - floor((size - 1) / 2) .. c + ceil((size - 1) / 2)`` (those in range; torch's
    ``local_response_norm`` puts an even size's window the other way round)."""
    size = node.attr("size")
    below = (size - 1) // 2
    squares = F.pad((x * x).movedim(1, -1), (below, size - 1 - below))
    window = sum(squares[..., i:i + x.shape[1]] for i in range(size)).movedim(-1, 1)
    return x / (node.attr("bias", 1.0) + node.attr("alpha", 1e-4) / size * window) \
        ** node.attr("beta", 0.75)
