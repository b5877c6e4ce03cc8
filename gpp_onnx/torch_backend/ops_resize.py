"""Resize and Upsample: each output index's source coordinate (every coordinate
transformation mode), the taps of nearest, linear and cubic interpolation, one axis at a
time, as onnxruntime computes them."""
from __future__ import annotations

import math

import numpy as np
import torch

from .ops import Node, ints, register


_COORD_MODES = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric",
                "tf_half_pixel_for_nn", "half_pixel_symmetric")


def _check_resize(node: Node) -> None:
    if node.attr("mode", "nearest") not in ("nearest", "linear", "cubic"):
        raise node.fail(f"mode '{node.attr('mode')}' is not supported; use nearest, linear or cubic")
    coord = node.attr("coordinate_transformation_mode", "half_pixel")
    if coord not in _COORD_MODES:
        raise node.fail(f"coordinate_transformation_mode '{coord}' is not supported; "
                        f"use one of {', '.join(_COORD_MODES)}")
    if node.attr("antialias", 0):
        raise node.fail("antialias=1 is not supported; export with antialias=False")


def _legacy_or(node: Node, key: str, default: str, legacy: str) -> str:
    """Upsample and Resize-10 have no such attribute and behave as ``legacy``."""
    if node.op_type == "Upsample" or node.opset < 11:
        return legacy
    return node.attr(key, default)


def _source_coords(node: Node, out: int, size: int, scale: float, device) -> torch.Tensor:
    """Input coordinate of each output index (float32, as onnxruntime computes it)."""
    x = torch.arange(out, dtype=torch.float32, device=device)
    mode = _legacy_or(node, "coordinate_transformation_mode", "half_pixel", "asymmetric")
    if mode == "asymmetric":
        return x / scale
    if mode == "align_corners":
        return x * (size - 1) / (out - 1) if out > 1 else torch.zeros_like(x)
    if mode == "tf_half_pixel_for_nn":
        return (x + 0.5) / scale
    if mode == "pytorch_half_pixel" and out == 1:
        return torch.zeros_like(x)
    offset = 0.0
    if mode == "half_pixel_symmetric":
        offset = size / 2.0 * (1.0 - out / (scale * size))
    return offset + (x + 0.5) / scale - 0.5


_ROUNDING = {
    "round_prefer_floor": lambda c: torch.ceil(c - 0.5),
    "round_prefer_ceil": lambda c: torch.floor(c + 0.5),
    "floor": torch.floor,
    "ceil": torch.ceil,
}


def _cubic_weights(t: torch.Tensor, a: float) -> list[torch.Tensor]:
    """Keys cubic convolution weights of taps -1, 0, 1, 2 at fraction t."""

    def near(d):
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _taps(node: Node, coords: torch.Tensor, size: int, scale: float):
    """(indices, weights) pairs to blend along one axis."""
    mode = node.attr("mode", "nearest")
    if mode == "nearest":
        legacy = "ceil" if scale < 1 else "floor"   # onnxruntime's rule before nearest_mode
        rounding = _ROUNDING[_legacy_or(node, "nearest_mode", "round_prefer_floor", legacy)]
        return [(rounding(coords).clamp(0, size - 1).long(), None)]
    if mode == "linear":
        coords = coords.clamp(0, size - 1)
        low = torch.floor(coords)
        return [(low.long(), 1.0 - (coords - low)), ((low + 1).clamp(max=size - 1).long(), coords - low)]
    low = torch.floor(coords)
    weights = _cubic_weights(coords - low, node.attr("cubic_coeff_a", -0.75))
    raw = [low.long() + k for k in (-1, 0, 1, 2)]
    if node.attr("exclude_outside", 0):
        weights = [w * ((i >= 0) & (i < size)) for w, i in zip(weights, raw)]
        total = sum(weights)
        weights = [w / total for w in weights]
    return [(i.clamp(0, size - 1), w) for i, w in zip(raw, weights)]


def _resize_axis(node: Node, x, axis: int, out: int, scale: float):
    coords = _source_coords(node, out, x.shape[axis], scale, x.device)
    result = None
    for idx, weight in _taps(node, coords, x.shape[axis], scale):
        part = x.index_select(axis, idx)
        if weight is not None:
            shape = [1] * x.dim()
            shape[axis] = out
            part = part * weight.to(x.dtype).reshape(shape)
        result = part if result is None else result + part
    return result


def _targets(node: Node, x, scales, sizes) -> list[tuple[int, int, float]]:
    """(axis, output size, scale) for every resized axis."""
    rank = x.dim()
    axes = [a % rank for a in node.attr("axes", list(range(rank)))]
    in_sizes = [x.shape[a] for a in axes]
    if sizes is not None and sizes.numel():
        outs = ints(sizes)
        factors = [float(np.float32(o) / np.float32(i)) for o, i in zip(outs, in_sizes)]
        policy = node.attr("keep_aspect_ratio_policy", "stretch")
        if policy != "stretch":
            pick = min if policy == "not_larger" else max
            factor = pick(factors)
            factors = [factor] * len(axes)
            outs = [int(math.floor(factor * i + 0.5)) for i in in_sizes]
    else:
        factors = [float(v) for v in scales.reshape(-1).tolist()]
        outs = [int(math.floor(i * f)) for i, f in zip(in_sizes, factors)]
    return list(zip(axes, outs, factors))


@register("Resize", "Upsample", check=_check_resize)
def resize(node: Node, x, roi=None, scales=None, sizes=None):
    """Separable nearest / linear / cubic resampling with ONNX coordinate modes."""
    if node.op_type == "Upsample" or node.opset < 11:
        scales = roi if roi is not None else torch.tensor(node.attr("scales"))
    for axis, out, scale in _targets(node, x, scales, sizes):
        if out != x.shape[axis] or scale != 1.0:
            x = _resize_axis(node, x, axis, out, scale)
    return x
