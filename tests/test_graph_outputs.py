"""Graph outputs that expose a prunable group in another form than the feature map itself
(its shape, a weight of its conv): the group keeps its channels, the outputs stay as the
file declares them."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gpp_onnx import prune
from gpp_onnx.analysis import analyze_model
from gpp_onnx.cli import main


def two_convs(extra_nodes=(), extra_outputs=()) -> onnx.ModelProto:
    """x (N,1,8,8) -> Conv 16 -> Relu (r1) -> Conv 16 -> Relu -> GAP -> Gemm 4."""
    rng = np.random.default_rng(0)

    def w(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    inits = [w("w1", 16, 1, 3, 3), w("b1", 16), w("w2", 16, 16, 3, 3), w("b2", 16),
             w("wf", 4, 16), w("bf", 4)]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1] * 4),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], transB=1),
             *extra_nodes]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4]), *extra_outputs],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _reasons(model):
    return {g.key: g.reason for g in analyze_model(model).groups}


def test_a_returned_shape_of_a_feature_map_keeps_its_channels():
    """Shape(r1) as a graph output reads r1's channel count: the cut changed the returned
    [N, 16, 8, 8] to [N, 8, 8, 8] and ended in 'please report this model'."""
    model = two_convs([helper.make_node("Shape", ["r1"], ["shp"])],
                      [helper.make_tensor_value_info("shp", TensorProto.INT64, [4])])
    assert "Shape" in _reasons(model)["c1"]
    res = prune(model, ratio=0.5, round_to=1, latency=False)
    assert [o.name for o in res.model.graph.output] == ["logits", "shp"]
    assert "c1" not in res.plan.removed and res.plan.removed["c2"]


def test_a_returned_weight_keeps_its_group(tmp_path):
    """A conv weight that is also a graph output: its group keeps its channels (the cut
    failed the checker on the output's declared shape, exit 2 without a reason)."""
    model = two_convs(extra_outputs=[helper.make_tensor_value_info(
        "w1", TensorProto.FLOAT, [16, 1, 3, 3])])
    assert "model output" in _reasons(model)["c1"]
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    assert main(["prune", str(src), "--ratio", "0.5", "--round-to", "1", "--no-latency",
                 "-o", str(tmp_path / "o.onnx")]) == 0
    out = onnx.load(tmp_path / "o.onnx")
    assert [o.name for o in out.graph.output] == ["logits", "w1"]
    w1 = next(t for t in out.graph.initializer if t.name == "w1")
    assert list(w1.dims) == [16, 1, 3, 3]


def test_an_output_declared_with_a_wrong_width_is_refused_before_the_work(tmp_path, capsys):
    """An output declared (N, 10) where the Gemm gives (N, 4): one line naming the
    declared shapes, exit 2, before any cut (it was refused after the cut, scoring and
    repair, as 'pruned model fails the ONNX checker')."""
    model = two_convs()
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 10
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    assert main(["prune", str(src), "--ratio", "0.5", "--no-latency",
                 "-o", str(tmp_path / "o.onnx")]) == 2
    err = capsys.readouterr().err
    assert "declared shapes" in err and "pruned model" not in err
    assert "round 1" not in err and not (tmp_path / "o.onnx").exists()


def test_an_input_with_a_default_stays_an_input_and_listed_weights_do_not(tmp_path):
    """An input the file also gives an initializer (a default a caller may override:
    logits / temperature) is still an input of the pruned model, and feeding it still
    scales the logits (it was dropped: 'invalid input name'). Weights an old exporter
    listed as inputs are not declared again (onnxruntime would not fold them)."""
    import onnxruntime as ort

    model = two_convs()
    model.graph.node[-1].output[0] = "z"
    model.graph.node.append(helper.make_node("Div", ["z", "temperature"], ["logits"]))
    model.graph.initializer.append(numpy_helper.from_array(np.array([1.0], np.float32),
                                                           "temperature"))
    model.graph.input.extend([helper.make_tensor_value_info("temperature", TensorProto.FLOAT,
                                                            [1]),
                              helper.make_tensor_value_info("w1", TensorProto.FLOAT,
                                                            [16, 1, 3, 3])])
    src, out = tmp_path / "m.onnx", tmp_path / "p.onnx"
    onnx.save(model, src)
    prune(src, out, ratio=0.5, round_to=1, latency=False)
    assert [v.name for v in onnx.load(out).graph.input] == ["x", "temperature"]
    x = np.random.default_rng(1).standard_normal((2, 1, 8, 8)).astype(np.float32)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    plain = session.run(None, {"x": x})[0]
    hot = session.run(None, {"x": x, "temperature": np.array([2.0], np.float32)})[0]
    np.testing.assert_allclose(hot, plain / 2, rtol=1e-6)


def test_feature_map_first_and_logits_second_with_labels_says_to_put_the_scores_first(
        tmp_path, capsys):
    """With labels, a model returning (feature map, logits) is refused naming the logits
    output and the fix (it said 'pass a classification model')."""
    model = two_convs(extra_outputs=[helper.make_tensor_value_info("r1", TensorProto.FLOAT,
                                                                   ["N", 16, 8, 8])])
    logits, feat = list(model.graph.output)
    del model.graph.output[:]
    model.graph.output.extend([feat, logits])
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    x = np.random.default_rng(0).random((40, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(40) % 4)
    assert main(["-q", "prune", str(src), "--data", str(tmp_path / "d.npz"), "--ratio", "0.5",
                 "--no-latency", "-o", str(tmp_path / "o.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'logits'" in err[0] and "class scores first" in err[0]
