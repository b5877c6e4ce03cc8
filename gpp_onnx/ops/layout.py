"""Ops that move the channel axis or reinterpret it: Flatten, Reshape, Transpose,
Squeeze, Unsqueeze, Expand, Tile, Shape (and ConstantOfShape, which has no channels).

Flatten / Reshape keep row-major order. With the channel axis at ``a`` of input shape
``s`` and the dims before it unchanged, flat position t of the trailing block belongs
to input channel ``(t // prod(s[a+1:])) % s[a]`` and to output element
``t // prod(s_out[a+1:])``; those two are tied. ``(N,C,H,W) -> (N, C*H*W)`` thus ties
channel c with features ``c*H*W ..``, and a reshape into heads ties a head's channels.
Two more Reshape forms keep the channels apart:

* axes ``p .. a-1`` merged into the channel axis (dims before p unchanged, p >= 1):
  the block starts at p and output axis p holds the channels, e.g. a bidirectional
  recurrent output ``(seq, batch, dirs, H) -> (seq, batch, dirs*H)`` ties hidden unit j
  with features ``d*H + j``;
* leading axes merged or split while the channel axis and all after it stay
  (``(seq, batch, F) -> (seq*batch, F)``): channels are tied one to one on the output
  axis ``rank_out - (rank_in - a)`` (not axis 0); this form is tried first.

Surgery writes the new width into the Reshape's shape constant (``-1`` entries stay). A
computed shape is followed when it is a Concat of one-entry pieces whose channel entry
is a constant, -1 or the width (PyTorch's ``view(T * b, h)``); surgery rewrites that piece.
A piece that re-reads the width from the reshaped tensor itself (Shape -> Gather(a) ->
Unsqueeze, ``view(T * b, y.size(2))``) needs no rewrite: it reads the new width at run time.
"""
from __future__ import annotations

import numpy as np

from .base import NodeChannels, OpRule, attr, block_all, norm_axis, pass_through, register
from .shape_reads import (_own_width_dim, _reads_only_own_width, _reshape_axes,
                          shape_dims_read)


def _flat_ties(res, x, y, s_in, a, start, s_out_inner):
    """Tie x's channel elements to y's elements over the flat block s_in[start:]."""
    inner = int(np.prod(s_in[a + 1:], dtype=np.int64))
    t = np.arange(int(np.prod(s_in[start:], dtype=np.int64)))
    pairs = np.unique(np.stack([(t // inner) % s_in[a], t // s_out_inner]), axis=1)
    res.tie(x, y, ia=pairs[0], ib=pairs[1])


@register("Flatten")
class FlattenRule(OpRule):
    def analyze(self, node, ctx):
        x, y = node.input[0], node.output[0]
        a = ctx.axis(x)
        if a is None:
            return NodeChannels(out_axes={y: None})
        s = ctx.shape(x)
        start = norm_axis(attr(node, "axis", 1), len(s))
        if a < start:
            return block_all(node, ctx, "Flatten merges the channel axis into the batch axis")
        res = NodeChannels(out_axes={y: 1})
        _flat_ties(res, x, y, s, a, start, 1)
        return res

    def feature_pass(self, node, view):
        return True


@register("Reshape")
class ReshapeRule(OpRule):
    def analyze(self, node, ctx):
        x, shp, y = node.input[0], node.input[1], node.output[0]
        a = ctx.axis(x)
        if a is None:
            return NodeChannels(out_axes={y: None})
        s_in, s_out = ctx.shape(x), ctx.shape(y)
        start, out_axis = _reshape_axes(s_in, s_out, a)
        if out_axis is None:
            return block_all(node, ctx, "Reshape moves the channel axis into leading axes")
        if not ctx.is_const_param(shp) and _shape_piece(ctx.view, node, out_axis, s_out) is None:
            return block_all(node, ctx, "Reshape target shape is computed, not constant")
        res = NodeChannels(out_axes={y: out_axis})
        if start is None:  # channel axis and everything after it unchanged
            res.tie(x, y, width=s_in[a])
        else:
            _flat_ties(res, x, y, s_in, a, start, int(np.prod(s_out[start + 1:], dtype=np.int64)))
        return res

    def rewrite(self, node, edit):
        y = node.output[0]
        kept = edit.kept(y)
        if kept is None:
            return
        a = edit.axis(y)
        shape = edit.view.const(node.input[1])
        if shape is not None:
            if shape[a] > 0:
                new = shape.copy()
                new[a] = len(kept)
                edit.set_input_const(node, 1, new)
            return
        concat, piece = _shape_piece(edit.view, node, a, edit.view.shape(y))
        if piece is not None and piece.ravel()[0] > 0:  # the width itself: view(T * b, h)
            target = next(n for n in edit.model.graph.node if n.name == concat.name)
            edit.set_input_const(target, a, np.full_like(piece, len(kept)))

    def feature_pass(self, node, view):
        return True


def _shape_piece(view, node, axis: int, s_out):
    """(Concat, constant piece) when a computed target shape is a Concat of one-entry
    pieces whose entry `axis` is the constant -1 or the channel count itself (which only
    this Reshape reads and the model does not return, so surgery may rewrite it); else None."""
    prod = view.producer.get(node.input[1])
    if prod is None or prod.op_type != "Concat" or len(prod.input) != len(s_out):
        return None
    piece = view.const(prod.input[axis])
    if piece is None:
        own = _own_width_dim(view, prod.input[axis], node.input[0])
        keeps = None if own is None else _reshape_axes(view.shape(node.input[0]), s_out, own)[1]
        return (prod, None) if keeps == axis else None  # the width re-read at run time
    if piece.size != 1:
        return None
    value = int(piece.ravel()[0])
    if value == -1 or (value == s_out[axis] and view.read_once(node.input[1])):
        return prod, piece
    return None


@register("Transpose")
class TransposeRule(OpRule):
    def analyze(self, node, ctx):
        x, y = node.input[0], node.output[0]
        a = ctx.axis(x)
        if a is None:
            return NodeChannels(out_axes={y: None})
        perm = attr(node, "perm", list(range(len(ctx.shape(x))))[::-1])
        return pass_through(node, ctx, list(perm).index(a))


def _axes(node, ctx, index):
    if len(node.input) > index and node.input[index]:
        const = ctx.const(node.input[index])
        return None if const is None else [int(v) for v in np.ravel(const)]
    return attr(node, "axes")


@register("Squeeze", "Unsqueeze")
class SqueezeRule(OpRule):
    def analyze(self, node, ctx):
        x, y = node.input[0], node.output[0]
        a = ctx.axis(x)
        if a is None:
            return NodeChannels(out_axes={y: None})
        axes = _axes(node, ctx, 1)
        s_in, s_out = ctx.shape(x), ctx.shape(y)
        if node.op_type == "Squeeze":
            axes = [i for i, d in enumerate(s_in) if d == 1] if axes is None else axes
            axes = {norm_axis(v, len(s_in)) for v in axes}
            if a in axes:
                return NodeChannels(out_axes={y: None})
            out_axis = a - sum(v < a for v in axes)
        else:
            if axes is None:
                return block_all(node, ctx, "Unsqueeze axes are computed, not constant")
            axes = {norm_axis(v, len(s_out)) for v in axes}
            out_axis = [i for i in range(len(s_out)) if i not in axes][a]
        return pass_through(node, ctx, out_axis)

    def feature_pass(self, node, view):
        return node.op_type == "Squeeze"


@register("Expand", "Tile")
class ExpandRule(OpRule):
    def analyze(self, node, ctx):
        x, y = node.input[0], node.output[0]
        a = ctx.axis(x)
        if a is None:
            return NodeChannels(out_axes={y: None})
        s_in, s_out = ctx.shape(x), ctx.shape(y)
        out_axis = a + len(s_out) - len(s_in)
        if s_out[out_axis] != s_in[a] or not ctx.is_const_param(node.input[1]):
            return block_all(node, ctx, f"{node.op_type} repeats the channel axis")
        return pass_through(node, ctx, out_axis)

    def rewrite(self, node, edit):
        x = node.input[0]
        kept = edit.kept(x)
        shape = edit.view.const(node.input[1])
        if kept is None or node.op_type == "Tile":
            return
        pos = edit.axis(x) + len(shape) - len(edit.view.shape(x))
        if pos >= 0 and shape[pos] == edit.view.shape(x)[edit.axis(x)] and shape[pos] != 1:
            new = shape.copy()
            new[pos] = len(kept)
            edit.set_input_const(node, 1, new)

    def weight_slots(self, node):
        """Learned tokens broadcast over the batch (ViT class token)."""
        return (0,) if node.op_type == "Expand" else ()

    def scalar_weights(self, node):
        return False


@register("Shape")
class ShapeRule(OpRule):
    """Shape is harmless when only other axes' sizes are read from it (by a Gather or a
    step-1 Slice with constant bounds)."""

    def analyze(self, node, ctx):
        x, y = node.input[0], node.output[0]
        a = ctx.axis(x)
        res = NodeChannels(out_axes={y: None})
        if a is not None:
            read = shape_dims_read(ctx.view, node)
            if (read is None or a in read) and not _reads_only_own_width(ctx.view, node, a):
                res.blocked.append((x, "the channel count is read by Shape and used "
                                       "in computation"))
        return res


@register("ConstantOfShape")
class ConstantOfShapeRule(OpRule):
    """A filled tensor carries no channels (a consumer that needs them blocks there)."""

    def analyze(self, node, ctx):
        return NodeChannels(out_axes={node.output[0]: None})
