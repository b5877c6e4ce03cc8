"""Layer ops: convolution, batch / instance / layer normalization, Gemm/MatMul, pooling
(max, average, Lp) and Dropout. The other normalizations are in ``ops_norm``."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .ops import Node, register

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}

Pairs = list[tuple[int, int]]


def torch_pad(pairs: Pairs) -> list[int]:
    """(begin, end) per dim, outermost first -> F.pad's list (innermost dim first)."""
    flat: list[int] = []
    for begin, end in reversed(pairs):
        flat += [begin, end]
    return flat


def _same_pads(node: Node, sizes, kernel, strides, dilations) -> Pairs:
    """auto_pad SAME_UPPER/SAME_LOWER: output = ceil(input / stride); odd pad at the end / start."""
    pairs = []
    for size, k, s, d in zip(sizes, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, big = total // 2, total - total // 2
        pairs.append((small, big) if node.attr("auto_pad") == "SAME_UPPER" else (big, small))
    return pairs


def spatial_pads(node: Node, sizes, kernel, strides, dilations) -> Pairs:
    """Per spatial dim (begin, end) padding from ``pads`` / ``auto_pad``."""
    auto = node.attr("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        return _same_pads(node, sizes, kernel, strides, dilations)
    n = len(kernel)
    pads = [0] * (2 * n) if auto == "VALID" else node.attr("pads", [0] * (2 * n))
    return list(zip(pads[:n], pads[n:]))


def _geometry(node: Node, kernel) -> tuple[list[int], list[int]]:
    n = len(kernel)
    return node.attr("strides", [1] * n), node.attr("dilations", [1] * n)


@register("Conv")
def conv(node: Node, x, w, b=None):
    kernel = list(w.shape[2:])
    strides, dilations = _geometry(node, kernel)
    pairs = spatial_pads(node, x.shape[2:], kernel, strides, dilations)
    if all(begin == end for begin, end in pairs):
        padding = [begin for begin, _ in pairs]
    else:
        x, padding = F.pad(x, torch_pad(pairs)), 0
    return _CONV[len(kernel)](x, w, b, strides, padding, dilations, node.attr("group", 1))


def _conv_transpose_pads(node: Node, sizes, full, out_pad, strides) -> Pairs:
    """ONNX ConvTranspose padding: explicit pads, or derived from output_shape / auto_pad.

    A target longer than the unpadded output (kernel < stride) pads nothing, as in
    onnxruntime: output_shape is reached with zeros after the end, auto_pad keeps the
    unpadded length."""
    n = len(full)
    target = node.attr("output_shape")
    auto = node.attr("auto_pad", "NOTSET")
    explicit = bool(target)
    if not target and auto in ("SAME_UPPER", "SAME_LOWER"):
        target = [size * s for size, s in zip(sizes, strides)]
    if not target:
        pads = [0] * (2 * n) if auto == "VALID" else node.attr("pads", [0] * (2 * n))
        return list(zip(pads[:n], pads[n:]))
    pairs = []
    for f, op, t in zip(full, out_pad, target[-n:]):
        total = f + op - t
        if total < 0:
            pairs.append((0, total if explicit else 0))
            continue
        half = total // 2
        pairs.append((half, total - half) if auto == "SAME_UPPER" else (total - half, half))
    return pairs


@register("ConvTranspose")
def conv_transpose(node: Node, x, w, b=None):
    """Unpadded transposed conv, then crop ``pads`` / extend by ``output_padding``."""
    kernel = list(w.shape[2:])
    n = len(kernel)
    strides, dilations = _geometry(node, kernel)
    y = _CONV_T[n](x, w, None, strides, 0, 0, node.attr("group", 1), dilations)
    out_pad = node.attr("output_padding", [0] * n)
    pairs = _conv_transpose_pads(node, x.shape[2:], y.shape[2:], out_pad, strides)
    y = F.pad(y, torch_pad([(-begin, op - end) for (begin, end), op in zip(pairs, out_pad)]))
    return y if b is None else y + b.reshape(1, -1, *[1] * n)


def _check_batch_norm(node: Node) -> None:
    if node.attr("training_mode", 0):
        raise node.fail("training_mode=1 normalises by each batch's statistics in onnxruntime; "
                        "export the model in eval mode (training_mode=0)")
    if not node.attr("spatial", 1):
        raise node.fail("spatial=0 (per-activation statistics) is not supported; export with "
                        "spatial=1 or opset 9 or later")


@register("BatchNormalization", check=_check_batch_norm)
def batch_norm(node: Node, x, scale, bias, mean, var):
    """eval(): running stats. train(): batch stats, and the running-stat buffers are updated
    in place as ``running = m * running + (1 - m) * batch`` with ONNX momentum ``m``
    (torch momentum = 1 - m; like torch, the running variance takes the unbiased batch
    variance)."""
    momentum = 1.0 - node.attr("momentum", 0.9)
    y = F.batch_norm(x, mean, var, scale, bias, node.training, momentum, node.attr("epsilon", 1e-5))
    return (y, mean, var) if node.wants_output(1) else y


@register("InstanceNormalization")
def instance_norm(node: Node, x, scale, bias):
    return F.instance_norm(x, weight=scale, bias=bias, eps=node.attr("epsilon", 1e-5))


@register("LayerNormalization")
def layer_norm(node: Node, x, scale, bias=None):
    """Normalizes over dims ``axis..`` ; scale/bias broadcast; optional Mean/InvStdDev outputs."""
    axis = node.attr("axis", -1) % x.dim()
    eps = node.attr("epsilon", 1e-5)
    shape = tuple(x.shape[axis:])
    if tuple(scale.shape) == shape and (bias is None or tuple(bias.shape) == shape):
        y = F.layer_norm(x, shape, scale, bias, eps)
    else:
        y = F.layer_norm(x, shape, None, None, eps) * scale
        y = y if bias is None else y + bias
    if not node.wants_output(1):
        return y
    dims = tuple(range(axis, x.dim()))
    mean = x.mean(dims, keepdim=True)
    inv_std = torch.rsqrt(x.var(dims, unbiased=False, keepdim=True) + eps)
    return y, mean, inv_std


@register("Gemm")
def gemm(node: Node, a, b, c=None):
    """``alpha * A' @ B' + beta * C`` with A' / B' transposed per transA / transB."""
    alpha, beta = node.attr("alpha", 1.0), node.attr("beta", 1.0)
    a = a.t() if node.attr("transA", 0) else a
    if node.attr("transB", 0) and alpha == 1.0 and beta == 1.0:
        return F.linear(a, b, c)
    y = a @ (b.t() if node.attr("transB", 0) else b)
    y = y if alpha == 1.0 else alpha * y
    return y if c is None else y + (c if beta == 1.0 else beta * c)


@register("MatMul")
def matmul(node: Node, a, b):
    return torch.matmul(a, b)


def _pool_pairs(node: Node, sizes, kernel, strides, dilations) -> tuple[Pairs, Pairs]:
    """(explicit pads, pads actually applied): the latter extends / crops the end so an
    unpadded floor-mode pool yields ONNX's output size (ceil_mode drops a last window
    that would start in the end padding, as onnxruntime and torch do)."""
    explicit = spatial_pads(node, sizes, kernel, strides, dilations)
    ceil = node.attr("ceil_mode", 0)
    applied = []
    for size, (begin, end), k, s, d in zip(sizes, explicit, kernel, strides, dilations):
        span = (k - 1) * d + 1
        room = size + begin + end - span
        out = (-(-room // s) if ceil else room // s) + 1
        if ceil and (out - 1) * s >= size + begin:
            out -= 1
        applied.append((begin, (out - 1) * s + span - size - begin))
    return explicit, applied


def _pool_args(node: Node, x):
    kernel = node.attr("kernel_shape")
    strides, dilations = _geometry(node, kernel)
    explicit, applied = _pool_pairs(node, x.shape[2:], kernel, strides, dilations)
    return kernel, strides, dilations, explicit, applied


def _check_max_pool(node: Node) -> None:
    if node.wants_output(1):
        raise node.fail("the Indices output is not supported; export without return_indices")


@register("MaxPool", check=_check_max_pool)
def max_pool(node: Node, x):
    kernel, strides, dilations, _, applied = _pool_args(node, x)
    x = F.pad(x, torch_pad(applied), value=-math.inf)
    return _MAX_POOL[len(kernel)](x, kernel, strides, 0, dilations)


def _check_avg_pool(node: Node) -> None:
    if any(d != 1 for d in node.attr("dilations", [])):
        raise node.fail("dilated AveragePool is not supported; use dilations of 1")


@register("AveragePool", check=_check_avg_pool)
def avg_pool(node: Node, x):
    """Window sum / number of counted cells: input cells, plus explicit pads when
    count_include_pad=1; cells added only by ceil_mode never count."""
    kernel, strides, _, explicit, applied = _pool_args(node, x)
    pool = _AVG_POOL[len(kernel)]
    mask = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    mask = F.pad(mask, torch_pad(explicit), value=float(node.attr("count_include_pad", 0)))
    extra = [(0, a_end - e_end) for (_, e_end), (_, a_end) in zip(explicit, applied)]
    mask = F.pad(mask, torch_pad(extra), value=0.0)
    total = pool(F.pad(x, torch_pad(applied)), kernel, strides, 0)
    return total / pool(mask, kernel, strides, 0)


@register("GlobalAveragePool")
def global_avg_pool(node: Node, x):
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@register("GlobalMaxPool")
def global_max_pool(node: Node, x):
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


def _root(total, p: float):
    """``total ** (1 / p)`` with 0 where total is 0, gradient included (a window of zeros
    after a Relu would send inf * 0 = NaN back through ``|x| ** p``)."""
    positive = total > 0
    safe = torch.where(positive, total, torch.ones_like(total))
    return torch.where(positive, safe ** (1.0 / p), torch.zeros_like(total))


@register("LpPool")
def lp_pool(node: Node, x):
    """``(sum over the window of |x| ** p) ** (1 / p)``, p 2 by default; pads add 0.
    Geometry as MaxPool (strides, pads / auto_pad, and from opset 18 dilations and
    ceil_mode): the window sum is a depthwise convolution with ones."""
    kernel, strides, dilations, _, applied = _pool_args(node, x)
    p = float(node.attr("p", 2))
    powered = F.pad(x.abs() ** p, torch_pad(applied))
    ones = torch.ones((x.shape[1], 1, *kernel), dtype=x.dtype, device=x.device)
    total = _CONV[len(kernel)](powered, ones, None, strides, 0, dilations, x.shape[1])
    return _root(total, p)


@register("GlobalLpPool")
def global_lp_pool(node: Node, x):
    """``(sum over all spatial positions of |x| ** p) ** (1 / p)``, p 2 by default."""
    p = float(node.attr("p", 2))
    return _root((x.abs() ** p).sum(dim=tuple(range(2, x.dim())), keepdim=True), p)


@register("Dropout")
def dropout(node: Node, x, ratio=None, training_mode=None):
    """Identity in eval(); inverted dropout with the node's ratio in train() (the graph's
    training_mode input is ignored: the module's mode decides)."""
    p = float(ratio) if ratio is not None else node.attr("ratio", 0.5)
    if node.training and p > 0.0:
        keep = torch.rand_like(x) >= p
        y = x * keep / (1.0 - p)
    else:
        keep, y = torch.ones_like(x, dtype=torch.bool), x
    return (y, keep) if node.wants_output(1) else y
