"""Conv and ConvTranspose.

Conv: ``W`` is ``(M, C/g, k...)``; output channel m is produced by filter ``W[m]`` (and
bias ``B[m]``); input channel c of group ``c // (C/g)`` is read by ``W[:, c % (C/g)]``.

* ``g == 1``: output channels are a new group; input channels cut ``W[:, c]``.
* depthwise (``C/g == 1``, multiplier ``t = M/g``): output ``k*t + r`` is computed from
  input k only, so they are tied; surgery sets ``group`` to the kept input width.
* grouped (``1 < g < C``): every group must keep the same positions, so input position
  j is tied across groups (``x[gi*C/g + j]``) and likewise output positions; ``group``
  stays, ``W`` loses rows and columns.

ConvTranspose: ``W`` is ``(C, M/g, k...)``; the same rules with the axes swapped.

MACs per sample: Conv ``M*H'*W' * (C/g)*prod(k)`` (output positions times the filter
size); ConvTranspose ``C*H*W * (M/g)*prod(k)`` (input positions times the filter size).

Bias fold of the repair (removed input channels c with means m_c): Conv
``b[o] += mean over output positions of conv(x_m)[o]``, x_m holding m_c on the removed
channels and 0 elsewhere (exact at padded borders; away from them
``sum_{c removed in o's group} m_c sum_k W[o, c mod C/g, k]``, the fallback for
``auto_pad``); ConvTranspose (group 1) ``b[o] += sum_{c removed} m_c sum_k W[c, o, k]``
(borders ignored).
"""
from __future__ import annotations

import numpy as np

from .base import (ROLE_CHAN, ROLE_IN, ROLE_OUT, NodeChannels, OpRule, ParamSlice, attr,
                   block_all, register)


def _tie_positions(res: NodeChannels, value: str, width: int, groups: int) -> None:
    """Tie position j of group 0 with position j of every other group of `value`."""
    per = width // groups
    if groups <= 1:
        return
    j = np.tile(np.arange(per), groups - 1)
    res.tie(value, value, ia=j, ib=j + np.repeat(np.arange(1, groups) * per, per))


def _explicit_pads(node) -> bool:
    return attr(node, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")


def torch_pads(node, spatial: int) -> list[int]:
    """ONNX ``pads`` (all begins, then all ends) in ``torch.nn.functional.pad`` order."""
    pads = list(attr(node, "pads", [0] * 2 * spatial))
    return [v for i in reversed(range(spatial)) for v in (pads[i], pads[i + spatial])]


def _conv_response(node, w: np.ndarray, removed, m, in_shape) -> np.ndarray | None:
    """Mean over output positions of the conv applied to the removed channels' means."""
    import torch
    import torch.nn.functional as F

    spatial = len(in_shape) - 2
    if not _explicit_pads(node) or spatial not in (1, 2, 3):
        return None
    x = torch.zeros((1, *in_shape[1:]), dtype=torch.float64)
    x[0, torch.as_tensor(removed)] = torch.as_tensor(m, dtype=torch.float64).view(
        -1, *([1] * spatial))
    conv = (F.conv1d, F.conv2d, F.conv3d)[spatial - 1]
    y = conv(F.pad(x, torch_pads(node, spatial)), torch.as_tensor(w), stride=attr(node, "strides", 1),
             dilation=attr(node, "dilations", 1), groups=attr(node, "group", 1))
    return y[0].flatten(1).mean(dim=1).numpy()


def _weight_shape(node, view):
    w = view.input(node, 1)
    return view.shape(w) if w and view.is_const(w) else None


class _Weighted(OpRule):
    """Facts shared by Conv and ConvTranspose: weight W and bias B are trained."""

    def weight_slots(self, node):
        return (1, 2)

    def output_bias(self, node):
        return (2, 1.0)


def _bias(node, ctx, res: NodeChannels, b: str | None, y: str) -> None:
    """The bias is cut with the outputs; one the graph computes keeps them all."""
    if not b:
        return
    if ctx.is_const_param(b):
        res.params.append(ParamSlice(node.name, 2, b, 0, y, ROLE_CHAN))
    else:
        res.blocked.append((y, f"{node.op_type} bias is computed, not constant"))


def _input_ok(node, ctx, res: NodeChannels, x: str) -> bool:
    """Conv-like ops read channels on axis 1; anything else blocks the input."""
    if ctx.axis(x) == 1:
        return True
    if ctx.has_channels(x):
        res.blocked.append((x, f"{node.op_type} reads channels on axis 1, "
                               f"but they arrive on axis {ctx.axis(x)}"))
    return False


@register("Conv")
class ConvRule(_Weighted):
    def analyze(self, node, ctx):
        x, w, y = node.input[0], node.input[1], node.output[0]
        if not ctx.is_const_param(w):
            return block_all(node, ctx, "Conv weights are computed, not constant")
        b = ctx.view.input(node, 2)
        m, cg = ctx.shape(w)[:2]
        groups = attr(node, "group", 1)
        res = NodeChannels(out_axes={y: 1})
        res.params.append(ParamSlice(node.name, 1, w, 0, y, ROLE_OUT))
        _bias(node, ctx, res, b, y)
        if not _input_ok(node, ctx, res, x):
            if groups > 1:
                res.blocked.append((y, "grouped Conv whose input channels must stay"))
            return res
        c = ctx.width(x)
        if groups == 1:
            res.params.append(ParamSlice(node.name, 1, w, 1, x, ROLE_IN))
        elif cg == 1:  # depthwise, multiplier m // c
            mult = m // c
            res.tie(x, y, ia=np.repeat(np.arange(c), mult), ib=np.arange(m))
        else:
            _tie_positions(res, x, c, groups)
            _tie_positions(res, y, m, groups)
            res.params.append(ParamSlice(node.name, 1, w, 1, x, ROLE_IN,
                                         index=np.arange(c) % cg))
        return res

    def rewrite(self, node, edit):
        w = edit.original(node.input[1])
        if edit.view.shape(w)[1] == 1 and attr(node, "group", 1) > 1:
            kept = edit.kept(node.input[0])
            if kept is not None:
                edit.set_attr(node, "group", len(kept))

    def macs(self, node, view):
        w = _weight_shape(node, view)
        if w is None:
            return {}
        return {1: int(np.prod(view.shape(node.output[0])[1:])) * int(np.prod(w[1:]))}

    def bias_delta(self, node, w, removed, means, p, in_shape):
        w = w.astype(np.float64)
        if in_shape is not None:
            exact = _conv_response(node, w, removed, means, in_shape)
            if exact is not None:
                return exact
        wsum = w.reshape(w.shape[0], w.shape[1], -1).sum(axis=2)   # (M, C/g)
        groups, cg = attr(node, "group", 1), w.shape[1]
        mg = w.shape[0] // groups
        delta = np.zeros(w.shape[0])
        cols = removed if p.index is None else p.index[removed]
        for c, j, mean in zip(removed, cols, means):
            gi = c // cg if groups > 1 else 0
            delta[gi * mg:(gi + 1) * mg] += mean * wsum[gi * mg:(gi + 1) * mg, j]
        return delta

    def refittable(self, node, view):
        """2-D, group 1, explicit pads."""
        w = _weight_shape(node, view)
        return (w is not None and len(w) == 4 and attr(node, "group", 1) == 1
                and _explicit_pads(node))


OPTIMISED = "onnxruntime-optimised graph: prune the model saved before its optimisations"


@register("FusedConv", domain="com.microsoft")
class FusedConvRule(OpRule):
    """onnxruntime's Conv + activation (ORT_ENABLE_EXTENDED writes it): its channels stay,
    but it is a Conv and counts a Conv's MACs."""

    def analyze(self, node, ctx):
        return block_all(node, ctx, f"com.microsoft::FusedConv: {OPTIMISED}")

    def macs(self, node, view):
        return ConvRule.macs(self, node, view)


@register("ConvTranspose")
class ConvTransposeRule(_Weighted):
    def analyze(self, node, ctx):
        x, w, y = node.input[0], node.input[1], node.output[0]
        if not ctx.is_const_param(w):
            return block_all(node, ctx, "ConvTranspose weights are computed, not constant")
        b = ctx.view.input(node, 2)
        c, mg = ctx.shape(w)[:2]
        groups = attr(node, "group", 1)
        m = mg * groups
        res = NodeChannels(out_axes={y: 1})
        _bias(node, ctx, res, b, y)
        if groups > 1 and groups == c:  # depthwise transpose: rows are input channels
            res.params.append(ParamSlice(node.name, 1, w, 0, x, ROLE_OUT))
            if _input_ok(node, ctx, res, x):
                res.tie(x, y, ia=np.repeat(np.arange(c), mg), ib=np.arange(m))
            else:
                res.blocked.append((y, "depthwise ConvTranspose whose input channels must stay"))
            return res
        res.params.append(ParamSlice(node.name, 1, w, 1, y, ROLE_OUT, index=np.arange(m) % mg))
        _tie_positions(res, y, m, groups)
        if _input_ok(node, ctx, res, x):
            res.params.append(ParamSlice(node.name, 1, w, 0, x, ROLE_IN))
            _tie_positions(res, x, c, groups)
        return res

    def rewrite(self, node, edit):
        groups = attr(node, "group", 1)
        if groups > 1 and groups == edit.view.shape(edit.original(node.input[1]))[0]:
            kept = edit.kept(node.input[0])
            if kept is not None:
                edit.set_attr(node, "group", len(kept))

    def macs(self, node, view):
        w = _weight_shape(node, view)
        if w is None:
            return {}
        return {1: int(np.prod(view.shape(node.input[0])[1:])) * int(np.prod(w[1:]))}

    def bias_delta(self, node, w, removed, means, p, in_shape):
        if attr(node, "group", 1) != 1:
            return None
        wsum = w.astype(np.float64).reshape(w.shape[0], w.shape[1], -1).sum(axis=2)  # (C, M)
        return means @ wsum[removed]

    def refittable(self, node, view):
        """2-D, group 1, explicit pads within the kernel's reach, no ``output_shape``: then
        it is a Conv of the stride-spread input with the flipped kernel (``repair``)."""
        w = _weight_shape(node, view)
        if (w is None or len(w) != 4 or attr(node, "group", 1) != 1
                or not _explicit_pads(node) or attr(node, "output_shape", None) is not None):
            return False
        reach = [d * (k - 1) for d, k in zip(attr(node, "dilations", [1, 1]), w[2:])]
        pads = list(attr(node, "pads", [0] * 4))
        return all(pads[i] <= reach[i] and pads[i + 2] <= reach[i] for i in range(2))
