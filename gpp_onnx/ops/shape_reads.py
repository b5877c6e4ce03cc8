"""Reads of a tensor's size through Shape, and whether a cut can leave them alone.

A Shape of a channel-bearing tensor is harmless when only other axes' sizes are read
from it, or when its channel entry only goes where the runtime re-reads the new width
after a cut: the channel piece of a Reshape target of the tensor itself (PyTorch's
``x.view(T * b, x.size(2))``), or the ``sizes`` of a Resize of the tensor itself
(``F.interpolate(x, size=...)``: ``Concat(Shape(x)[0:2], hw)``).
"""
from __future__ import annotations

import numpy as np

from .base import attr, norm_axis
from .route import _slice_params


def _reshape_axes(s_in, s_out, a) -> tuple[int | None, int | None]:
    """(start of the flat block or None for the unchanged tail, output channel axis);
    (None, None) when the channel axis would mix with leading axes."""
    b = len(s_out) - (len(s_in) - a)
    if b >= 1 and tuple(s_out[b:]) == tuple(s_in[a:]):
        return None, b
    moved = _channels_alone(s_in, s_out, a)
    if moved is not None:
        return None, moved
    p = 0
    while p < min(a, len(s_out)) and s_in[p] == s_out[p]:
        p += 1
    if len(s_out) > p and (p == a or p >= 1):
        return p, p
    return None, None


def _channels_alone(s_in, s_out, a) -> int | None:
    """The output axis of the channels where every other axis but the batch's has size 1
    on both sides: the Reshape only moves the channel axis, as a Transpose would
    (TensorFlow's (N, C, 1, 1) -> (N, 1, 1, C) before a classifier); else None."""
    c = s_in[a]
    if not (isinstance(c, int) and c > 1 and len(s_in) > 1 and len(s_out) > 1
            and s_in[0] == s_out[0]):
        return None
    rest_in = [d for i, d in enumerate(s_in) if i not in (0, a)]
    axes = [k for k in range(1, len(s_out)) if s_out[k] == c]
    if any(d != 1 for d in rest_in) or len(axes) != 1:
        return None
    return axes[0] if all(d == 1 for k, d in enumerate(s_out) if k not in (0, axes[0])) \
        else None


def shape_dims_read(view, node) -> set[int] | None:
    """Dims of Shape(x) that its consumers read (Gather or Slice with constant indices);
    None when some consumer may read any of them (or the model returns it)."""
    if node.output[0] in view.output_names:
        return None
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
    """Positions of the shape vector `value` (length n) its consumers read; None: any
    (also where the model returns it)."""
    if value in view.output_names:
        return None
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
    if node.output[0] in view.output_names:   # the model returns the count itself
        return False
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
    channel count there (``resize_keeps_own_width``); the model returns none of these
    values (after a cut they hold the new width)."""
    node = user
    while node.op_type in ("Slice", "Cast", "Identity"):
        if not view.read_once(node.output[0]):
            return False
        node = view.consumers[node.output[0]][0]
    if node.op_type != "Concat":
        return False
    resizes, todo = [], [node.output[0]]
    while todo:
        value = todo.pop()
        if value in view.output_names:
            return False
        for u in view.consumers.get(value, []):
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
        if not view.read_once(prod.input[0]):
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
