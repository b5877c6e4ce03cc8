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
from .route import _slice_params


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


def _reshape_axes(s_in, s_out, a) -> tuple[int | None, int | None]:
    """(start of the flat block or None for the unchanged tail, output channel axis);
    (None, None) when the channel axis would mix with leading axes."""
    b = len(s_out) - (len(s_in) - a)
    if b >= 1 and tuple(s_out[b:]) == tuple(s_in[a:]):
        return None, b
    p = 0
    while p < min(a, len(s_out)) and s_in[p] == s_out[p]:
        p += 1
    if len(s_out) > p and (p == a or p >= 1):
        return p, p
    return None, None


def _shape_piece(view, node, axis: int, s_out):
    """(Concat, constant piece) when a computed target shape is a Concat of one-entry
    pieces whose entry `axis` is the constant -1 or the channel count itself (which only
    this Reshape reads, so surgery may rewrite it); else None."""
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
    if value == -1 or (value == s_out[axis] and len(view.consumers.get(node.input[1], [])) == 1):
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


def shape_dims_read(view, node) -> set[int] | None:
    """Dims of Shape(x) that its consumers read (Gather or Slice with constant indices);
    None when some consumer may read any of them."""
    read: set[int] = set()
    for user in view.consumers.get(node.output[0], []):
        picked = _dims_read_by(view, node, user)
        if picked is None:
            return None
        read |= picked
    return read


def _dims_read_by(view, node, user) -> set[int] | None:
    """Dims of x that `user` reads from Shape(x) (`node`); None: any of them."""
    rank = len(view.shape(node.input[0]))
    start = norm_axis(attr(node, "start", 0), rank)
    end = norm_axis(attr(node, "end", rank), rank) if attr(node, "end") is not None else rank
    picked = _user_reads(view, node.output[0], user, max(min(end, rank) - start, 0))
    return None if picked is None else {start + i for i in picked}


def _positions_read(view, value: str, n: int) -> set[int] | None:
    """Positions of the shape vector `value` (length n) its consumers read; None: any."""
    read: set[int] = set()
    for user in view.consumers.get(value, []):
        sub = _user_reads(view, value, user, n)
        if sub is None:
            return None
        read |= sub
    return read


def _user_reads(view, value: str, user, n: int) -> set[int] | None:
    """Positions of the shape vector `value` (length n) that `user` reads: Gather and
    Slice with constant indices pick some (and when they pick a vector, only the positions
    their own consumers read count: tf2onnx permutes a shape, then slices the batch out
    of it), Cast and Identity pass them on; None when `user` may read any."""
    if user.op_type in ("Cast", "Identity"):
        return _positions_read(view, user.output[0], n)
    if user.op_type == "Gather" and user.input[0] == value and view.const(user.input[1]) is not None:
        index = view.const(user.input[1])
        picked = [norm_axis(int(i), n) for i in np.ravel(index)]
    elif user.op_type == "Slice" and user.input[0] == value and _const_slice(view, user) is not None:
        picked = list(range(n)[_const_slice(view, user)])
        index = picked
    else:
        return None
    if np.ndim(index) == 0:
        return set(picked)
    inner = _positions_read(view, user.output[0], len(picked))
    return set(picked) if inner is None else {picked[p] for p in inner}


def _reads_only_own_width(view, node, a: int) -> bool:
    """Every read of x's channel count `a` from Shape(x) (`node`) is the channel entry of
    a computed target shape of a Reshape of x itself (PyTorch's
    ``x.view(T * b, x.size(2))``): after a cut the runtime reads the new width there, so
    that shape follows the cut without being rewritten."""
    for user in view.consumers.get(node.output[0], []):
        dims = _dims_read_by(view, node, user)
        if dims is not None and a not in dims:
            continue
        if _into_own_resizes(view, user, node.input[0], a):
            continue
        if dims is None or _own_width_dim(view, user.output[0], node.input[0]) != a or not all(
                _own_width_piece(view, r, a) for r in _reshapes_fed(view, user.output[0])):
            return False
    return True


def _into_own_resizes(view, user, x: str, a: int) -> bool:
    """The shape vector `user` passes on (through constant Slices and Casts) ends in one
    Concat whose result is only the ``sizes`` of Resizes of x itself that hold x's own
    channel count there (``resize_keeps_own_width``)."""
    node = user
    while node.op_type in ("Slice", "Cast", "Identity"):
        users = view.consumers.get(node.output[0], [])
        if len(users) != 1:
            return False
        node = users[0]
    if node.op_type != "Concat":
        return False
    resizes, todo = [], [node.output[0]]
    while todo:
        for u in view.consumers.get(todo.pop(), []):
            if u.op_type in ("Cast", "Identity"):
                todo.append(u.output[0])
            else:
                resizes.append(u)
    return bool(resizes) and all(r.op_type == "Resize" and r.input[0] == x
                                 and resize_keeps_own_width(view, r, a) for r in resizes)


def shape_vector_dims(view, value: str, x: str) -> list[int] | None:
    """The dims of x that the 1-D vector `value` holds, in order, when it is ``Shape(x)``
    (with its start/end) cut by constant Slices or passed through Casts; else None."""
    node = view.producer.get(value)
    if node is None:
        return None
    if node.op_type in ("Cast", "Identity"):
        return shape_vector_dims(view, node.input[0], x)
    if node.op_type == "Slice":
        inner, cut = shape_vector_dims(view, node.input[0], x), _const_slice(view, node)
        return None if inner is None or cut is None else inner[cut]
    if node.op_type != "Shape" or node.input[0] != x:
        return None
    rank = len(view.shape(x))
    start = norm_axis(attr(node, "start", 0), rank)
    end = rank if attr(node, "end") is None else norm_axis(attr(node, "end"), rank)
    return list(range(start, max(start, min(end, rank))))


def resize_keeps_own_width(view, resize, a: int) -> bool:
    """A Resize of x whose computed ``sizes`` hold x's own channel count at position `a`
    (PyTorch's ``F.interpolate(x, size=...)``: ``Concat(Shape(x)[0:2], hw)``): the runtime
    reads the new width after a cut, so the sizes follow it without a rewrite."""
    sizes = resize.input[3] if len(resize.input) > 3 else ""
    prod = view.producer.get(sizes)
    while prod is not None and prod.op_type in ("Cast", "Identity"):
        prod = view.producer.get(prod.input[0])
    if prod is None or prod.op_type != "Concat":
        return False
    offset = 0
    for piece in prod.input:
        shape = view.shape(piece)
        if shape is None or len(shape) != 1:
            return False
        if offset <= a < offset + shape[0]:
            dims = shape_vector_dims(view, piece, resize.input[0])
            return dims is not None and len(dims) == shape[0] and dims[a - offset] == a
        offset += shape[0]
    return False


def _own_width_dim(view, value: str, x: str) -> int | None:
    """d when `value` is ``[x.shape[d]]`` read by Shape -> Gather (-> Unsqueeze) and used
    only on that path, else None."""
    prod = view.producer.get(value)
    if prod is not None and prod.op_type == "Unsqueeze":
        if len(view.consumers.get(prod.input[0], [])) != 1:
            return None
        prod = view.producer.get(prod.input[0])
    if prod is None or prod.op_type != "Gather":
        return None
    shape = view.producer.get(prod.input[0])
    index = view.const(prod.input[1])
    if shape is None or shape.op_type != "Shape" or shape.input[0] != x or index is None \
            or index.size != 1:
        return None
    picked = _dims_read_by(view, shape, prod)
    return None if picked is None or len(picked) != 1 else next(iter(picked))


def _reshapes_fed(view, value: str) -> list:
    """The Reshapes whose target Concat takes `value` (through one Unsqueeze) as one
    entry; [None] when `value` goes anywhere else."""
    users = view.consumers.get(value, [])
    if len(users) == 1 and users[0].op_type == "Unsqueeze":
        value, users = users[0].output[0], view.consumers.get(users[0].output[0], [])
    if len(users) != 1 or users[0].op_type != "Concat" or list(users[0].input).count(value) != 1:
        return [None]
    reshapes = view.consumers.get(users[0].output[0], [])
    return [r if r.op_type == "Reshape" and r.input[1] == users[0].output[0] else None
            for r in reshapes] or [None]


def _own_width_piece(view, reshape, a: int) -> bool:
    """`reshape` keeps x's channel axis `a` on the output axis where its computed target
    shape holds ``x.shape[a]``."""
    if reshape is None:
        return False
    x, y = reshape.input[0], reshape.output[0]
    prod = view.producer.get(reshape.input[1])
    _, out_axis = _reshape_axes(view.shape(x), view.shape(y), a)
    return (out_axis is not None and len(prod.input) == len(view.shape(y))
            and _own_width_dim(view, prod.input[out_axis], x) == a)


def _const_slice(view, node) -> slice | None:
    """The slice a Slice node with constant bounds takes of a 1-D tensor, or None."""
    params = _slice_params(node, view, 1)
    if params is None or params[2] != [0]:
        return None
    starts, ends, _, steps = params
    return slice(starts[0], ends[0], steps[0])
