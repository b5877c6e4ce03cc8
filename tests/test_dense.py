"""Dense layers written as MatMul + Add (Paddle, tf2onnx) are normalised to Gemm: the same
function in onnxruntime, and the repairs then refit them."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import gpp_onnx
from gpp_onnx import model as model_io
from gpp_onnx.config import DataOptions
from gpp_onnx.samples import GraphBuilder


def _dense(b, x, out, bias_shape=None):
    """MatMul(x, W) then Add(., b) with b of `bias_shape` (default (out,)), Paddle style."""
    mm = b.matmul(x, out)
    bias = b.const(b.rng.uniform(-0.1, 0.1, bias_shape or (out,)).astype(np.float32))
    return b.op("Add", [mm, bias], b.shapes[mm])


def _head_model():
    b = GraphBuilder((1, 3, 8, 8), seed=0)
    x = b.flatten(b.gap(b.act(b.conv(b.act(b.conv("input", 16), "Relu"), 16), "Relu")))
    h = b.act(_dense(b, x, 24), "Relu")
    return b.build(_dense(b, h, 5, bias_shape=(1, 5)))


def _run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_matmul_add_layers_become_gemm_computing_the_same():
    model = _head_model()
    normal = model_io.normalize(model)
    ops = [n.op_type for n in normal.graph.node]
    assert ops.count("Gemm") == 2 and "MatMul" not in ops and "Add" not in ops
    x = np.random.default_rng(1).standard_normal((7, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(normal, x), _run(model, x), rtol=1e-5, atol=1e-6)


def _not_dense(kind):
    b = GraphBuilder((1, 3, 8, 8), seed=0)
    x = b.flatten(b.gap(b.act(b.conv("input", 8), "Relu")))
    if kind == "rank3":
        seq = b.op("Reshape", [x, b.const(np.array([0, 2, 4], np.int64))], (1, 2, 4))
        return b.build(_dense(b, seq, 5))
    if kind == "bias_computed":
        mm = b.matmul(x, 8)
        return b.build(b.op("Add", [mm, x], (1, 8)))
    mm = b.matmul(x, 5)
    bias = b.vector(5)
    y = b.op("Add", [mm, bias], (1, 5))
    if kind == "read_twice":
        return b.build(b.op("Mul", [y, mm], (1, 5)))
    model = b.build(y)
    model.graph.output.extend([onnx.helper.make_tensor_value_info(
        mm, onnx.TensorProto.FLOAT, None)])   # kind == "graph_output"
    return model


@pytest.mark.parametrize("kind", ["rank3", "bias_computed", "read_twice", "graph_output"])
def test_what_is_not_one_dense_layer_keeps_its_matmul(kind):
    model = _not_dense(kind)
    normal = model_io.normalize(model)
    assert "MatMul" in [n.op_type for n in normal.graph.node]
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(normal, x), _run(model, x), rtol=1e-5, atol=1e-6)


def test_the_least_squares_repair_refits_a_matmul_add_head(tmp_path):
    """Before, a MatMul head had no bias to take the fit: only the conv was refitted, and
    the output followed the original no better than the bare cut did (relative error 2.2
    after the cut, 2.4 after the repair; 0.44 with the head refitted)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=rng.integers(0, 5, 300))
    res = gpp_onnx.prune(_head_model(), ratio=0.5, round_to=1, criterion="l1",
                         data=DataOptions(str(tmp_path / "d.npz")))
    done = res.rounds[-1]
    assert done.repair["layers_refitted"] == 3            # the conv and both dense layers
    (cut,), (repaired,) = done.fidelity["cut"].values(), done.fidelity["repaired"].values()
    assert repaired["relative_error"] < 0.5 * cut["relative_error"]


def test_a_flatten_to_a_computed_shape_feeds_a_dense_layer():
    """tf2onnx flattens to a shape it computes (the batch read by Shape, then Concat and
    Cast): shape inference gives that Reshape no shape, but its rank is the shape's length,
    so the MatMul + Add after it is a dense layer too (onnx infers that rank from opset
    14 on; tf2onnx writes opset 13)."""
    b = GraphBuilder((1, 3, 8, 8), seed=0, opset=13)
    x = b.op("Transpose", [b.act(b.conv("input", 8), "Relu")], (1, 8, 8, 8), perm=[0, 2, 3, 1])
    dims = b.op("Cast", [b.op("Shape", [x], (4,))], (4,), to=onnx.TensorProto.INT32)
    one = b.const(np.array([1], np.int64))
    zero = b.const(np.array([0], np.int64))
    n = b.op("Slice", [dims, zero, one, zero], (1,))
    shape = b.op("Concat", [n, b.const(np.array([512], np.int32))], (2,), axis=0)
    shape = b.op("Cast", [shape], (2,), to=onnx.TensorProto.INT64)
    flat = b.op("Reshape", [x, shape], (1, 512))
    model = b.build(_dense(b, b.act(_dense(b, flat, 16), "Relu"), 4))
    normal = model_io.normalize(model)
    assert [n.op_type for n in normal.graph.node].count("Gemm") == 2
    x = np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(normal, x), _run(model, x), rtol=1e-5, atol=1e-6)


def test_the_matmul_output_name_of_the_users_file_still_names_its_layer(tmp_path):
    """Netron shows a Paddle/tf2onnx dense layer by its MatMul's output, which the Gemm
    replaces: --ignore, --group-ratio and --feature-tensor still take that name."""
    from gpp_onnx.cli import main

    model = _head_model()
    hidden = next(n.output[0] for n in model.graph.node if n.op_type == "MatMul")
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((60, 3, 8, 8)).astype(np.float32),
             y=np.arange(60) % 5)
    for extra in (["--ignore", hidden], ["--group-ratio", f"{hidden}=0.25"],
                  ["--data", str(tmp_path / "d.npz"), "--feature-tensor", hidden]):
        assert main(["-q", "prune", str(src), "-o", str(tmp_path / "o.onnx"), "--ratio",
                     "0.5", "--no-latency", *extra]) == 0
    res = gpp_onnx.prune(model, ratio=0.5, round_to=1, ignore=(hidden,))
    group = res.rounds[0].plan.removed
    gemm = model_io.normalize(model).graph.node
    hidden_gemm = next(n.output[0] for n in gemm if n.op_type == "Gemm")
    assert not any(hidden_gemm in k for k in group if group[k])
