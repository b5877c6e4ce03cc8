"""Layout, shape, indexing and constant ops (DepthToSpace / SpaceToDepth included), plus
Pad (Resize and Upsample: ops_resize.py)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .ops import ONNX_TO_TORCH_DTYPE, Node, ints, register
from .ops_nn import torch_pad


def constant_value(node: Node) -> torch.Tensor:
    """The tensor a Constant node holds (value / value_float(s) / value_int(s))."""
    attrs = node.attrs
    if "value" in attrs:
        return attrs["value"]
    for key, dtype in (("value_float", torch.float32), ("value_floats", torch.float32),
                       ("value_int", torch.int64), ("value_ints", torch.int64)):
        if key in attrs:
            return torch.tensor(attrs[key], dtype=dtype)
    raise node.fail(f"attribute {sorted(attrs)} is not supported; use a 'value' tensor")


register("Constant")(lambda node: constant_value(node))


@register("Identity")
def identity(node: Node, x):
    return x


def _check_cast(node: Node) -> None:
    if node.attr("to") not in ONNX_TO_TORCH_DTYPE:
        raise node.fail(f"cast to element type {node.attr('to')} is not supported; "
                        "cast to a float, int or bool type")


@register("Cast", check=_check_cast)
def cast(node: Node, x):
    return x.to(ONNX_TO_TORCH_DTYPE[node.attr("to")])


@register("CastLike")
def cast_like(node: Node, x, like):
    return x.to(like.dtype)


@register("Shape")
def shape(node: Node, x):
    dims = list(x.shape)[node.attr("start", 0):node.attr("end", x.dim())]
    return torch.tensor(dims, dtype=torch.int64, device=x.device)


@register("Size")
def size(node: Node, x):
    return torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


@register("ConstantOfShape")
def constant_of_shape(node: Node, dims):
    value = node.attr("value")
    value = torch.zeros(1, dtype=torch.float32) if value is None else value
    return torch.full(ints(dims), value.reshape(-1)[0].item(), dtype=value.dtype, device=dims.device)


@register("Flatten")
def flatten(node: Node, x):
    axis = node.attr("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis   # in [-r, r]: -1 is r - 1, not r
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@register("Reshape")
def reshape(node: Node, x, dims):
    """0 copies the input dim (unless allowzero=1), -1 is inferred."""
    target = ints(dims)
    if not node.attr("allowzero", 0):
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return x.reshape(target)


@register("Transpose")
def transpose(node: Node, x):
    return x.permute(node.attr("perm", list(range(x.dim() - 1, -1, -1))))


@register("Concat")
def concat(node: Node, *xs):
    return torch.cat(xs, dim=node.attr("axis"))


@register("Split")
def split(node: Node, x, sizes=None):
    """Sizes from the split input / attribute, else num_outputs (or one per output)
    chunks of ceil(dim / n), the last one smaller."""
    axis = node.attr("axis", 0) % x.dim()
    chunks = ints(sizes) if sizes is not None else node.attr("split")
    if not chunks:
        count = node.attr("num_outputs", len(node.outputs))
        step = -(-x.shape[axis] // count)
        chunks = [step] * (count - 1) + [x.shape[axis] - step * (count - 1)]
    return tuple(torch.split(x, chunks, dim=axis))


def _slice_bounds(start: int, end: int, step: int, dim: int) -> tuple[int, int]:
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    if step > 0:
        return min(max(start, 0), dim), min(max(end, 0), dim)
    return min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)


@register("Slice")
def slice_(node: Node, x, starts=None, ends=None, axes=None, steps=None):
    """ONNX slicing with clamped bounds; negative steps go through index_select."""
    if node.opset < 10:
        starts, ends, axes = node.attr("starts"), node.attr("ends"), node.attr("axes")
    else:
        starts, ends, axes = ints(starts), ints(ends), ints(axes)
    axes = list(range(len(starts))) if axes is None else axes
    steps = ints(steps) or [1] * len(starts)
    index = [slice(None)] * x.dim()
    backward = []
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis %= x.dim()
        start, end = _slice_bounds(start, end, step, x.shape[axis])
        if step > 0:
            index[axis] = slice(start, max(start, end), step)
        else:
            backward.append((axis, torch.arange(start, end, step, device=x.device)))
    x = x[tuple(index)]
    for axis, picks in backward:
        x = x.index_select(axis, picks)
    return x


def _wrap(idx: torch.Tensor, dim: int) -> torch.Tensor:
    idx = idx.long()
    return torch.where(idx < 0, idx + dim, idx)


@register("Gather")
def gather(node: Node, x, idx):
    axis = node.attr("axis", 0) % x.dim()
    picked = x.index_select(axis, _wrap(idx, x.shape[axis]).reshape(-1))
    return picked.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1:]))


@register("GatherElements")
def gather_elements(node: Node, x, idx):
    axis = node.attr("axis", 0) % x.dim()
    return torch.gather(x, axis, _wrap(idx, x.shape[axis]))


def _check_scatter_nd(node: Node) -> None:
    if node.attr("reduction", "none") not in ("none", "add"):
        raise node.fail(f"reduction '{node.attr('reduction')}' is not supported; use none or add")


@register("ScatterND", check=_check_scatter_nd)
def scatter_nd(node: Node, x, idx, updates):
    """Out-of-place: a copy of x with slices at ``idx[..., :k]`` replaced (or added to)."""
    coords = tuple(_wrap(idx[..., k], x.shape[k]) for k in range(idx.shape[-1]))
    return x.index_put(coords, updates, accumulate=node.attr("reduction", "none") == "add")


def _axes(node: Node, axes_input) -> list[int] | None:
    return ints(axes_input) if axes_input is not None else node.attr("axes")


@register("Squeeze")
def squeeze(node: Node, x, axes=None):
    axes = _axes(node, axes)
    if not axes:
        return x.squeeze()
    return x.squeeze(tuple(a % x.dim() for a in axes))


@register("Unsqueeze")
def unsqueeze(node: Node, x, axes=None):
    axes = _axes(node, axes)
    rank = x.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return x


@register("Expand")
def expand(node: Node, x, dims):
    """Bidirectional broadcast of x with the requested shape."""
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(ints(dims))))


@register("Tile")
def tile(node: Node, x, repeats):
    return x.repeat(ints(repeats))


def _check_depth_to_space(node: Node) -> None:
    if node.attr("mode", "DCR") not in ("DCR", "CRD"):
        raise node.fail(f"mode '{node.attr('mode')}' is not defined; use DCR or CRD")


@register("DepthToSpace", check=_check_depth_to_space)
def depth_to_space(node: Node, x):
    """(N, C, H, W) -> (N, C / b^2, H b, W b), b = blocksize. Output pixel (h b + i,
    w b + j) of channel c is input channel ``(i b + j) C / b^2 + c`` in DCR mode (the
    default, and the only mode before opset 11), ``c b^2 + i b + j`` in CRD mode."""
    b = node.attr("blocksize")
    if node.attr("mode", "DCR") == "CRD":
        return F.pixel_shuffle(x, b)
    n, c, h, w = x.shape
    y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    return y.reshape(n, c // (b * b), h * b, w * b)


@register("SpaceToDepth")
def space_to_depth(node: Node, x):
    """(N, C, H, W) -> (N, C b^2, H / b, W / b), the inverse of DCR DepthToSpace: pixel
    (h b + i, w b + j) of channel c goes to channel ``(i b + j) C + c``."""
    b = node.attr("blocksize")
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


@register("Range")
def range_(node: Node, start, limit, delta):
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype,
                        device=start.device)


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


def _check_pad(node: Node) -> None:
    if node.attr("mode", "constant") not in _PAD_MODES:
        raise node.fail(f"mode '{node.attr('mode')}' is not supported; use one of {sorted(_PAD_MODES)}")


@register("Pad", check=_check_pad)
def pad(node: Node, x, pads=None, value=None, axes=None):
    """ONNX pads [b1..bn, e1..en] (negative crops); constant / reflect / edge / wrap."""
    if node.opset < 11:
        pads, value = node.attr("pads"), node.attr("value", 0.0)
    else:
        pads, value = ints(pads), (0.0 if value is None or value.numel() == 0 else value.item())
    n = len(pads) // 2
    axes = [a % x.dim() for a in ints(axes)] if axes is not None else list(range(n))
    pairs = [(0, 0)] * x.dim()
    for i, axis in enumerate(axes):
        pairs[axis] = (pads[i], pads[i + n])
    mode = _PAD_MODES[node.attr("mode", "constant")]
    if mode == "constant":
        return F.pad(x, torch_pad(pairs), value=value)
    if all(p == (0, 0) for p in pairs[:2]) and 3 <= x.dim() <= 5 and min(map(min, pairs)) >= 0:
        return F.pad(x, torch_pad(pairs[2:]), mode=mode)
    for axis, (b, e) in enumerate(pairs):   # any axis (an audio frontend's (N, T)), crops
        if (b, e) != (0, 0):
            x = x.index_select(axis, _pad_index(node, mode, b, e, x.shape[axis], x.device))
    return x


def _pad_index(node: Node, mode: str, b: int, e: int, size: int, device) -> torch.Tensor:
    """The input index of each output position along one axis padded by (b, e) (negative:
    cropped) in `mode`."""
    j = torch.arange(-b, size + e, device=device)
    if mode == "replicate":
        return j.clamp(0, size - 1)
    if mode == "circular":
        return j.remainder(size)
    if max(b, e) > size - 1:
        raise node.fail(f"mode 'reflect' pads by {max(b, e)} an axis of size {size}; "
                        "a reflection pads by less than the axis' size")
    return (size - 1) - (j.abs() - (size - 1)).abs()   # reflected at both ends
