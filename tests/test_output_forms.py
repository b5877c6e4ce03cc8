"""Outputs the teacher must read right: integer outputs, a Sigmoid over classes, an output
named like the labels, time-major class outputs, fixed-batch sequence outputs."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from gpp_onnx import PruneConfig, prune
from gpp_onnx.analysis import analyze_model
from gpp_onnx.config import DataOptions, TrainOptions
from gpp_onnx.errors import DataError
from gpp_onnx.samples import GraphBuilder, digits_cnn
from gpp_onnx.teacher import (BINARY, CLASS, DISCRETE, Teacher, fidelity, output_kinds,
                              run_rows)
from test_nolabel import digits_x


def _with_argmax(model: onnx.ModelProto, keep_logits: bool = True) -> onnx.ModelProto:
    logits = model.graph.output[0].name
    model.graph.node.append(helper.make_node("ArgMax", [logits], ["cls"], axis=1, keepdims=0))
    if not keep_logits:
        del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("cls", TensorProto.INT64, ["N"]))
    onnx.checker.check_model(model, full_check=True)
    return model


def _session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_an_integer_output_is_discrete_left_out_of_training_and_compared_value_by_value(
        tmp_path):
    model = _with_argmax(digits_cnn(0))
    assert [k.kind for k in output_kinds(analyze_model(model))] == [CLASS, DISCRETE]
    src, data = tmp_path / "m.onnx", digits_x(tmp_path, 200)
    onnx.save(model, src)
    cfg = PruneConfig(ratio=0.5, round_to=1, latency=False,
                      data=DataOptions(str(data), val_split=0.25), train=TrainOptions(epochs=0.5))
    prune(src, tmp_path / "o.onnx", cfg)        # the default criterion (fisher): no crash
    fid = json.loads((tmp_path / "o.report.json").read_text())["fidelity"]
    # independent: the share of the held-out images whose ArgMax the pruned model keeps
    x = np.load(data)["x"][:, None]
    want, got = (_session(onnx.load(p)).run(["cls"], {"input": x})[0]
                 for p in (src, tmp_path / "o.onnx"))
    share = float((want == got).mean())
    row = fid["after_finetune"]["cls"]
    assert set(row) == {"agreement"} and 0 <= row["agreement"] <= 1
    assert abs(row["agreement"] - share) < 0.15    # held-out quarter against all 200


def test_a_model_whose_outputs_are_all_integers_cannot_be_distilled(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(_with_argmax(digits_cnn(0), keep_logits=False), src)
    cfg = PruneConfig(ratio=0.5, round_to=1, latency=False,
                      data=DataOptions(str(digits_x(tmp_path, 100))))
    with pytest.raises(DataError, match="holds integers"):
        prune(src, tmp_path / "o.onnx", cfg)
    assert not (tmp_path / "o.onnx").exists()


def test_a_sigmoid_over_classes_is_binary_even_as_the_first_output():
    model = digits_cnn(0)
    logits = model.graph.output[0].name
    model.graph.node.append(helper.make_node("Sigmoid", [logits], ["probs"]))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("probs", TensorProto.FLOAT,
                                                            ["N", 10]))
    (k,) = output_kinds(analyze_model(model))
    assert (k.kind, k.logits) == (BINARY, logits)


@pytest.mark.parametrize("tail", [("Softmax", "Identity"), ("Sigmoid",), ("Sigmoid", "Identity")])
def test_the_taylor_criterion_reads_the_logits_in_front_of_probabilities(tail):
    """Its cross-entropy read the probabilities of a Sigmoid, and of a Softmax behind an
    output Identity (tf2onnx's)."""
    from gpp_onnx.importance.taylor import _logits_name

    model = digits_cnn(0)
    logits = model.graph.output[0].name
    names = [logits, *[f"t{i}" for i in range(len(tail) - 1)], "probs"]
    for op, a, b in zip(tail, names, names[1:]):
        model.graph.node.append(helper.make_node(op, [a], [b], name=f"{op}_{b}"))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("probs", TensorProto.FLOAT,
                                                            ["N", 10]))
    assert _logits_name(analyze_model(model)) == logits


@pytest.mark.parametrize("op, kind, form", [("Softmax", CLASS, "probs"),
                                            ("Sigmoid", BINARY, "probs")])
def test_probabilities_behind_an_output_identity_are_distilled_on_their_logits(op, kind, form):
    """tf2onnx ends an output in an Identity: a Softmax behind it was read as logits (the
    KL of softmax(probabilities): a label-free fine-tune left relative error 0.21 where the
    same net without the Identity reached 0.08)."""
    model = digits_cnn(0)
    logits = model.graph.output[0].name
    model.graph.node.append(helper.make_node(op, [logits], ["p"], name="probs_op"))
    model.graph.node.append(helper.make_node("Identity", ["p"], ["probs"], name="out_id"))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("probs", TensorProto.FLOAT,
                                                            ["N", 10]))
    (k,) = output_kinds(analyze_model(model))
    assert (k.kind, k.logits, k.form) == (kind, logits, form)


def test_an_output_named_y_is_distilled_next_to_the_labels(tmp_path):
    """The labels travel as "y" in a batch's targets; an output of that name used to
    overwrite them (an internal error in the KL)."""
    model = digits_cnn(0)
    old = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = ["y" if o == old else o for o in node.output]
    model.graph.output[0].name = "y"
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    cfg = PruneConfig(ratio=0.5, round_to=1, latency=False,
                      data=DataOptions(str(digits_x(tmp_path, 200, labels=True))),
                      train=TrainOptions(epochs=0.5, distill=1.0))
    result = prune(src, tmp_path / "o.onnx", cfg)
    assert result.report["rounds"][0]["accuracy_after_finetune"] is not None


def time_major(batch: int | None = None) -> onnx.ModelProto:
    """A recognizer whose (T=8, N, 5) output is a Softmax over its classes (axis 2)."""
    b = GraphBuilder((batch or 1, 1, 8, 8), seed=0, dynamic_batch=batch is None)
    x = b.act(b.conv("input", 8), "Relu")
    x = b.op("ReduceMean", [x], (batch or 1, 8, 1, 8), axes=[2], keepdims=1)
    x = b.op("Reshape", [x, b.const(np.array([0, 8, 8], dtype=np.int64))], (batch or 1, 8, 8))
    x = b.op("Transpose", [x], (batch or 1, 8, 8), perm=[0, 2, 1])     # (N, T, F)
    x = b.op("Transpose", [b.matmul(x, 5)], (8, batch or 1, 5), perm=[1, 0, 2])
    b.opset = 17
    out = b.op("Softmax", [x], (8, batch or 1, 5), axis=-1)
    model = b.build(out)
    dims = model.graph.output[0].type.tensor_type.shape.dim
    dims[0].Clear()
    dims[0].dim_value = 8
    dims[1].Clear()
    if batch is None:
        dims[1].dim_param = "N"
    else:
        dims[1].dim_value = batch
    onnx.checker.check_model(model, full_check=True)
    return model


def _perturbed(model: onnx.ModelProto, scale: float) -> onnx.ModelProto:
    out, rng = onnx.ModelProto(), np.random.default_rng(5)
    out.CopyFrom(model)
    for t in out.graph.initializer:
        a = onnx.numpy_helper.to_array(t)
        if a.dtype == np.float32 and a.ndim >= 2:
            noise = rng.standard_normal(a.shape).astype(np.float32) * scale * a.std()
            t.CopyFrom(onnx.numpy_helper.from_array(a + noise, t.name))
    return out


def test_agreement_of_a_time_major_output_is_the_share_of_positions():
    model = time_major()
    (k,) = output_kinds(analyze_model(model))
    assert (k.kind, k.axis) == (CLASS, 2)
    other = _perturbed(model, 0.5)
    x = np.random.default_rng(0).standard_normal((12, 1, 8, 8)).astype(np.float32) * 3
    want, got = (_session(m).run(None, {"input": x})[0] for m in (model, other))
    share = float((want.argmax(2) == got.argmax(2)).mean())
    assert 0 < share < 1
    row = fidelity(Teacher(model, (k,)), other, [x[:5], x[5:]])[k.name]
    assert row["top1_agreement"] == pytest.approx(share)
    err = np.sqrt(((got - want) ** 2).sum() / (want ** 2).sum())
    assert row["relative_error"] == pytest.approx(err, rel=1e-5)


def test_a_fixed_batch_runs_in_chunks_joined_along_each_outputs_batch_axis():
    model = time_major(batch=1)
    session = _session(model)
    x = np.random.default_rng(1).random((3, 1, 8, 8)).astype(np.float32)
    (got,) = run_rows(session, x, "model")
    one_by_one = np.concatenate([session.run(None, {"input": x[i:i + 1]})[0]
                                 for i in range(3)], axis=1)
    assert got.shape == (8, 3, 5)
    np.testing.assert_array_equal(got, one_by_one)



def test_a_conv_classifiers_class_map_is_read_as_its_class_scores(tmp_path, capsys):
    """A conv classifier ending in (N, classes, 1, 1) (SqueezeNet, the model zoo's caffe2
    classics) was refused with labels: its map is now read as the (N, classes) scores.
    Reference: the labels are the original's own top class in onnxruntime, so accuracy
    is 1, and 0 with every label moved to the next class."""
    from gpp_onnx.cli import main

    b = GraphBuilder((1, 1, 8, 8), seed=0)
    model = b.build(b.gap(b.conv(b.act(b.conv(b.act(b.conv("input", 8), "Relu"), 8),
                                       "Relu"), 3, k=1)))
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    x = np.random.default_rng(1).random((48, 1, 8, 8), dtype=np.float32) - 0.5
    scores = np.concatenate([_session(model).run(None, {"input": x[i:i + 1]})[0]
                             for i in range(len(x))])
    assert scores.shape == (48, 3, 1, 1)
    top = scores.reshape(48, 3).argmax(1)   # two classes of the three here
    for labels, expected in ((top, 1.0), ((top + 1) % 3, 0.0)):
        np.savez(tmp_path / "d.npz", x=x, y=labels)
        assert main(["evaluate", str(src), "--data", str(tmp_path / "d.npz")]) == 0
        assert f"top-1 accuracy {expected:.4f}" in capsys.readouterr().out
    out = tmp_path / "p.onnx"
    assert main(["prune", str(src), "--data", str(tmp_path / "d.npz"), "--ratio", "0.5",
                 "--round-to", "1", "--criterion", "taylor", "--finetune-epochs", "1",
                 "--no-latency", "-o", str(out)]) == 0
    assert _session(onnx.load(out)).run(None, {"input": x[:1]})[0].shape == (1, 3, 1, 1)
