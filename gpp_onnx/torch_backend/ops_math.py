"""Element-wise ops, activations, comparisons, softmax / hardmax and reductions."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .ops import Node, ints, register

_UNARY = {
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Erf": torch.erf,
    "Sqrt": torch.sqrt, "Exp": torch.exp, "Log": torch.log, "Neg": torch.neg, "Abs": torch.abs,
    "Reciprocal": torch.reciprocal, "Floor": torch.floor, "Ceil": torch.ceil,
    "Round": torch.round, "Sign": torch.sign, "Sin": torch.sin, "Cos": torch.cos,
    "Not": torch.logical_not, "Softsign": F.softsign, "Softplus": F.softplus, "Mish": F.mish,
    "HardSwish": F.hardswish, "IsNaN": torch.isnan,
}
_BINARY = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul,
    "Equal": torch.eq, "Greater": torch.gt, "Less": torch.lt,
    "GreaterOrEqual": torch.ge, "LessOrEqual": torch.le,
    "And": torch.logical_and, "Or": torch.logical_or, "Xor": torch.logical_xor,
}
_VARIADIC = {"Max": torch.maximum, "Min": torch.minimum, "Sum": torch.add}


def _unary(fn):
    def op(node: Node, x):
        return fn(x)

    return op


def _binary(fn):
    def op(node: Node, a, b):
        return fn(a, b)

    return op


def _variadic(fn):
    def op(node: Node, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        return out

    return op


for _name, _fn in _UNARY.items():
    register(_name)(_unary(_fn))
for _name, _fn in _BINARY.items():
    register(_name)(_binary(_fn))
for _name, _fn in _VARIADIC.items():
    register(_name)(_variadic(_fn))


@register("Mean")
def mean(node: Node, *xs):
    return _variadic(torch.add)(node, *xs) / len(xs)


@register("Div")
def div(node: Node, a, b):
    """Float division; integer tensors truncate toward zero as in ONNX."""
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


@register("Pow")
def pow_(node: Node, a, b):
    return torch.pow(a, b).to(a.dtype)


@register("Mod")
def mod(node: Node, a, b):
    return torch.fmod(a, b) if node.attr("fmod", 0) else torch.remainder(a, b)


@register("Where")
def where(node: Node, cond, a, b):
    return torch.where(cond.bool(), a, b)


@register("LeakyRelu")
def leaky_relu(node: Node, x):
    return F.leaky_relu(x, node.attr("alpha", 0.01))


@register("PRelu")
def prelu(node: Node, x, slope):
    """``x < 0 ? slope * x : x`` with ``slope`` broadcast (ONNX shape, e.g. [C, 1, 1])."""
    return torch.where(x < 0, x * slope, x)


@register("Elu")
def elu(node: Node, x):
    return F.elu(x, node.attr("alpha", 1.0))


@register("Selu")
def selu(node: Node, x):
    alpha = node.attr("alpha", 1.67326319217681884765625)
    gamma = node.attr("gamma", 1.05070102214813232421875)
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1.0))


@register("Celu")
def celu(node: Node, x):
    """``max(0, x) + min(0, alpha * (exp(x / alpha) - 1))``."""
    return F.celu(x, node.attr("alpha", 1.0))


@register("ThresholdedRelu")
def thresholded_relu(node: Node, x):
    """``x > alpha ? x : 0`` (alpha 1.0 by default)."""
    return F.threshold(x, node.attr("alpha", 1.0), 0.0)


@register("Shrink")
def shrink(node: Node, x):
    """``x < -lambd ? x + bias : x > lambd ? x - bias : 0`` (lambd 0.5, bias 0)."""
    lambd, bias = node.attr("lambd", 0.5), node.attr("bias", 0.0)
    inner = torch.where(x > lambd, x - bias, torch.zeros_like(x))
    return torch.where(x < -lambd, x + bias, inner)


@register("IsInf")
def is_inf(node: Node, x):
    """True at +inf when detect_positive, at -inf when detect_negative (both by default)."""
    pos, neg = node.attr("detect_positive", 1), node.attr("detect_negative", 1)
    return (torch.isposinf(x) & bool(pos)) | (torch.isneginf(x) & bool(neg))


@register("Clip")
def clip(node: Node, x, low=None, high=None):
    """Bounds from inputs (opset >= 11) or the min/max attributes (older opsets)."""
    if node.opset < 11:
        low, high = node.attr("min"), node.attr("max")
    if low is None and high is None:   # no bound: the identity (torch.clamp refuses it)
        return x
    return torch.clamp(x, min=low, max=high)


@register("HardSigmoid")
def hard_sigmoid(node: Node, x):
    return torch.clamp(node.attr("alpha", 0.2) * x + node.attr("beta", 0.5), 0.0, 1.0)


@register("Gelu")
def gelu(node: Node, x):
    return F.gelu(x, approximate=node.attr("approximate", "none"))


def _softmax_axis(node: Node, x) -> int:
    return node.attr("axis", -1 if node.opset >= 13 else 1) % x.dim()


def _coerced(fn):
    """Softmax family: opset >= 13 works on one axis; older opsets flatten to 2-D at axis."""

    def op(node: Node, x):
        axis = _softmax_axis(node, x)
        if node.opset >= 13:
            return fn(x, dim=axis)
        flat = x.reshape(math.prod(x.shape[:axis]), -1)
        return fn(flat, dim=1).reshape(x.shape)

    return op


register("Softmax")(_coerced(torch.softmax))
register("LogSoftmax")(_coerced(torch.log_softmax))


def _hardmax(x, dim: int):
    """1 at the first maximum along ``dim``, 0 elsewhere (no gradient: piecewise constant)."""
    return torch.zeros_like(x).scatter_(dim, x.argmax(dim, keepdim=True), 1.0)


register("Hardmax")(_coerced(_hardmax))


def _reduce_dims(node: Node, x, axes_input) -> tuple[int, ...] | None:
    """Reduced dims from the ``axes`` input or attribute; None means 'leave x as is'."""
    axes = ints(axes_input) if axes_input is not None else node.attr("axes")
    if not axes:
        return None if node.attr("noop_with_empty_axes", 0) else tuple(range(x.dim()))
    return tuple(sorted(a % x.dim() for a in axes))


def _reducer(fn, noop=None):
    """``noop``: what the reducer leaves of x when noop_with_empty_axes skips the reduction
    (onnxruntime keeps the element-wise part: |x| for L1 / L2, x^2 for SumSquare, log x
    for LogSum; LogSumExp returns x)."""
    def op(node: Node, x, axes=None):
        dims = _reduce_dims(node, x, axes)
        if dims is None:
            return x if noop is None else noop(x)
        return fn(x, dims, bool(node.attr("keepdims", 1)))

    return op


def _prod(x, dims, keep):
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, d, keepdim=keep) if keep else torch.prod(x, d)
    return x


_REDUCERS = {
    "ReduceMean": lambda x, d, k: x.mean(d, keepdim=k),
    "ReduceSum": lambda x, d, k: x.sum(d, keepdim=k),
    "ReduceMax": lambda x, d, k: x.amax(d, keepdim=k),
    "ReduceMin": lambda x, d, k: x.amin(d, keepdim=k),
    "ReduceProd": _prod,
    "ReduceL1": lambda x, d, k: x.abs().sum(d, keepdim=k),
    "ReduceL2": lambda x, d, k: torch.sqrt((x * x).sum(d, keepdim=k)),
    "ReduceSumSquare": lambda x, d, k: (x * x).sum(d, keepdim=k),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, d, keepdim=k),
    "ReduceLogSum": lambda x, d, k: torch.log(x.sum(d, keepdim=k)),
}
_NOOPS = {"ReduceL1": torch.abs, "ReduceL2": torch.abs, "ReduceSumSquare": torch.square,
          "ReduceLogSum": torch.log}
for _name, _fn in _REDUCERS.items():
    register(_name)(_reducer(_fn, _NOOPS.get(_name)))


def _arg(fn):
    def op(node: Node, x):
        axis = node.attr("axis", 0) % x.dim()
        keep = bool(node.attr("keepdims", 1))
        if node.attr("select_last_index", 0):
            flipped = fn(x.flip(axis), dim=axis, keepdim=keep)
            return x.shape[axis] - 1 - flipped
        return fn(x, dim=axis, keepdim=keep)

    return op


register("ArgMax")(_arg(torch.argmax))
register("ArgMin")(_arg(torch.argmin))
