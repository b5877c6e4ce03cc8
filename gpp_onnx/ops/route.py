"""Ops that route channels: Concat, Split, Slice, Gather, Pad, Resize/Upsample.

Along the channel axis:
* Concat: ``y[off_i + k] = x_i[k]`` (each branch owns its slice: Inception modules);
* Split: ``y_i[k] = x[off_i + k]``; surgery rewrites the split sizes;
* Slice (step 1): ``y[k] = x[s + k]``; surgery moves s and e to the kept positions;
* Gather with 1-D constant indices: ``y[k] = x[idx[k]]`` (channel shuffles arrive here,
  see model.normalize); surgery re-indexes.
Along any other axis these ops leave channels in place (tied one to one). Pad and
Resize must not change the channel axis (zero pads, scale 1); Resize ``sizes`` is
rewritten with the new width.
"""
from __future__ import annotations

import numpy as np

from .base import (ROLE_CHAN, NodeChannels, OpRule, ParamSlice, attr, block_all, norm_axis,
                   pass_through, register)


def _same_axis(node, ctx, res: NodeChannels, axis: int) -> NodeChannels:
    """Tie every channel-bearing input/output one to one (op acts on another axis)."""
    src = [x for x in node.input if ctx.has_channels(x)]
    width = ctx.width(src[0])
    for out in node.output:
        if out:
            res.out_axes[out] = axis
            for x in src:
                res.tie(x, out, width=width)
    return res


@register("Concat")
class ConcatRule(OpRule):
    def analyze(self, node, ctx):
        y = node.output[0]
        rank = len(ctx.shape(y))
        k = norm_axis(attr(node, "axis"), rank)
        axes = {ctx.axis(x) for x in node.input if ctx.has_channels(x)}
        if not axes:
            return NodeChannels(out_axes={y: None})
        if len(axes) > 1:
            return block_all(node, ctx, "Concat inputs carry channels on different axes")
        a = axes.pop()
        res = NodeChannels(out_axes={y: a})
        if a != k:
            width = ctx.shape(y)[a]
            for i, x in enumerate(node.input):
                if ctx.has_channels(x) or ctx.shape(x)[a] != width or width == 1:
                    continue
                if ctx.is_const_param(x):
                    res.params.append(ParamSlice(node.name, i, x, a, y, ROLE_CHAN))
                    continue
                token = _broadcast_token(x, a, ctx)
                if token is None:
                    return block_all(node, ctx, f"Concat input '{x}' is computed without a "
                                                "channel rule")
                res.params.append(ParamSlice(token.name, 0, token.input[0], a, y, ROLE_CHAN))
            return _same_axis(node, ctx, res, a)
        offset = 0
        for x in node.input:
            n = ctx.shape(x)[k]
            if ctx.has_channels(x):
                res.tie(x, y, ia=np.arange(n), ib=offset + np.arange(n))
            offset += n
        return res


def _broadcast_token(x: str, a: int, ctx):
    """The Expand that repeats a learned constant over the batch (a ViT class token,
    ``(1, 1, C)`` expanded to ``(N, 1, C)``), when its target leaves axis `a` alone (1
    there); its constant is then sliced with the channels. None for anything else, also
    where another node (or the model's output) reads `x`: the cut would shrink it there too."""
    node = ctx.view.producer.get(x)
    if node is None or node.op_type != "Expand" or not ctx.is_const_param(node.input[0]) \
            or not ctx.view.read_once(x):
        return None
    token, target = ctx.shape(node.input[0]), ctx.view.probed(node.input[1])
    if target is None:
        target = ctx.const(node.input[1])
    rank = len(ctx.shape(x))
    if target is None or len(token) != rank or len(target) > rank:
        return None
    at = a - (rank - len(target))
    return node if at < 0 or int(target[at]) == 1 else None


@register("Split")
class SplitRule(OpRule):
    def analyze(self, node, ctx):
        x = node.input[0]
        a = ctx.axis(x)
        if a is None:
            return NodeChannels(out_axes={o: None for o in node.output if o})
        k = norm_axis(attr(node, "axis", 0), len(ctx.shape(x)))
        res = NodeChannels()
        if a != k:
            return _same_axis(node, ctx, res, a)
        offset = 0
        for out in node.output:
            n = ctx.shape(out)[k]
            res.out_axes[out] = a
            res.tie(x, out, ia=offset + np.arange(n), ib=np.arange(n))
            offset += n
        return res

    def rewrite(self, node, edit):
        x = node.input[0]
        if edit.axis(x) != norm_axis(attr(node, "axis", 0), len(edit.view.shape(x))):
            return
        if all(edit.kept(o) is None for o in node.output):
            return
        sizes = np.array([len(edit.kept_or_all(o)) for o in node.output], dtype=np.int64)
        edit.remove_attr(node, "num_outputs")
        if edit.opset >= 13:
            edit.set_input_const(node, 1, sizes)
        else:
            edit.set_attr(node, "split", sizes.tolist())


def _slice_params(node, ctx, rank):
    consts = [ctx.const(node.input[i]) if len(node.input) > i and node.input[i] else None
              for i in range(1, 5)]
    starts, ends, axes, steps = consts
    if starts is None or ends is None:
        return None
    axes = list(range(len(starts))) if axes is None else [norm_axis(int(v), rank) for v in axes]
    steps = [1] * len(starts) if steps is None else [int(v) for v in steps]
    return [int(v) for v in starts], [int(v) for v in ends], axes, steps


def _clamp(v: int, n: int) -> int:
    v = v + n if v < 0 else v
    return min(max(v, 0), n)


@register("Slice", since=10)
class SliceRule(OpRule):
    def analyze(self, node, ctx):
        x, y = node.input[0], node.output[0]
        a = ctx.axis(x)
        if a is None:
            return NodeChannels(out_axes={y: None})
        params = _slice_params(node, ctx, len(ctx.shape(x)))
        if params is None:
            return block_all(node, ctx, "Slice bounds are computed, not constant")
        starts, ends, axes, steps = params
        if a not in axes:
            return pass_through(node, ctx)
        res = NodeChannels(out_axes={y: a})
        i = axes.index(a)
        if steps[i] != 1:
            return block_all(node, ctx, "Slice with a step along the channel axis")
        s = _clamp(starts[i], ctx.width(x))
        n = ctx.shape(y)[a]
        res.tie(x, y, ia=s + np.arange(n), ib=np.arange(n))
        return res

    def rewrite(self, node, edit):
        x, y = node.input[0], node.output[0]
        kept_x = edit.kept(x)
        if kept_x is None:
            return
        starts, ends, axes, _ = _slice_params(node, edit, len(edit.view.shape(x)))
        a = edit.axis(x)
        if a not in axes:
            return
        i = axes.index(a)
        width = edit.view.shape(x)[a]
        s = _clamp(starts[i], width)
        e = s + edit.view.shape(y)[a]
        # in the bounds' own index type: Slice's starts, ends, axes and steps share one
        # (int32 or int64); int64 bounds beside int32 axes fail the checker
        dtype = edit.view.const(node.input[1]).dtype
        new_starts, new_ends = np.array(starts, dtype), np.array(ends, dtype)
        new_starts[i] = int(np.searchsorted(kept_x, s))
        new_ends[i] = int(np.searchsorted(kept_x, e))
        edit.set_input_const(node, 1, new_starts)
        edit.set_input_const(node, 2, new_ends)


@register("Gather")
class GatherRule(OpRule):
    def analyze(self, node, ctx):
        x, idx, y = node.input[0], node.input[1], node.output[0]
        a = ctx.axis(x)
        if a is None:
            return NodeChannels(out_axes={y: None})
        k = norm_axis(attr(node, "axis", 0), len(ctx.shape(x)))
        indices = ctx.const(idx)
        if a != k:
            shift = 0 if a < k else len(ctx.shape(idx)) - 1
            res = NodeChannels(out_axes={y: a + shift})
            res.tie(x, y, width=ctx.width(x))
            return res
        if indices is None or indices.ndim != 1:
            return block_all(node, ctx, "Gather picks channels with computed or scalar indices")
        src = np.where(indices < 0, indices + ctx.width(x), indices)
        res = NodeChannels(out_axes={y: a})
        res.tie(x, y, ia=src, ib=np.arange(len(src)))
        return res

    def rewrite(self, node, edit):
        x, y = node.input[0], node.output[0]
        a = edit.axis(x)
        if a is None or a != norm_axis(attr(node, "axis", 0), len(edit.view.shape(x))):
            return
        kept_x = edit.kept(x)
        if kept_x is None and edit.kept(y) is None:
            return
        kept_y = edit.kept_or_all(y)
        indices = edit.view.const(node.input[1])
        src = np.where(indices < 0, indices + edit.view.shape(x)[a], indices)[kept_y]
        if kept_x is not None:
            src = np.searchsorted(kept_x, src)
        edit.set_input_const(node, 1, src.astype(indices.dtype))


@register("Pad", since=11)
class PadRule(OpRule):
    def analyze(self, node, ctx):
        x, y = node.input[0], node.output[0]
        a = ctx.axis(x)
        if a is None:
            return NodeChannels(out_axes={y: None})
        if ctx.shape(y)[a] != ctx.shape(x)[a] or not ctx.is_const_param(node.input[1]) \
                or _pads_channel_axis(node, ctx, a):
            return block_all(node, ctx, "Pad changes (or may change) the channel axis")
        return pass_through(node, ctx)


def _pads_channel_axis(node, ctx, a: int) -> bool:
    """True when the pads of channel axis `a` are not both 0 (or the axes input of
    opset 18 is computed): begin -1 with end +1 keeps the width but shifts the channels,
    so channel k of the output is not channel k of the input."""
    rank = len(ctx.shape(node.input[0]))
    pads = [int(v) for v in np.ravel(ctx.const(node.input[1]))]
    axes = list(range(rank))
    if len(node.input) > 3 and node.input[3]:
        const = ctx.const(node.input[3])
        if const is None:
            return True
        axes = [norm_axis(int(v), rank) for v in np.ravel(const)]
    if a not in axes:
        return False
    i = axes.index(a)
    return bool(pads[i] or pads[i + len(axes)])


@register("Resize", "Upsample")
class ResizeRule(OpRule):
    def analyze(self, node, ctx):
        x, y = node.input[0], node.output[0]
        a = ctx.axis(x)
        if a is None:
            return NodeChannels(out_axes={y: None})
        from .shape_reads import resize_keeps_own_width

        sizes = node.input[3] if len(node.input) > 3 and node.input[3] else None
        computed = sizes and not ctx.is_const_param(sizes)
        if ctx.shape(y)[a] != ctx.shape(x)[a] or attr(node, "axes") is not None or (
                computed and not resize_keeps_own_width(ctx.view, node, a)):
            return block_all(node, ctx, "Resize changes (or may change) the channel axis")
        return pass_through(node, ctx)

    def rewrite(self, node, edit):
        kept = edit.kept(node.input[0])
        if kept is None or len(node.input) < 4 or not node.input[3] \
                or edit.view.const(node.input[3]) is None:  # computed: follows the cut
            return
        sizes = edit.view.const(node.input[3]).copy()
        sizes[edit.axis(node.input[0])] = len(kept)
        edit.set_input_const(node, 3, sizes)
