"""Loading real-world model forms: external data, Constant-node weights, shared
initializers (also behind Identity), old opsets, symbolic dims, no shape information."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from conftest import assert_pruned_equals_masked, feeds_for, run_model
from gpp_onnx import PruneConfig, prune
from gpp_onnx import model as model_io
from gpp_onnx.analysis import analyze_model
from gpp_onnx.samples import GraphBuilder, sample_cnn


def _weights_as_constant_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Paddle-style: every initializer becomes a Constant node."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    consts = [helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t)
              for t in out.graph.initializer]
    del out.graph.initializer[:]
    nodes = consts + list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def test_external_data(tmp_path):
    model = sample_cnn()
    src = tmp_path / "ext.onnx"
    onnx.save(model, src, save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data", size_threshold=0)
    assert (tmp_path / "ext.onnx.data").exists() and src.stat().st_size < 20_000
    result = prune(src, tmp_path / "p.onnx", PruneConfig(ratio=0.5, round_to=1, latency=False))
    assert result.after.params < result.before.params
    # the model's size counts the file its weights live in
    sizes = result.report["before"]["file_bytes"], result.report["after"]["file_bytes"]
    assert sizes == (src.stat().st_size + (tmp_path / "ext.onnx.data").stat().st_size,
                     (tmp_path / "p.onnx").stat().st_size)
    feeds = feeds_for(model)
    assert run_model(tmp_path / "p.onnx", feeds)[0].shape == (2, 10)


def test_weights_in_constant_nodes(tmp_path):
    model = _weights_as_constant_nodes(sample_cnn())
    assert not model.graph.initializer
    assert_pruned_equals_masked(model, tmp_path, ratio=0.5)


def test_shared_initializers_and_identity(tmp_path):
    """Two convs read one weight (one directly, one behind Identity); cut both, differently."""
    b = GraphBuilder((1, 3, 8, 8), seed=0)
    x = b.act(b.conv("input", 8), "Relu")
    w = b.weight(8, 8, 3, 3)
    alias = b.op("Identity", [w], (8, 8, 3, 3))
    y1 = b.op("Conv", [x, w], (1, 8, 8, 8), kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    y2 = b.op("Conv", [b.act(y1, "Relu"), alias], (1, 8, 8, 8), kernel_shape=[3, 3],
              pads=[1, 1, 1, 1])
    model = b.build(b.gemm(b.flatten(b.gap(b.act(y2, "Relu"))), 3))
    assert_pruned_equals_masked(model, tmp_path, ratio=0.5)


def test_a_conv_weight_two_convs_read_by_name(tmp_path):
    """A weight-tied block, a -> conv(W) -> Relu -> conv(W) -> + a: both convs read one
    initializer by name (no Identity to fold apart); each cut gets its own copy."""
    b = GraphBuilder((1, 3, 8, 8), seed=0)
    a = b.act(b.conv("input", 8), "Relu")
    w = b.weight(8, 8, 3, 3)
    y1 = b.op("Conv", [a, w], (1, 8, 8, 8), kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    y2 = b.op("Conv", [b.act(y1, "Relu"), w], (1, 8, 8, 8), kernel_shape=[3, 3],
              pads=[1, 1, 1, 1])
    model = b.build(b.gemm(b.flatten(b.gap(b.act(b.binary("Add", a, y2), "Relu"))), 3))
    assert sum(w in n.input for n in model.graph.node) == 2
    result = assert_pruned_equals_masked(model, tmp_path, ratio=0.5)
    assert result.plan.removed_channels > 0


def test_a_conv_whose_bias_the_graph_computes_keeps_its_channels(tmp_path):
    """conv1's bias is GAP -> 1x1 conv -> Reshape of the input: its outputs cannot be cut
    (the bias is no constant to slice); conv2's can. (A bias row per image: batch 1.)"""
    b = GraphBuilder((1, 3, 8, 8), seed=0, dynamic_batch=False)
    gate = b.op("Conv", [b.gap("input"), b.weight(8, 3, 1, 1)], (1, 8, 1, 1),
                kernel_shape=[1, 1])
    bias = b.op("Reshape", [gate, b.const(np.array([8], dtype=np.int64))], (8,))
    a = b.op("Conv", ["input", b.weight(8, 3, 3, 3), bias], (1, 8, 8, 8),
             kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    y = b.act(b.conv(b.act(a, "Relu"), 8), "Relu")
    model = b.build(b.gemm(b.flatten(b.gap(y)), 3))
    result = assert_pruned_equals_masked(model, tmp_path, ratio=0.5)
    assert result.plan.removed_channels == 4
    pruned = onnx.load(str(tmp_path / "pruned.onnx"))
    conv = next(n for n in pruned.graph.node if n.op_type == "Conv" and bias in n.input)
    inits = {t.name: t.dims for t in pruned.graph.initializer}
    assert list(inits[conv.input[1]]) == [8, 3, 3, 3]


def test_duplicate_node_names_print_nothing_but_the_table(tmp_path, capsys):
    from gpp_onnx.cli import main

    model = sample_cnn()
    for node in model.graph.node:
        node.name = "same"
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    assert main(["analyze", str(src)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{len(analyze_model(model_io.normalize(model)).groups)} channel groups")


def test_opset_11_model(tmp_path):
    b = GraphBuilder((1, 3, 8, 8), seed=0, opset=11)
    x = b.act(b.bn(b.conv("input", 8)), "Relu")
    left, right = b.split(x, [4, 4])
    x = b.shuffle(b.concat([left, b.act(b.conv(right, 4), "Clip")]), 2)
    x = b.binary("Add", x, b.conv(b.slice(x, 0, 8), 8, k=1))
    model = b.build(b.gemm(b.flatten(b.reduce_mean(x)), 3))
    assert model.opset_import[0].version == 11
    assert_pruned_equals_masked(model, tmp_path, ratio=0.5)


def test_symbolic_spatial_dims_and_no_shape_info(tmp_path):
    b = GraphBuilder((1, 3, 8, 8), seed=0)
    x = b.act(b.conv(b.act(b.conv("input", 8), "Relu"), 8), "Relu")
    model = b.build(b.gemm(b.flatten(b.gap(x)), 3))
    for i, dim in enumerate(model.graph.input[0].type.tensor_type.shape.dim):
        if i >= 2:
            dim.dim_param = f"s{i}"
    del model.graph.value_info[:]
    for i, dim in enumerate(model.graph.output[0].type.tensor_type.shape.dim):
        dim.dim_param = f"o{i}"
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    prune(src, tmp_path / "p.onnx", PruneConfig(ratio=0.5, latency=False, input_shape=(1, 3, 12, 12)))
    x = np.random.default_rng(0).standard_normal((2, 3, 20, 12)).astype(np.float32)
    assert run_model(tmp_path / "p.onnx", {"input": x})[0].shape == (2, 3)


def test_output_keeps_names_dtypes_and_metadata(tmp_path):
    model = sample_cnn()
    helper.set_model_props(model, {"author": "someone", "task": "demo"})
    model.doc_string = "my model"
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    prune(src, tmp_path / "p.onnx", PruneConfig(ratio=0.5, round_to=1, latency=False))
    out = onnx.load(str(tmp_path / "p.onnx"))
    assert [i.name for i in out.graph.input] == ["input"]
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    assert out.graph.input[0].type == model.graph.input[0].type
    assert {p.key: p.value for p in out.metadata_props} == {"author": "someone", "task": "demo"}
    assert out.doc_string == "my model" and out.opset_import == model.opset_import


def test_dynamic_batch_survives(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(sample_cnn(), src)
    prune(src, tmp_path / "p.onnx", PruneConfig(ratio=0.5, round_to=1, latency=False))
    for batch in (1, 5):
        x = np.zeros((batch, 3, 32, 32), np.float32)
        assert run_model(tmp_path / "p.onnx", {"input": x})[0].shape == (batch, 10)


def test_shared_initializer_used_by_unpruned_consumer_is_not_shrunk(tmp_path):
    """A bias shared by a pruned conv and the (blocked) classifier must stay whole for the
    classifier."""
    b = GraphBuilder((1, 3, 4, 4), seed=0)
    bias = b.const(np.linspace(-1, 1, 4).astype(np.float32))
    h = b.op("Conv", ["input", b.weight(4, 3, 1, 1), bias], (1, 4, 4, 4), kernel_shape=[1, 1])
    h = b.flatten(b.gap(b.act(h, "Relu")))
    out = b.op("Gemm", [h, b.weight(4, 4), bias], (1, 4), transB=1)
    model = b.build(out)
    result = assert_pruned_equals_masked(model, tmp_path, ratio=0.5)
    pruned = onnx.load(str(tmp_path / "pruned.onnx"))
    gemm = next(n for n in pruned.graph.node if n.op_type == "Gemm")
    inits = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    assert inits[gemm.input[2]].shape == (4,)
    assert result.plan.removed_channels == 2


def test_dedupe_shares_byte_identical_initializers_and_keeps_the_rest():
    """Two equal weights become one (the second's readers renamed to the first), a weight of
    the same shape but other values and a graph output keep their own tensors, and the
    model computes what it did."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 4)).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in
             [(w, "a"), (w + 1, "b"), (w.copy(), "c"), (w.copy(), "out_w")]]
    nodes = [helper.make_node("MatMul", ["x", n], [f"y{n}"]) for n in "abc"]
    nodes += [helper.make_node("Sum", ["ya", "yb", "yc"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [2, 4])],
                              [helper.make_tensor_value_info("y", 1, [2, 4]),
                               helper.make_tensor_value_info("out_w", 1, [4, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": rng.standard_normal((2, 4)).astype(np.float32)}
    before = run_model(model, feeds)
    from gpp_onnx.model import dedupe_initializers
    assert dedupe_initializers(model) == 1
    assert [t.name for t in model.graph.initializer] == ["a", "b", "out_w"]
    assert [n.input[1] for n in model.graph.node[:3]] == ["a", "b", "a"]
    onnx.checker.check_model(model)
    for got, want in zip(run_model(model, feeds), before):
        np.testing.assert_array_equal(got, want)


def test_incomplete_shape_inference_leaves_no_file_in_the_current_folder(tmp_path,
                                                                        monkeypatch):
    """onnxruntime's symbolic shape inference saves an incomplete result as
    sym_shape_infer_temp.onnx into the current folder (the user's) before it raises; a
    model with an op it does not know, and a Shape to infer, left it there."""
    nodes = [helper.make_node("Foo", ["x"], ["y"], domain="custom"),
             helper.make_node("Shape", ["y"], ["s"]),
             helper.make_node("Relu", ["y"], ["z"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, None),
         helper.make_tensor_value_info("s", onnx.TensorProto.INT64, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("custom", 1)])
    monkeypatch.chdir(tmp_path)
    assert len(model_io.normalize(model).graph.node) == 3
    assert list(tmp_path.iterdir()) == []
