"""Index tracing: which input element lands where after a chain of layout ops.

A layout op (Reshape, Transpose, (Un)Squeeze, Gather / Slice / Split with constant
indices, Identity, scaling by a scalar) only moves elements. Pushing an integer array
through it in numpy - each entry holding, say, the channel its element came from -
gives, for every output element, that label; the probe's concrete shapes stand in for
computed reshape targets. `single_axis` then says along which one axis a labelling
varies, which is what a rule needs to cut a value along an axis.
"""
from __future__ import annotations

import numpy as np

from .base import attr, norm_axis
from .route import _slice_params


class NotFollowed(Exception):
    """A pattern does not hold; the message says why."""


LAYOUT = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Gather", "Slice", "Split",
          "Identity", "Dropout", "Mul", "Div")


def single_axis(name: str, labels: np.ndarray, count: int) -> int:
    """The one axis along which `labels` (0 .. count-1, e.g. the head of each element)
    vary, each label on the same number of positions; else NotFollowed."""
    varying = [i for i in range(labels.ndim)
               if labels.shape[i] > 1 and not (labels == labels.take([0], axis=i)).all()]
    if len(varying) != 1:
        raise NotFollowed(f"'{name}' has its heads along {len(varying)} axes")
    axis = varying[0]
    line = np.moveaxis(labels, axis, 0).reshape(labels.shape[axis], -1)
    if not (line == line[:, :1]).all() or len(set(np.bincount(line[:, 0], minlength=count))) != 1:
        raise NotFollowed(f"'{name}' does not hold its heads in equal slices")
    return axis


def apply_layout(view, node, array: np.ndarray, out: str) -> np.ndarray:
    """`node` applied to an index array that stands for its data input; `out` is the
    output followed."""
    op, rank = node.op_type, array.ndim
    if op in ("Reshape", "Squeeze", "Unsqueeze"):
        return array.reshape(view.shape(out))
    if op == "Transpose":
        return np.transpose(array, attr(node, "perm", list(range(rank))[::-1]))
    if op == "Gather":
        return np.take(array, view.const(node.input[1]), axis=op_axes(view, node, rank)[0])
    if op == "Split":
        axis = op_axes(view, node, rank)[0]
        sizes = [view.shape(o)[axis] for o in node.output]
        start = sum(sizes[:list(node.output).index(out)])
        return np.take(array, np.arange(start, start + view.shape(out)[axis]), axis=axis)
    if op == "Slice":
        starts, ends, axes, steps = _slice_params(node, view, rank)
        index = [slice(None)] * rank
        for s, e, a, st in zip(starts, ends, axes, steps):
            index[a] = slice(s, e, st)
        return array[tuple(index)]
    return array  # Identity, Dropout, scaling by a scalar


def op_axes(view, node, rank: int) -> list[int]:
    """The axes a Gather, Split or Slice node selects along."""
    if node.op_type == "Slice":
        return _slice_params(node, view, rank)[2]
    return [norm_axis(attr(node, "axis", 0), rank)]


def layout_ok(view, node) -> bool:
    if node.op_type == "Gather":
        return view.const(node.input[1]) is not None
    if node.op_type == "Slice":
        return _slice_params(node, view, len(view.shape(node.input[0]))) is not None
    if node.op_type in ("Mul", "Div"):
        return scalar_side(view, node) is not None
    return True


def scalar_side(view, node) -> str | None:
    """The size-1 operand of a Mul/Div whose other operand has the output's shape."""
    if len(node.input) != 2:
        return None
    a, b = node.input
    out = view.shape(node.output[0])
    for scalar, data in ((b, a), (a, b)):
        if node.op_type == "Div" and scalar == a:
            continue
        if int(np.prod(view.shape(scalar))) == 1 and view.shape(data) == out:
            return scalar
    return None


def data_input(view, node) -> str:
    if node.op_type in ("Mul", "Div"):
        scalar = scalar_side(view, node)
        return node.input[1] if scalar == node.input[0] else node.input[0]
    return node.input[0]


def const_input(view, node) -> bool:
    return any(view.is_const(i) for i in node.input if i)
