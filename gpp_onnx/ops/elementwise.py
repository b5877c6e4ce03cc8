"""Element-wise ops.

Unary (Relu, Clip, Sigmoid, HardSwish, Erf, Cast, Dropout, ...): ``y[c] = f(x[c])``,
so channel c of the output is tied to channel c of the input.

Broadcasting n-ary ops (Add, Sub, Mul, Div, Pow, Max, Min, Sum, Where, PRelu, ...):
inputs are aligned from the right (numpy rules). With output channel axis A and width
C, an input whose aligned dim is C is tied element by element to the output (a residual
Add couples both branches; a squeeze-excitation Mul couples the scale branch); an input
whose aligned dim is 1 broadcasts and is not tied; a constant input with dim C is a
per-channel parameter and is sliced with the channel.

Trained weights: PRelu slopes, and the constant operands of Add / Mul (per-channel ones
only: a scalar stays a constant).
"""
from __future__ import annotations

from .base import ROLE_CHAN, NodeChannels, OpRule, ParamSlice, block_all, register

UNARY = ("Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Gelu",
         "Elu", "Selu", "Celu", "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Clip",
         "Identity", "Cast", "Dropout", "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal",
         "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Not", "IsNaN", "IsInf",
         "Shrink", "CastLike")
BROADCAST = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where",
             "PRelu", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And",
             "Or", "Xor", "Mod", "BitShift")


def _scaled_params(x: str, axis: int, ctx):
    """`x` computed as per-channel constants combined with values that broadcast along
    `axis` (a LayerNorm's ``scale * rsqrt(var)`` as jax2tf writes it): the constants'
    slices ``(node, input index, param, axis)``, cut with the channels; None otherwise, also
    where another node (or the model's output) reads `x`: the cut would shrink it there too."""
    node = ctx.view.producer.get(x)
    if node is None or node.op_type not in ("Mul", "Add", "Sub", "Div") \
            or not ctx.view.read_once(x):
        return None
    rank = len(ctx.shape(x))
    found = []
    for i, name in enumerate(node.input):
        shape = ctx.shape(name)
        pos = axis - (rank - len(shape))
        if pos < 0 or shape[pos] == 1:
            if ctx.has_channels(name):
                return None
        elif ctx.is_const_param(name):
            found.append((node.name, i, name, pos))
        else:
            return None
    return found or None


@register(*UNARY)
class Unary(OpRule):
    def analyze(self, node, ctx):
        res = NodeChannels()
        x = node.input[0]
        axis = ctx.axis(x)
        for i, out in enumerate(node.output):
            if not out:
                continue
            if axis is None or ctx.shape(out) != ctx.shape(x):
                res.out_axes[out] = None
                continue
            res.out_axes[out] = axis
            res.tie(x, out, width=ctx.width(x))
        return res

    def feature_pass(self, node, view):
        return node.op_type in ("Identity", "Dropout", "Cast", "Sigmoid")


@register(*BROADCAST)
class Broadcast(OpRule):
    def analyze(self, node, ctx):
        out = node.output[0]
        out_shape = ctx.shape(out)
        if out_shape is None:
            return block_all(node, ctx, f"{node.op_type} output shape is unknown")
        rank = len(out_shape)
        aligned = {ctx.axis(x) + rank - len(ctx.shape(x))
                   for x in node.input if ctx.has_channels(x)}
        if not aligned:
            return NodeChannels(out_axes={out: None})
        if len(aligned) > 1:
            return block_all(node, ctx, f"{node.op_type} mixes inputs whose channel axes differ")
        axis = aligned.pop()
        width = out_shape[axis]
        res = NodeChannels(out_axes={out: axis})
        for i, x in enumerate(node.input):
            if not x:
                continue
            shape = ctx.shape(x)
            offset = rank - len(shape)
            dim = shape[axis - offset] if axis - offset >= 0 else 1
            if ctx.is_const_param(x):
                if dim != 1:  # a per-channel constant; a broadcast one stays whole
                    res.params.append(ParamSlice(node.name, i, x, axis - offset, out, ROLE_CHAN))
                continue
            if dim == 1 and width != 1:
                continue
            if ctx.has_channels(x):
                res.tie(x, out, width=width)
                continue
            computed = _scaled_params(x, axis - offset, ctx)
            if computed is None:
                return block_all(node, ctx, f"{node.op_type} input '{x}' varies along the "
                                            "channel axis in a way gpp-onnx cannot follow")
            res.params.extend(ParamSlice(n, i, p, pos, out, ROLE_CHAN)
                              for n, i, p, pos in computed)
        return res

    def weight_slots(self, node):
        return {"PRelu": (1,), "Add": (0, 1), "Mul": (0, 1)}.get(node.op_type, ())

    def scalar_weights(self, node):
        return node.op_type not in ("Add", "Mul")

    def feature_pass(self, node, view):
        """An Add of a constant (a bias after the classifier) passes."""
        return node.op_type == "Add" and any(view.is_const(i) for i in node.input)
