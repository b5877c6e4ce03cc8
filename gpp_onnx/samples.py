"""Small CNN graphs built directly in ONNX (no framework needed).

`GraphBuilder` writes NCHW graphs op by op with seeded random weights and tracks
shapes. `sample_cnn()` puts every channel-routing family in one small CNN: a residual
stem, an Inception-style concat, a depthwise + squeeze-excitation block, a channel
shuffle and a Flatten -> Gemm classifier (10 classes, 3x32x32 inputs). `digits_cnn()` is
the model of the README's demo (trained there on the bundled 8x8 digits).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class GraphBuilder:
    def __init__(self, input_shape=(1, 3, 32, 32), seed: int = 0, opset: int = 17,
                 dynamic_batch: bool = True, name: str = "sample_cnn"):
        self.rng = np.random.default_rng(seed)
        self.opset, self.name = opset, name
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.shapes: dict[str, tuple[int, ...]] = {"input": tuple(input_shape)}
        self.dynamic_batch = dynamic_batch
        self._n = 0

    # -- plumbing ----------------------------------------------------------------
    def _name(self, op: str) -> str:
        self._n += 1
        return f"{op.lower()}{self._n}"

    def const(self, array, base: str = "w") -> str:
        name = f"{base}{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        self.shapes[name] = np.shape(array)
        return name

    def op(self, op: str, inputs, shape, n_out: int = 1, **attrs) -> str:
        name = self._name(op)
        outs = [f"{name}_out{i}" if i else name for i in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name, **attrs))
        for out in outs:
            self.shapes[out] = tuple(shape)
        return outs[0] if n_out == 1 else outs

    def weight(self, *shape, scale: float | None = None) -> str:
        fan_in = int(np.prod(shape[1:])) or 1
        scale = np.sqrt(2.0 / fan_in) if scale is None else scale
        return self.const((self.rng.standard_normal(shape) * scale).astype(np.float32))

    def vector(self, n: int, lo: float = -0.1, hi: float = 0.1) -> str:
        return self.const(self.rng.uniform(lo, hi, n).astype(np.float32))

    def channels(self, x: str) -> int:
        return self.shapes[x][1]

    # -- layers --------------------------------------------------------------------
    def conv(self, x, out_ch, k=3, stride=1, groups=1, bias=True, dilation=1):
        n, c, h, w = self.shapes[x]
        pad = dilation * (k - 1) // 2
        inputs = [x, self.weight(out_ch, c // groups, k, k)]
        if bias:
            inputs.append(self.vector(out_ch))
        ho, wo = (h + 2 * pad - dilation * (k - 1) - 1) // stride + 1, \
                 (w + 2 * pad - dilation * (k - 1) - 1) // stride + 1
        return self.op("Conv", inputs, (n, out_ch, ho, wo), kernel_shape=[k, k],
                       strides=[stride, stride], pads=[pad] * 4, group=groups,
                       dilations=[dilation, dilation])

    def conv_transpose(self, x, out_ch, k=2, stride=2, groups=1):
        n, c, h, w = self.shapes[x]
        inputs = [x, self.weight(c, out_ch // groups, k, k), self.vector(out_ch)]
        return self.op("ConvTranspose", inputs, (n, out_ch, (h - 1) * stride + k,
                                                 (w - 1) * stride + k),
                       kernel_shape=[k, k], strides=[stride, stride], group=groups)

    def bn(self, x):
        c = self.channels(x)
        params = [self.vector(c, 0.5, 1.5), self.vector(c), self.vector(c),
                  self.vector(c, 0.5, 1.5)]
        return self.op("BatchNormalization", [x, *params], self.shapes[x], epsilon=1e-5)

    def instance_norm(self, x):
        c = self.channels(x)
        return self.op("InstanceNormalization", [x, self.vector(c, 0.5, 1.5), self.vector(c)],
                       self.shapes[x])

    def act(self, x, op="Relu", **attrs):
        if op == "PRelu":
            slope = self.const(self.rng.uniform(0, 0.3, (self.channels(x), 1, 1))
                               .astype(np.float32))
            return self.op("PRelu", [x, slope], self.shapes[x])
        if op == "Clip":
            lo, hi = self.const(np.float32(0)), self.const(np.float32(6))
            return self.op("Clip", [x, lo, hi], self.shapes[x])
        return self.op(op, [x], self.shapes[x], **attrs)

    def binary(self, op, a, b):
        shape = tuple(np.broadcast_shapes(self.shapes[a], self.shapes[b]))
        return self.op(op, [a, b], shape)

    def channel_const(self, op, x):
        """x (op) a per-channel constant of shape (C, 1, 1)."""
        c = self.const(self.rng.uniform(0.5, 1.5, (self.channels(x), 1, 1)).astype(np.float32))
        return self.op(op, [x, c], self.shapes[x])

    def pool(self, x, op="MaxPool", k=2, stride=2):
        n, c, h, w = self.shapes[x]
        return self.op(op, [x], (n, c, (h - k) // stride + 1, (w - k) // stride + 1),
                       kernel_shape=[k, k], strides=[stride, stride])

    def gap(self, x):
        n, c = self.shapes[x][:2]
        return self.op("GlobalAveragePool", [x], (n, c, 1, 1))

    def reduce_mean(self, x):
        n, c = self.shapes[x][:2]
        if self.opset < 18:
            return self.op("ReduceMean", [x], (n, c, 1, 1), axes=[2, 3], keepdims=1)
        axes = self.const(np.array([2, 3], dtype=np.int64))
        return self.op("ReduceMean", [x, axes], (n, c, 1, 1), keepdims=1)

    def layer_norm(self, x, eps: float = 1e-5):
        """A LayerNorm over the channel axis of NCHW written out as older exporters do:
        ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, then scale and shift."""
        n, c, h, w = self.shapes[x]
        stat = (n, 1, h, w)
        if self.opset < 18:
            mean = self.op("ReduceMean", [x], stat, axes=[1], keepdims=1)
        else:
            mean = self.op("ReduceMean", [x, self.const(np.array([1]))], stat, keepdims=1)
        d = self.binary("Sub", x, mean)
        sq = self.binary("Pow", d, self.const(np.float32(2)))
        if self.opset < 18:
            var = self.op("ReduceMean", [sq], stat, axes=[1], keepdims=1)
        else:
            var = self.op("ReduceMean", [sq, self.const(np.array([1]))], stat, keepdims=1)
        sd = self.act(self.binary("Add", var, self.const(np.float32(eps))), "Sqrt")
        y = self.binary("Div", d, sd)
        return self.channel_const("Add", self.channel_const("Mul", y))

    def layer_norm_op(self, x, channels_last: bool = True):
        """LayerNormalization over the channels: NHWC between two Transposes (ConvNeXt)
        or, with ``channels_last=False``, over C, H and W of NCHW (axis 1)."""
        n, c, h, w = self.shapes[x]
        if not channels_last:
            scale = self.rng.uniform(0.5, 1.5, (c, h, w)).astype(np.float32)
            shift = self.rng.uniform(-0.1, 0.1, (c, h, w)).astype(np.float32)
            return self.op("LayerNormalization", [x, self.const(scale), self.const(shift)],
                           self.shapes[x], axis=1)
        t = self.op("Transpose", [x], (n, h, w, c), perm=[0, 2, 3, 1])
        y = self.op("LayerNormalization", [t, self.vector(c, 0.5, 1.5), self.vector(c)],
                    (n, h, w, c), axis=-1, epsilon=1e-6)
        return self.op("Transpose", [y], (n, c, h, w), perm=[0, 3, 1, 2])

    def concat(self, xs, axis=1):
        shape = list(self.shapes[xs[0]])
        shape[axis] = sum(self.shapes[x][axis] for x in xs)
        return self.op("Concat", xs, shape, axis=axis)

    def split(self, x, sizes):
        n, _, h, w = self.shapes[x]
        if self.opset < 13:
            outs = self.op("Split", [x], self.shapes[x], n_out=len(sizes), axis=1,
                           split=list(sizes))
        else:
            outs = self.op("Split", [x, self.const(np.array(sizes, dtype=np.int64))],
                           self.shapes[x], n_out=len(sizes), axis=1)
        for out, s in zip(outs, sizes):
            self.shapes[out] = (n, s, h, w)
        return outs

    def slice(self, x, start, end):
        n, _, h, w = self.shapes[x]
        ins = [x] + [self.const(np.array(v, dtype=np.int64)) for v in ([start], [end], [1])]
        return self.op("Slice", ins, (n, end - start, h, w))

    def shuffle(self, x, groups):
        n, c, h, w = self.shapes[x]
        r = self.op("Reshape", [x, self.const(np.array([-1, groups, c // groups, h, w]))],
                    (n, groups, c // groups, h, w))
        t = self.op("Transpose", [r], (n, c // groups, groups, h, w), perm=[0, 2, 1, 3, 4])
        return self.op("Reshape", [t, self.const(np.array([-1, c, h, w]))], (n, c, h, w))

    def se(self, x, reduction=4):
        c = self.channels(x)
        s = self.gap(x)
        s = self.act(self.conv(s, max(c // reduction, 1), k=1), "Relu")
        s = self.act(self.conv(s, c, k=1), "Sigmoid")
        return self.binary("Mul", x, s)

    def pad(self, x, p=1):
        n, c, h, w = self.shapes[x]
        pads = self.const(np.array([0, 0, p, p, 0, 0, p, p], dtype=np.int64))
        return self.op("Pad", [x, pads], (n, c, h + 2 * p, w + 2 * p), mode="constant")

    def resize(self, x, scale=2):
        n, c, h, w = self.shapes[x]
        scales = self.const(np.array([1, 1, scale, scale], dtype=np.float32))
        return self.op("Resize", [x, "", scales], (n, c, h * scale, w * scale), mode="nearest")

    def flatten(self, x):
        n = self.shapes[x][0]
        return self.op("Flatten", [x], (n, int(np.prod(self.shapes[x][1:]))), axis=1)

    def reshape_flatten(self, x):
        n = self.shapes[x][0]
        feat = int(np.prod(self.shapes[x][1:]))
        return self.op("Reshape", [x, self.const(np.array([-1, feat], dtype=np.int64))],
                       (n, feat))

    def gemm(self, x, out):
        k = self.shapes[x][1]
        return self.op("Gemm", [x, self.weight(out, k), self.vector(out)],
                       (self.shapes[x][0], out), transB=1)

    def matmul(self, x, out):
        k = self.shapes[x][-1]
        return self.op("MatMul", [x, self.weight(k, out, scale=np.sqrt(2.0 / k))],
                       (*self.shapes[x][:-1], out))

    # -- sequences (CRNN text-recognizer heads) ------------------------------------
    def to_sequence(self, x):
        """(N, C, 1, W) -> Squeeze -> Transpose -> (W, N, C), as CRNNs feed an LSTM."""
        n, c, _, w = self.shapes[x]
        s = self.op("Squeeze", [x, self.const(np.array([2], dtype=np.int64))], (n, c, w))
        return self.op("Transpose", [s], (w, n, c), perm=[2, 0, 1])

    def recurrent(self, x, op="LSTM", hidden=8, direction="forward", layout=0,
                  initial=None, seq_lens=None, peepholes=False, **attrs):
        """ONNX LSTM / GRU / RNN over x (seq, N, I) (layout 1: (N, seq, I)); returns the
        outputs [Y, Y_h(, Y_c)]. `initial`: states (or "" to omit), `seq_lens`: a value."""
        gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
        d = 2 if direction == "bidirectional" else 1
        seq, n, i = self.shapes[x] if layout == 0 else [self.shapes[x][k] for k in (1, 0, 2)]
        scale = 1.0 / np.sqrt(hidden)
        inputs = [x, self.weight(d, gates * hidden, i, scale=scale),
                  self.weight(d, gates * hidden, hidden, scale=scale),
                  self.weight(d, 2 * gates * hidden, scale=0.1), seq_lens or ""]
        inputs += list(initial or [])
        if peepholes:
            inputs += [""] * (7 - len(inputs)) + [self.weight(d, 3 * hidden, scale=0.1)]
        while inputs and not inputs[-1]:
            inputs.pop()
        y_shape = (seq, d, n, hidden) if layout == 0 else (n, seq, d, hidden)
        outs = self.op(op, inputs, y_shape, n_out=3 if op == "LSTM" else 2, hidden_size=hidden,
                       direction=direction, layout=layout, **attrs)
        for out in outs[1:]:
            self.shapes[out] = (d, n, hidden) if layout == 0 else (n, d, hidden)
        return outs

    def merge_directions(self, y):
        """Y (seq, D, N, H) -> Transpose -> Reshape -> (seq, N, D*H)."""
        seq, d, n, h = self.shapes[y]
        t = self.op("Transpose", [y], (seq, n, d, h), perm=[0, 2, 1, 3])
        return self.op("Reshape", [t, self.const(np.array([0, 0, -1], dtype=np.int64))],
                       (seq, n, d * h))

    def build(self, output: str) -> onnx.ModelProto:
        in_shape = list(self.shapes["input"])
        out_shape = list(self.shapes[output])
        if self.dynamic_batch:
            in_shape[0] = out_shape[0] = "N"
        graph = helper.make_graph(
            self.nodes, self.name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, in_shape)],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, out_shape)],
            self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)],
                                  producer_name="gpp-onnx.samples")
        model.ir_version = 8
        onnx.checker.check_model(model, full_check=True)
        return model


def digits_cnn(seed: int = 0) -> onnx.ModelProto:
    """An untrained CNN for the bundled 8x8 digits (1x8x8 input, 10 classes)."""
    b = GraphBuilder((1, 1, 8, 8), seed=seed, name="digits_cnn")
    x = b.act(b.conv("input", 16), "Relu")
    x = b.act(b.conv(x, 32), "Relu")
    x = b.pool(x)                                                           # 4x4
    r = b.act(b.conv(x, 32), "Relu")
    x = b.act(b.binary("Add", x, b.conv(r, 32)), "Relu")                    # residual
    x = b.concat([b.act(b.conv(x, 24, k=1), "Relu"),                        # two branches
                  b.act(b.conv(b.act(b.conv(x, 16, k=1), "Relu"), 24), "Relu")])
    x = b.act(b.gemm(b.flatten(b.gap(x)), 64), "Relu")
    return b.build(b.gemm(x, 10))


def sample_cnn(seed: int = 0, num_classes: int = 10) -> onnx.ModelProto:
    """The embedded default model: every channel-routing family in one small CNN."""
    b = GraphBuilder((1, 3, 32, 32), seed=seed)
    x = b.act(b.bn(b.conv("input", 32)), "Relu")
    r = b.act(b.bn(b.conv(x, 32)), "Relu")
    x = b.act(b.binary("Add", x, b.bn(b.conv(r, 32))), "Relu")            # residual
    x = b.pool(x)                                                           # 16x16
    br1 = b.act(b.conv(x, 16, k=1), "Relu")                                # inception
    br2 = b.act(b.conv(b.act(b.conv(x, 16, k=1), "Relu"), 24), "Relu")
    br3 = b.act(b.conv(b.pool(b.pad(x), "MaxPool", k=3, stride=1), 8, k=1), "Relu")
    x = b.concat([br1, br2, br3])                                           # 48 channels
    x = b.act(b.conv(x, 48, k=3, groups=48), "HardSwish")                  # depthwise
    x = b.se(x)
    x = b.shuffle(b.act(b.conv(x, 64, k=1, groups=4), "Relu"), 4)          # grouped + shuffle
    x = b.pool(x)                                                           # 8x8
    x = b.act(b.bn(b.conv(x, 64, stride=2)), "Relu")                        # 4x4
    x = b.flatten(x)                                                        # 64*4*4 features
    x = b.act(b.gemm(x, 64), "Relu")
    return b.build(b.gemm(x, num_classes))
