"""Random graphs (hypothesis) of the structures the channel rules handle specially and
test_fuzz's generator never writes: Gather on the channel axis (permutations, repeats,
one index, a scalar) and on spatial axes, Slice with negative and clamped bounds, Split
in the forms of opsets 11, 13 and 18, depthwise convs with a multiplier, grouped convs
that change the width, ConvTranspose (grouped, depthwise, output_padding), Resize by
scales and by constant sizes, Upsample (opset 9), reductions over the channels and
keepdims 0, MatMul and Gemm (transB 0) heads, Concat of one tensor twice, Pad of the
channel axis, NHWC constants, one weight read by two convs, several outputs, map
outputs, Conv1d, and values a rule looks through (a computed per-channel factor, an
expanded token, a computed Reshape target or Resize sizes) read by a second node or
returned. Each example is a random composition. Checked: pruned == the tool's
masked model (conftest), pruned == a masked model built here (a 0/1 Mul behind every
value that loses channels), the same with the repair's refit on both sides, and for
MACs targets the params and MACs reported before and after against a count of the files
made here from their tensors and the shapes onnxruntime gives (not gpp_onnx.stats)."""
from __future__ import annotations

import json

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from conftest import assert_pruned_equals_masked
from gpp_onnx.samples import GraphBuilder

INT64_MAX = np.iinfo(np.int64).max


def _i64(values) -> np.ndarray:
    return np.array(values, dtype=np.int64)


class Builder(GraphBuilder):
    """GraphBuilder with the forms below and any number of outputs. `fresh`: vectors
    (biases, BatchNorm's parameters) as a framework initialises them, all alike (0 or 1),
    so that many initializers hold the same bytes."""

    fresh = False
    returned: list[str] = []          # values a block makes model outputs (fan-out)
    out_types: dict[str, int] = {}    # element type of an output other than float

    def vector(self, n, lo=-0.1, hi=0.1):
        if self.fresh:
            return self.const(np.full(n, (lo + hi) / 2, dtype=np.float32))
        return super().vector(n, lo, hi)

    def build_outputs(self, outputs) -> onnx.ModelProto:
        ins, outs = list(self.shapes["input"]), []
        ins[0] = "N" if self.dynamic_batch else ins[0]
        for name in outputs:
            shape = list(self.shapes[name])
            shape[0] = "N" if self.dynamic_batch else shape[0]
            outs.append(helper.make_tensor_value_info(
                name, self.out_types.get(name, TensorProto.FLOAT), shape))
        graph = helper.make_graph(
            self.nodes, self.name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ins)], outs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 8
        onnx.checker.check_model(model, full_check=True)
        return model

    def conv_nd(self, x, out_ch, k=3, groups=1, weight=None, bias=True):
        """Conv of any spatial rank, 'same' padding, stride 1; `weight` reuses one."""
        n, c, *sp = self.shapes[x]
        w = weight or self.weight(out_ch, c // groups, *([k] * len(sp)))
        k = self.shapes[w][2]
        inputs = [x, w] + ([self.vector(self.shapes[w][0])] if bias else [])
        return self.op("Conv", inputs, (n, self.shapes[w][0], *sp),
                       kernel_shape=[k] * len(sp), pads=[(k - 1) // 2] * (2 * len(sp)),
                       group=groups)

    def deconv(self, x, out_ch, k, stride, groups, output_padding, pad):
        n, c, *sp = self.shapes[x]
        w = self.weight(c, out_ch // groups, *([k] * len(sp)))
        size = [(s - 1) * stride + k + output_padding - 2 * pad for s in sp]
        attrs = dict(kernel_shape=[k] * len(sp), strides=[stride] * len(sp), group=groups,
                     pads=[pad] * (2 * len(sp)))
        if output_padding:
            attrs["output_padding"] = [output_padding] * len(sp)
        return self.op("ConvTranspose", [x, w, self.vector(out_ch)], (n, out_ch, *size), **attrs)

    def sliced(self, x, starts, ends, axes=None, steps=None):
        ins = [x, self.const(_i64(starts)), self.const(_i64(ends))]
        if axes is not None or steps is not None:
            ins.append(self.const(_i64(axes if axes is not None else range(len(starts)))))
        if steps is not None:
            ins.append(self.const(_i64(steps)))
        index = [slice(None)] * len(self.shapes[x])
        for i, (s, e) in enumerate(zip(starts, ends)):
            a = axes[i] if axes is not None else i
            index[a] = slice(s, min(e, 2 ** 40), steps[i] if steps else 1)
        shape = np.empty(self.shapes[x], dtype=np.int8)[tuple(index)].shape
        return self.op("Slice", ins, shape)

    def unsqueeze1(self, x):
        """(N, H, W) -> (N, 1, H, W)."""
        n, *rest = self.shapes[x]
        if self.opset >= 13:
            return self.op("Unsqueeze", [x, self.const(_i64([1]))], (n, 1, *rest))
        return self.op("Unsqueeze", [x], (n, 1, *rest), axes=[1])

    def reduce(self, op, x, axes, keepdims=1):
        shape = list(self.shapes[x])
        rank = len(shape)
        axes_n = sorted(a % rank for a in axes)
        out = [1 if i in axes_n else d for i, d in enumerate(shape)] if keepdims else \
            [d for i, d in enumerate(shape) if i not in axes_n]
        if self.opset >= 18 or (op == "ReduceSum" and self.opset >= 13):
            return self.op(op, [x, self.const(_i64(axes))], out, keepdims=keepdims)
        return self.op(op, [x], out, axes=list(axes), keepdims=keepdims)


def _act(b, x, draw):
    acts = ["Relu", "Sigmoid", "Tanh", "Clip"] + (["PRelu"] if len(b.shapes[x]) == 4 else [])
    return b.act(x, draw(st.sampled_from(acts)))


# -- blocks on NCHW maps: (b, x, w, draw) -> y -------------------------------------------

def block_gather(b, x, w, draw):
    """Gather on the channel axis: a permutation, a pick with repeats and negative
    indices, one index in a list, or a scalar index (the axis goes; Unsqueeze puts a
    width-1 axis back)."""
    x = _act(b, b.conv(x, w), draw)
    n, c, h, wd = b.shapes[x]
    form = draw(st.sampled_from(["perm", "repeat", "one", "scalar"]))
    if form == "scalar":
        i = draw(st.integers(-c, c - 1))
        g = b.op("Gather", [x, b.const(np.array(i, dtype=np.int64))], (n, h, wd), axis=1)
        x = b.unsqueeze1(g)
        return b.conv(x, w, k=1)
    if form == "perm":
        idx = draw(st.permutations(list(range(c))))
    elif form == "one":
        idx = [draw(st.integers(-c, c - 1))]
    else:
        idx = draw(st.lists(st.integers(-c, c - 1), min_size=1, max_size=2 * c))
    y = b.op("Gather", [x, b.const(_i64(idx))], (n, len(idx), h, wd), axis=1)
    return _act(b, b.conv(y, w, k=1), draw)


def block_depthwise_multiplier(b, x, w, draw):
    c = b.channels(x)
    t = draw(st.integers(2, 3))
    y = _act(b, b.conv(x, c * t, groups=c), draw)
    return b.conv(y, w, k=1)


def block_grouped_width(b, x, w, draw):
    """A grouped conv whose output width differs from its input's."""
    g = draw(st.integers(2, 3))
    a, o = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    y = _act(b, b.conv(x, g * a, k=1), draw)
    return _act(b, b.conv(y, g * o, groups=g), draw)


def block_deconv(b, x, w, draw):
    """ConvTranspose (group 1, grouped or depthwise; stride 1 or 2 with output_padding),
    then back to the map's size by a pool or a Slice of the spatial axes."""
    form = draw(st.sampled_from(["one", "grouped", "depthwise"]))
    g = draw(st.integers(2, 3))
    if form != "one":
        x = _act(b, b.conv(x, g * draw(st.integers(1, 3)), k=1), draw)
    c = b.channels(x)
    groups = {"one": 1, "grouped": g, "depthwise": c}[form]
    out = w if form == "one" else groups * draw(st.integers(1, 2))
    stride = draw(st.integers(1, 2))
    k = draw(st.integers(stride, 3))
    opad = draw(st.integers(0, stride - 1))
    pad = draw(st.integers(0, (k - 1) // 2))
    y = _act(b, b.deconv(x, out, k, stride, groups, opad, pad), draw)
    h = b.shapes[x][2]
    if b.shapes[y][2] >= 2 * h:
        y = b.pool(y)
    if b.shapes[y][2] != h:
        y = b.sliced(y, [0, 0], [h, h], axes=[2, 3])
    return y


def block_resize(b, x, w, draw):
    """Resize by scales or constant sizes (nearest or linear), then a pool back."""
    x = _act(b, b.conv(x, w), draw)
    n, c, h, wd = b.shapes[x]
    mode = draw(st.sampled_from(["nearest", "linear"]))
    roi = "" if b.opset >= 13 else b.const(np.zeros(0, dtype=np.float32))
    # constant sizes fix the batch (a tracing export of F.interpolate(size=...))
    if b.dynamic_batch or b.opset < 13 or draw(st.booleans()):
        scales = b.const(np.array([1, 1, 2, 2], dtype=np.float32))
        y = b.op("Resize", [x, roi, scales], (n, c, 2 * h, 2 * wd), mode=mode)
    else:
        empty = "" if b.opset >= 13 else b.const(np.zeros(0, dtype=np.float32))
        y = b.op("Resize", [x, roi, empty, b.const(_i64([n, c, 2 * h, 2 * wd]))],
                 (n, c, 2 * h, 2 * wd), mode=mode)
    return b.pool(y)


def block_split(b, x, w, draw):
    """Split on the channel axis in the opset's form (the split attribute below 13, a
    sizes input from 13, num_outputs at 18), or on a spatial axis; the pieces through
    their own convs, then concatenated."""
    pieces = draw(st.integers(2, 3))
    x = _act(b, b.conv(x, pieces * draw(st.integers(1, 3)) + draw(st.integers(0, 1)), k=1),
             draw)
    n, c, h, wd = b.shapes[x]
    if draw(st.booleans()) and h % 2 == 0:  # spatial: channels pass
        outs = b.op("Split", [x, b.const(_i64([h // 2, h // 2]))] if b.opset >= 13 else [x],
                    (n, c, h // 2, wd), n_out=2, axis=2,
                    **({} if b.opset >= 13 else {"split": [h // 2, h // 2]}))
        return b.concat([b.conv(outs[0], c), _act(b, outs[1], draw)], axis=2)
    if b.opset >= 18 and draw(st.booleans()):
        size = -(-c // pieces)
        sizes = [size] * (c // size) + ([c % size] if c % size else [])
        outs = b.op("Split", [x], (n, c, h, wd), n_out=len(sizes), axis=1,
                    num_outputs=len(sizes))
        outs = [outs] if isinstance(outs, str) else outs
        for o, s in zip(outs, sizes):
            b.shapes[o] = (n, s, h, wd)
    else:
        cuts = sorted(draw(st.lists(st.integers(1, c - 1), min_size=pieces - 1,
                                    max_size=pieces - 1, unique=True))) if c > pieces else \
            list(range(1, c))
        sizes = np.diff([0, *cuts, c]).tolist()
        outs = b.split(x, sizes)
        outs = [outs] if isinstance(outs, str) else outs
    return b.concat([_act(b, b.conv(o, w, k=1), draw) if i % 2 else o
                     for i, o in enumerate(outs)])


def block_slice(b, x, w, draw):
    """Slice on the channel axis with negative or clamped bounds, on a spatial axis
    (negative axes, a step), or on both at once; concatenated with a conv of the input."""
    x = _act(b, b.conv(x, 2 * w), draw)
    c, h = b.channels(x), b.shapes[x][2]
    s = draw(st.integers(0, c - 1))
    e = draw(st.integers(s + 1, c))
    start = draw(st.sampled_from([s, s - c, -1000 if s == 0 else s]))
    end = draw(st.sampled_from([e, e - c if e < c else INT64_MAX, 1000 if e == c else e]))
    form = draw(st.sampled_from(["channel", "spatial", "both"]))
    if form == "channel":
        y = b.sliced(x, [start], [end], axes=draw(st.sampled_from([[1], [-3]])))
    elif form == "spatial":
        y = b.sliced(x, [0, -h], [h, INT64_MAX], axes=[-1, 2],
                     steps=draw(st.sampled_from([None, [1, 1]])))
    else:
        y = b.sliced(x, [1, start], [h - 1, end], axes=[2, 1])
        y = b.op("Pad", [y, b.const(_i64([0, 0, 1, 0, 0, 0, 1, 0]))],
                 (b.shapes[y][0], b.shapes[y][1], h, h), mode="constant")
    return b.concat([y, b.conv(x, w, k=1)])


def block_channel_reduce(b, x, w, draw):
    """Statistics over the channel axis: spatial attention by a mean, an L2
    normalisation, a sum (with or without keepdims, then Unsqueeze)."""
    x = _act(b, b.conv(x, w), draw)
    n, c, h, wd = b.shapes[x]
    form = draw(st.sampled_from(["ReduceMean", "ReduceL2", "ReduceSum", "ReduceSumSquare",
                                 "ReduceL1"]))
    keep = draw(st.integers(0, 1))
    r = b.reduce(form, x, [1] if draw(st.booleans()) else [-3], keepdims=keep)
    if not keep:
        r = b.unsqueeze1(r)
    if form == "ReduceL2":
        r = b.binary("Add", r, b.const(np.float32(1e-3)))
        return b.binary("Div", x, r)
    return b.binary("Mul", x, b.act(r, "Sigmoid"))


def block_concat_twice(b, x, w, draw):
    x = _act(b, b.conv(x, w), draw)
    return b.conv(b.concat([x, x] if draw(st.booleans()) else [x, b.pool(b.pad(x), k=3,
                                                                            stride=1), x]),
                  w, k=1)


def block_pad(b, x, w, draw):
    """Pad on the channel axis (the width changes: it must stay) or a spatial Pad with a
    non-zero value or in reflect mode."""
    x = _act(b, b.conv(x, w), draw)
    n, c, h, wd = b.shapes[x]
    if draw(st.booleans()):
        y = b.op("Pad", [x, b.const(_i64([0, 1, 0, 0, 0, 1, 0, 0]))], (n, c + 2, h, wd),
                 mode="constant")
        return b.conv(y, w, k=1)
    mode = draw(st.sampled_from(["constant", "reflect", "edge"]))
    ins = [x, b.const(_i64([0, 0, 1, 1, 0, 0, 1, 1]))]
    if mode == "constant":
        ins.append(b.const(np.float32(0.5)))
    y = b.op("Pad", ins, (n, c, h + 2, wd + 2), mode=mode)
    return b.pool(y, k=3, stride=1)


def block_nhwc(b, x, w, draw):
    """Per-channel constants on channels-last (C,) between two Transposes, and a
    pointwise layer written as MatMul on NHWC."""
    x = _act(b, b.conv(x, w), draw)
    n, c, h, wd = b.shapes[x]
    t = b.op("Transpose", [x], (n, h, wd, c), perm=[0, 2, 3, 1])
    t = b.binary("Mul", t, b.const(b.rng.uniform(0.5, 1.5, c).astype(np.float32)))
    t = b.binary("Add", t, b.vector(c))
    if draw(st.booleans()):
        t = b.act(b.matmul(t, w), "Relu")
    return b.op("Transpose", [t], (n, b.shapes[t][3], h, wd), perm=[0, 3, 1, 2])


def block_bn_pair(b, x, w, draw):
    """Two conv + BatchNorm branches of one width (with fresh vectors their BatchNorm
    parameters and biases are the same bytes), and one per-channel scale read by both."""
    scale = b.const(b.rng.uniform(0.5, 1.5, (w, 1, 1)).astype(np.float32))
    ys = [b.binary("Mul", _act(b, b.bn(b.conv(x, w)), draw), scale) for _ in range(2)]
    return b.concat(ys) if draw(st.booleans()) else b.conv(b.concat(ys), w, k=1)


def block_shared_weight(b, x, w, draw):
    """One conv weight read by two nodes (the same conv applied twice)."""
    x = _act(b, b.conv(x, w), draw)
    c = b.channels(x)
    weight = b.weight(c, c, 3, 3)
    y = _act(b, b.conv_nd(x, c, weight=weight), draw)
    y = b.conv_nd(y, c, weight=weight, bias=draw(st.booleans()))
    return b.binary("Add", x, y) if draw(st.booleans()) else y


def block_conv_forms(b, x, w, draw):
    """Convs in exporters' other forms: stride 2 with auto_pad, dilation, no bias."""
    n, c, h, wd = b.shapes[x]
    form = draw(st.sampled_from(["same_upper", "valid", "dilated", "nobias"]))
    if form == "dilated":
        return _act(b, b.conv(x, w, dilation=2), draw)
    if form == "nobias":
        return _act(b, b.conv(x, w, bias=False), draw)
    if form == "valid":
        y = b.op("Conv", [x, b.weight(w, c, 3, 3), b.vector(w)], (n, w, h - 2, wd - 2),
                 kernel_shape=[3, 3], auto_pad="VALID")
        return _act(b, b.op("Pad", [y, b.const(_i64([0, 0, 1, 1, 0, 0, 1, 1]))],
                            (n, w, h, wd), mode="constant"), draw)
    y = b.op("Conv", [x, b.weight(w, c, 3, 3), b.vector(w)], (n, w, h, wd),
             kernel_shape=[3, 3], auto_pad="SAME_UPPER")
    return _act(b, y, draw)


def block_gather_spatial(b, x, w, draw):
    """Gather along a spatial axis (channels pass): 1-D indices with repeats, a scalar
    index (an axis after the channels goes), a 2-D index block (one comes)."""
    x = _act(b, b.conv(x, w), draw)
    n, c, h, wd = b.shapes[x]
    form = draw(st.sampled_from(["list", "scalar"] + (["matrix"] if h % 2 == 0 else [])))
    if form == "list":
        idx = draw(st.lists(st.integers(-wd, wd - 1), min_size=wd, max_size=wd))
        return b.op("Gather", [x, b.const(_i64(idx))], (n, c, h, wd), axis=3)
    if form == "scalar":
        g = b.op("Gather", [x, b.const(np.array(0, dtype=np.int64))], (n, c, wd), axis=2)
        g = b.op("Unsqueeze", [g, b.const(_i64([2]))], (n, c, 1, wd)) if b.opset >= 13 else \
            b.op("Unsqueeze", [g], (n, c, 1, wd), axes=[2])
        return b.binary("Add", x, g)
    idx = (np.arange(h) * 3 % h).reshape(2, h // 2)
    g = b.op("Gather", [x, b.const(idx.astype(np.int64))], (n, c, 2, h // 2, wd), axis=2)
    return b.op("Reshape", [g, b.const(_i64([0, c, h, wd]))], (n, c, h, wd))


def block_concat_const(b, x, w, draw):
    """A learned row concatenated along a spatial axis (a fixed batch lets its batch
    axis be 1): the row is cut with the channels; without, a per-channel Expand'ed row."""
    x = _act(b, b.conv(x, w), draw)
    n, c, h, wd = b.shapes[x]
    if b.dynamic_batch:
        return b.channel_const(draw(st.sampled_from(["Add", "Mul", "Sub", "Div"])), x)
    row = b.const(b.rng.standard_normal((1, c, 1, wd)).astype(np.float32))
    y = b.concat([x, row], axis=2)
    return b.sliced(y, [1], [h + 1], axes=[2])


def _second_reader(b, v, x, form, draw):
    """`x` combined with a second read of the looked-through value `v` (same shape as x)."""
    if form == "branch":      # another branch, cut on its own, reads v the same way
        y = _act(b, b.conv(x, b.channels(x), k=1), draw)
        return b.binary("Add", x, b.binary("Mul", y, v))
    if form == "conv":
        return b.binary("Add", x, b.conv(v, b.channels(x), k=1))
    if form == "identity":
        return b.binary("Add", x, b.op("Identity", [v], b.shapes[v]))
    if form == "output":
        b.returned = [*b.returned, v]
        return x
    if form == "shape":       # the size of v (with the batch: not folded) scales x
        shape = b.op("Shape", [v], (len(b.shapes[v]),))
        size = b.op("Cast", [shape], (len(b.shapes[v]),), to=TensorProto.FLOAT)
        size = b.reduce("ReduceSum", size, [0], keepdims=0)
        return b.binary("Mul", x, b.binary("Mul", size, b.const(np.float32(0.01))))
    return b.binary("Add", x, b.op("Sum", [v, v], b.shapes[v]))   # one node reads it twice


def block_fan_out(b, x, w, draw):
    """Values that a channel rule looks through, read by a second node: a per-channel
    factor computed as gamma * map (scaling x), a learned token expanded over the batch
    (joined to x along H), a computed Reshape target (N, C, -1) or Resize sizes
    Concat(Shape(x)[0:2], hw); the second reader is another branch, a conv, an Identity, a
    Shape, the same node twice or the model's outputs. Whatever reads them twice keeps its
    channels; the rest is pruned (a cut made for one reader shrank the value for all)."""
    x = _act(b, b.conv(x, w), draw)
    n, c, h, wd = b.shapes[x]
    kind = draw(st.sampled_from(["factor", "target", "sizes"] +
                                (["token"] if b.dynamic_batch else [])))
    shape = b.op("Shape", [x], (4,))
    batch = b.sliced(shape, [0], [1])
    if kind == "factor":
        t = b.reduce("ReduceSum", "input", [1])                          # (N, 1, H, W)
        v = b.binary("Mul", b.const(b.rng.uniform(0.5, 1.5, (1, c, 1, 1)).astype(np.float32)),
                     b.act(t, "Sigmoid"))
        form = draw(st.sampled_from(["branch", "conv", "identity", "output", "shape", "twice"]))
        return _second_reader(b, v, b.binary("Mul", x, v), form, draw)
    if kind == "token":
        target = b.concat([batch, b.const(_i64([1, 1, wd]))], axis=0)
        b.shapes[target] = (4,)
        v = b.op("Expand", [b.const(b.rng.standard_normal((1, c, 1, wd)).astype(np.float32)),
                            target], (n, c, 1, wd))
        y = b.sliced(b.concat([x, v], axis=2), [1], [h + 1], axes=[2])
        form = draw(st.sampled_from(["branch", "identity", "output"]))
        if form == "branch":
            z = _act(b, b.conv(x, c, k=1), draw)
            return b.binary("Add", y, b.sliced(b.concat([z, v], axis=2), [0], [h], axes=[2]))
        if form == "identity":
            v = b.op("Identity", [v], b.shapes[v])
            return b.binary("Add", y, b.sliced(b.concat([x, v], axis=2), [0], [h], axes=[2]))
        return _second_reader(b, v, y, form, draw)
    if kind == "target":
        target = b.concat([batch, b.const(_i64([c])), b.const(_i64([-1]))], axis=0)
        b.shapes[target] = (3,)
        y = b.op("Reshape", [x, target], (n, c, h * wd))
        y = b.op("Reshape", [b.act(y, "Relu"), b.const(_i64([-1, c, h, wd]))], (n, c, h, wd))
    else:
        nc = b.sliced(shape, [0], [2])
        target = b.concat([nc, b.const(_i64([2 * h, 2 * wd]))], axis=0)
        b.shapes[target] = (4,)
        roi = "" if b.opset >= 13 else b.const(np.zeros(0, dtype=np.float32))
        empty = "" if b.opset >= 13 else b.const(np.zeros(0, dtype=np.float32))
        y = b.pool(b.op("Resize", [x, roi, empty, target], (n, c, 2 * h, 2 * wd), mode="nearest"))
    form = draw(st.sampled_from(["output", "identity", "none"]))
    if form != "none":
        v = target if form == "output" else b.op("Identity", [target], b.shapes[target])
        b.returned = [*b.returned, v]
        b.out_types = {**b.out_types, v: TensorProto.INT64}
    return y


BLOCKS = [block_conv_forms, block_gather_spatial, block_concat_const, block_gather,
          block_depthwise_multiplier, block_grouped_width, block_deconv,
          block_resize, block_split, block_slice, block_channel_reduce, block_concat_twice,
          block_pad, block_nhwc, block_shared_weight, block_bn_pair]


# -- heads: (b, x, draw) -> list of outputs -----------------------------------------------

def head_gemm_transb0(b, x, draw):
    """Gemm with B as (K, N), alpha and beta, a bias as (N,) or (1, N)."""
    f = b.flatten(b.gap(x))
    k = b.shapes[f][1]
    bias = b.const(b.rng.uniform(-0.1, 0.1, draw(st.sampled_from([(4,), (1, 4)])))
                   .astype(np.float32))
    return [b.op("Gemm", [f, b.weight(k, 4), bias], (b.shapes[f][0], 4),
                 alpha=draw(st.sampled_from([1.0, 0.5])), beta=draw(st.sampled_from([1.0, 2.0])))]


def head_channels_last_reduce(b, x, draw):
    """tf2onnx's form: NHWC, a mean over H and W with keepdims 0, a MatMul + Add."""
    n, c, h, wd = b.shapes[x]
    t = b.op("Transpose", [x], (n, h, wd, c), perm=[0, 2, 3, 1])
    r = b.reduce("ReduceMean", t, [1, 2], keepdims=0)
    return [b.binary("Add", b.matmul(r, 4), b.vector(4))]


def head_reshape_zero(b, x, draw):
    """Reshape (N, C, H, W) -> (N, C*H*W) by [0, -1], or a Squeeze of a GAP."""
    n, c, h, wd = b.shapes[x]
    if draw(st.booleans()):
        f = b.op("Reshape", [b.pool(x), b.const(_i64([0, -1]))], (n, c * (h // 2) * (wd // 2)))
    elif b.opset >= 13:
        f = b.op("Squeeze", [b.gap(x), b.const(_i64([2, 3]))], (n, c))
    else:
        f = b.op("Squeeze", [b.gap(x)], (n, c), axes=[2, 3])
    return [b.gemm(f, 4)]


def head_matmul(b, x, draw):
    """Flatten -> MatMul (+ Add of a bias vector or (1, M) row: normalised to Gemm)."""
    f = b.flatten(b.pool(x, "AveragePool") if b.shapes[x][2] >= 2 else x)
    y = b.matmul(f, 5)
    bias = draw(st.sampled_from([None, (5,), (1, 5)]))
    if bias is None:
        return [y]
    c = b.const(b.rng.uniform(-0.1, 0.1, bias).astype(np.float32))
    return [b.binary("Add", c, y) if draw(st.booleans()) else b.binary("Add", y, c)]


def head_reduce(b, x, draw):
    """ReduceMean / ReduceMax over space with keepdims 0, then a Gemm."""
    op = draw(st.sampled_from(["ReduceMean", "ReduceMax", "ReduceL2"]))
    r = b.reduce(op, x, draw(st.sampled_from([[2, 3], [-1, -2]])), keepdims=0)
    return [b.gemm(r, 4)]


def head_segmentation(b, x, draw):
    """A 1x1 conv's map is the output (a segmentation head)."""
    return [b.conv(x, 3, k=1)]


def head_two(b, x, draw):
    """A classifier and a map output, or a classifier and its input's features."""
    g = b.flatten(b.gap(x))
    logits = b.gemm(g, 4)
    return [logits, b.conv(x, 2, k=1) if draw(st.booleans()) else g]


HEADS = [head_channels_last_reduce, head_reshape_zero, head_gemm_transb0, head_matmul,
         head_reduce, head_segmentation, head_two]

OPSETS = [11, 13, 17, 18]


@st.composite
def structure_graphs(draw):
    opset = draw(st.sampled_from(OPSETS))
    b = Builder((1, 3, 8, 8), seed=draw(st.integers(0, 2 ** 16)), opset=opset,
                dynamic_batch=draw(st.integers(0, 3)) > 0)
    b.fresh = draw(st.integers(0, 3)) == 0
    x = b.act(b.conv("input", draw(st.integers(2, 6))), "Relu")
    outs = []
    for _ in range(draw(st.integers(1, 3))):
        x = draw(st.sampled_from(BLOCKS))(b, x, draw(st.integers(2, 6)), draw)
        if draw(st.integers(0, 9)) == 0:  # a feature map read inside and as an output
            outs.append(x)
    outs = draw(st.sampled_from(HEADS))(b, x, draw) + outs
    return b.build_outputs(outs)


@st.composite
def fan_out_graphs(draw):
    """block_fan_out once or twice, maybe after another block, then a head; the values
    it returns are outputs after the head's."""
    opset = draw(st.sampled_from(OPSETS))
    b = Builder((1, 3, 8, 8), seed=draw(st.integers(0, 2 ** 16)), opset=opset,
                dynamic_batch=draw(st.integers(0, 3)) > 0)
    x = b.act(b.conv("input", draw(st.integers(2, 6))), "Relu")
    if draw(st.booleans()):
        x = draw(st.sampled_from(BLOCKS))(b, x, draw(st.integers(2, 6)), draw)
    for _ in range(draw(st.integers(1, 2))):
        x = block_fan_out(b, x, draw(st.integers(2, 6)), draw)
    return b.build_outputs(draw(st.sampled_from(HEADS))(b, x, draw) + b.returned)


@st.composite
def conv1d_graphs(draw):
    """(N, C, L) signals: Conv1d (plain, depthwise with a multiplier, grouped),
    ConvTranspose1d, pools, a Gemm head."""
    b = Builder((1, 3, 12), seed=draw(st.integers(0, 2 ** 16)), opset=draw(st.sampled_from(OPSETS)))
    x = b.act(b.conv_nd("input", draw(st.integers(2, 6))), "Relu")
    for _ in range(draw(st.integers(1, 3))):
        form = draw(st.sampled_from(["plain", "depthwise", "grouped", "deconv", "pool"]))
        c = b.channels(x)
        if form == "plain":
            x = b.conv_nd(x, draw(st.integers(2, 6)), k=draw(st.sampled_from([1, 3, 5])))
        elif form == "depthwise":
            x = b.conv_nd(x, c * draw(st.integers(1, 2)), groups=c)
        elif form == "grouped":
            x = b.conv_nd(b.conv_nd(x, 2 * draw(st.integers(1, 3)), k=1),
                          2 * draw(st.integers(1, 3)), groups=2)
        elif form == "deconv":
            x = b.deconv(x, draw(st.integers(2, 5)), 2, 2, 1, 0, 0)
            n, c, l = b.shapes[x]
            x = b.op("MaxPool", [x], (n, c, l // 2), kernel_shape=[2], strides=[2])
        else:
            n, c, l = b.shapes[x]
            x = b.op("AveragePool", [x], (n, c, l - 2), kernel_shape=[3], strides=[1])
        x = _act(b, x, draw)
    n, c, _ = b.shapes[x]
    g = b.op("GlobalAveragePool", [x], (n, c, 1))
    return b.build_outputs([b.gemm(b.flatten(g), 4)])


@st.composite
def old_opset_graphs(draw):
    """Opsets 9 and 10 (gpp-onnx upgrades them): Upsample (9) or Resize with scales (10),
    Split by its attribute, Slice by attributes (9) or inputs (10)."""
    opset = draw(st.sampled_from([9, 10]))
    b = Builder((1, 3, 8, 8), seed=draw(st.integers(0, 2 ** 16)), opset=opset)
    x = b.act(b.conv("input", draw(st.integers(2, 6))), "Relu")
    for _ in range(draw(st.integers(1, 3))):
        form = draw(st.sampled_from(["upsample", "split", "slice", "bn"]))
        x = b.act(b.conv(x, draw(st.integers(2, 6))), "Relu")
        n, c, h, wd = b.shapes[x]
        if form == "upsample":
            scales = b.const(np.array([1, 1, 2, 2], dtype=np.float32))
            op = "Upsample" if opset == 9 else "Resize"
            x = b.pool(b.op(op, [x, scales], (n, c, 2 * h, 2 * wd), mode="nearest"))
        elif form == "split" and c >= 2:
            first = draw(st.integers(1, c - 1))
            a, z = b.op("Split", [x], (n, c, h, wd), n_out=2, axis=1, split=[first, c - first])
            b.shapes[a], b.shapes[z] = (n, first, h, wd), (n, c - first, h, wd)
            x = b.concat([b.conv(a, 2, k=1), z])
        elif form == "slice" and c >= 2:
            s0 = draw(st.integers(0, c - 2))
            if opset == 9:
                y = b.op("Slice", [x], (n, c - s0, h, wd), starts=[s0], ends=[1000], axes=[1])
            else:
                y = b.sliced(x, [s0], [1000], axes=[1])
            x = b.concat([y, b.conv(x, 2, k=1)])
        else:
            x = b.bn(x)
    return b.build_outputs([b.gemm(b.flatten(b.gap(x)), 4)])


SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                      HealthCheck.too_slow])


def masked_here(path, plan) -> onnx.ModelProto | None:
    """The model as the tool loads it with a Mul by a 0/1 mask behind every value that
    loses channels (the tool's masked model zeroes weight slices instead). None where a
    node averages over channels (a mean over the kept ones is not a mean with zeros)."""
    from gpp_onnx.pipeline import load_normalized
    from gpp_onnx.plan import kept_elements

    _, model, analysis = load_normalized(path)
    if any(analysis.rules[n].__class__.__name__ != "Reduce" or
           next(x for x in model.graph.node if x.name == n).op_type == "ReduceMean"
           for n in analysis.reductions):
        return None
    kept = kept_elements(analysis, plan)
    for value, keep in kept.items():
        shape = [1] * len(analysis.view.shape(value))
        axis = analysis.axes[value]
        shape[axis] = analysis.view.shape(value)[axis]
        mask = np.zeros(shape[axis], np.float32)
        mask[keep] = 1
        name = f"{value}.kept_here"
        model.graph.initializer.append(
            onnx.numpy_helper.from_array(mask.reshape(shape), f"{name}.mask"))
        for node in model.graph.node:
            for i, x in enumerate(node.input):
                if x == value:
                    node.input[i] = name
        model.graph.node.append(helper.make_node("Mul", [value, f"{name}.mask"], [name]))
    from gpp_onnx.compat import sort_nodes
    sort_nodes(model.graph)
    return model


def check_invariant(model, tmp, **config):
    """pruned == masked (the tool's masked model, conftest) and pruned == the model
    masked here."""
    from conftest import feeds_for, rel_err, run_model

    result = assert_pruned_equals_masked(model, tmp, expect_change=False, **config)
    mine = masked_here(tmp / "model.onnx", result.plan)
    if mine is not None:
        feeds = feeds_for(model, batch=3)
        assert rel_err(run_model(tmp / "pruned.onnx", feeds), run_model(mine, feeds)) < 1e-5
    return result


@settings(max_examples=150, **SETTINGS)
@given(model=structure_graphs(), ratio=st.sampled_from([0.25, 0.5, 0.75]),
       criterion=st.sampled_from(["l1", "l2", "random"]))
def test_structures_pruned_equals_masked(model, ratio, criterion, tmp_path_factory):
    check_invariant(model, tmp_path_factory.mktemp("fuzz"), ratio=ratio, criterion=criterion)


@settings(max_examples=30, **SETTINGS)
@given(model=fan_out_graphs(), ratio=st.sampled_from([0.25, 0.5, 0.75]),
       criterion=st.sampled_from(["l1", "random"]))
def test_fan_out_pruned_equals_masked(model, ratio, criterion, tmp_path_factory):
    """Looked-through values read twice (block_fan_out): no 'conflicting cuts', no pruned
    model that fails to run, pruned == masked."""
    check_invariant(model, tmp_path_factory.mktemp("fuzz"), ratio=ratio, criterion=criterion)


@settings(max_examples=40, **SETTINGS)
@given(model=st.one_of(conv1d_graphs(), old_opset_graphs()),
       ratio=st.sampled_from([0.25, 0.5, 0.75]))
def test_conv1d_and_old_opsets_pruned_equals_masked(model, ratio, tmp_path_factory):
    check_invariant(model, tmp_path_factory.mktemp("fuzz"), ratio=ratio)


# -- MACs and params, counted here ------------------------------------------------------

def count_written(path) -> tuple[int, int]:
    """(params, MACs per image) of an ONNX file: float initializer elements, and the
    multiply-accumulates of Conv, ConvTranspose, Gemm and MatMul with a constant weight
    from the weight shapes and the output (Conv) or input (ConvTranspose) shapes that
    onnxruntime computes on one image."""
    import onnxruntime as ort

    model = onnx.load(str(path))
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in floats)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = [o for n in probe.graph.node for o in n.output if o] + \
        [i for n in probe.graph.node for i in n.input if i and i not in inits]
    known = {o.name for o in probe.graph.output}
    for name in dict.fromkeys(names):
        if name not in known:
            probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    inp = model.graph.input[0]
    dims = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
    feed = {inp.name: np.zeros([1, *dims[1:]], np.float32)}
    shapes = {o.name: v.shape for o, v in zip(session.get_outputs(), session.run(None, feed))}
    macs = 0
    for node in model.graph.node:
        w = inits.get(node.input[1]) if len(node.input) > 1 else None
        if w is None:
            continue
        if node.op_type == "Conv":
            macs += int(np.prod(shapes[node.output[0]][1:])) * int(np.prod(w[1:]))
        elif node.op_type == "ConvTranspose":
            macs += int(np.prod(shapes[node.input[0]][1:])) * int(np.prod(w[1:]))
        elif node.op_type in ("Gemm", "MatMul") and len(w) == 2:
            macs += int(np.prod(shapes[node.output[0]][:-1])) * w[0] * w[1]
    return params, macs


@settings(max_examples=60, **SETTINGS)
@given(model=st.one_of(structure_graphs(), conv1d_graphs(), old_opset_graphs()),
       target=st.sampled_from([0.3, 0.5, 0.8]),
       allocation=st.sampled_from(["uniform", "global"]))
def test_target_macs_reports_what_the_written_model_costs(model, target, allocation,
                                                          tmp_path_factory):
    from gpp_onnx import PruneConfig, prune

    tmp = tmp_path_factory.mktemp("macs")
    src = tmp / "model.onnx"
    onnx.save(model, src)
    result = prune(src, tmp / "pruned.onnx",
                   PruneConfig(latency=False, round_to=1, target_macs=target,
                               allocation=allocation, criterion="l1"))
    report = json.loads((tmp / "pruned.report.json").read_text())
    before, after = count_written(src), count_written(tmp / "pruned.onnx")
    assert (result.before.params, result.before.macs) == before
    assert (result.after.params, result.after.macs) == after
    assert (report["before"]["params"], report["before"]["macs"]) == before
    assert (report["after"]["params"], report["after"]["macs"]) == after


@settings(max_examples=60, **SETTINGS)
@given(model=st.one_of(structure_graphs(), conv1d_graphs()),
       ratio=st.sampled_from([0.25, 0.5, 0.75]), seed=st.integers(0, 99))
def test_structures_repaired_pruned_equals_repaired_masked(model, ratio, seed):
    """The invariant with the bias fold and the least-squares refit on both sides (the
    refit of ConvTranspose, Conv1d and Gemm with B as (K, N) among them)."""
    from conftest import assert_repaired_pruned_equals_masked

    assert_repaired_pruned_equals_masked(model, ratio, seed)


@settings(max_examples=40, **SETTINGS)
@given(model=st.one_of(structure_graphs(), conv1d_graphs()), ratio=st.sampled_from([0.25, 0.5]),
       seed=st.integers(0, 99))
def test_removed_params_and_macs_are_what_the_cut_removes(model, ratio, seed, tmp_path_factory):
    """``Estimator.removed`` (the per-group shares of ``analyze``, summed over the slots a
    cut touches alone) equals the counts of the uncut and the cut file, counted here. The
    weights, biases and scales get distinct values first, as trained ones have: fresh zero
    biases of two widths cut to one width, or two fresh BatchNorms' vectors, are the same
    bytes, and the written model shares them (a saving no estimate of the cut sees)."""
    from gpp_onnx import surgery
    from gpp_onnx.analysis import analyze_model
    from gpp_onnx.model import normalize
    from gpp_onnx.plan import kept_elements, model_digest, plan_by_ratio
    from gpp_onnx.stats import Estimator

    tmp = tmp_path_factory.mktemp("removed")
    rng = np.random.default_rng(seed)
    weights = {name for n in model.graph.node if n.op_type in (
        "Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "Mul", "Add", "PRelu")
        for name in n.input[1:]}
    for t in model.graph.initializer:
        if t.name in weights and t.data_type == TensorProto.FLOAT and t.dims:
            w = onnx.numpy_helper.to_array(t)
            t.CopyFrom(onnx.numpy_helper.from_array(
                (w + rng.uniform(0.01, 0.02, w.shape)).astype(np.float32), t.name))
    normalized = normalize(model)
    analysis = analyze_model(normalized)
    scores = {g.key: rng.random(g.width) for g in analysis.prunable}
    kept = kept_elements(analysis, plan_by_ratio(analysis, scores, ratio,
                                                 model_digest(normalized)))
    onnx.save(normalized, tmp / "model.onnx")
    onnx.save(surgery.cut(analysis, kept), tmp / "cut.onnx")
    (_, m0), (_, m1) = count_written(tmp / "model.onnx"), count_written(tmp / "cut.onnx")
    # params: distinct float tensors (the written model shares equal constants, such as
    # two Clips' bounds or two Resizes' scales, whether or not a cut touched them)
    p0, p1 = (sum(int(np.prod(t.dims)) for t in {
        (t.data_type, tuple(t.dims), onnx.numpy_helper.to_array(t).tobytes()): t
        for t in onnx.load(tmp / f).graph.initializer if t.data_type == TensorProto.FLOAT
    }.values()) for f in ("model.onnx", "cut.onnx"))
    params, macs = Estimator(analysis).removed(kept)
    assert abs(params - (p0 - p1)) < 0.5 and abs(macs - (m0 - m1)) < 0.5
