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


def _input_ok(node, ctx, res: NodeChannels, x: str) -> bool:
    """Conv-like ops read channels on axis 1; anything else blocks the input."""
    if ctx.axis(x) == 1:
        return True
    if ctx.has_channels(x):
        res.blocked.append((x, f"{node.op_type} reads channels on axis 1, "
                               f"but they arrive on axis {ctx.axis(x)}"))
    return False


@register("Conv")
class ConvRule(OpRule):
    def analyze(self, node, ctx):
        x, w, y = node.input[0], node.input[1], node.output[0]
        if not ctx.is_const_param(w):
            return block_all(node, ctx, "Conv weights are computed, not constant")
        b = ctx.view.input(node, 2)
        m, cg = ctx.shape(w)[:2]
        groups = attr(node, "group", 1)
        res = NodeChannels(out_axes={y: 1})
        res.params.append(ParamSlice(node.name, 1, w, 0, y, ROLE_OUT))
        if b:
            res.params.append(ParamSlice(node.name, 2, b, 0, y, ROLE_CHAN))
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
        w = node.input[1]
        if edit.view.shape(w)[1] == 1 and attr(node, "group", 1) > 1:
            kept = edit.kept(node.input[0])
            if kept is not None:
                edit.set_attr(node, "group", len(kept))


@register("ConvTranspose")
class ConvTransposeRule(OpRule):
    def analyze(self, node, ctx):
        x, w, y = node.input[0], node.input[1], node.output[0]
        if not ctx.is_const_param(w):
            return block_all(node, ctx, "ConvTranspose weights are computed, not constant")
        b = ctx.view.input(node, 2)
        c, mg = ctx.shape(w)[:2]
        groups = attr(node, "group", 1)
        m = mg * groups
        res = NodeChannels(out_axes={y: 1})
        if b:
            res.params.append(ParamSlice(node.name, 2, b, 0, y, ROLE_CHAN))
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
        if groups > 1 and groups == edit.view.shape(node.input[1])[0]:
            kept = edit.kept(node.input[0])
            if kept is not None:
                edit.set_attr(node, "group", len(kept))
