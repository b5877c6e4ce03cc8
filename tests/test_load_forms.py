"""Models onnxruntime runs that gpp-onnx once refused: opset < 11 (upgraded), nodes out
of topological order, float16 and mixed float16/float32 weights, several inputs; and the
equivalence tolerance derived from the model's own noise.

References are independent of the code under test: the input model itself, run by
onnxruntime with the removed channels' consumer weights zeroed by hand in numpy."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import assert_pruned_equals_masked, n_params, prune_both, rel_err, run_model
import gpp_onnx
from gpp_onnx import PruneConfig, prune
from gpp_onnx.config import DataOptions, TrainOptions
from gpp_onnx.cli import main
from gpp_onnx.errors import InputError
from gpp_onnx.samples import GraphBuilder, sample_cnn
from gpp_onnx.verify import Tolerance, VerificationError, check_equivalent, measure_tolerance
from gpp_onnx.widened import check_in_float32, upcast


def _hand_masked(model: onnx.ModelProto, zero: dict[str, np.ndarray]) -> onnx.ModelProto:
    """`model` with columns (axis 1) of the named weights set to 0, nothing else touched."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name in zero:
            w = numpy_helper.to_array(t).copy()
            w[:, zero[t.name]] = 0
            t.CopyFrom(numpy_helper.from_array(w, t.name))
    return out


def _x(shape, dtype=np.float32, seed=3):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# -- opset 9, tf2onnx style -------------------------------------------------------------
def _opset9_model() -> onnx.ModelProto:
    """Conv-BN-Relu-Pad(attr)-MaxPool-Upsample-Conv-BN-Clip(attrs)-Slice(attrs)-Dropout-
    GAP-Reshape-Gemm-Softmax at opset 9, weights listed as graph inputs (IR 4)."""
    rng = np.random.default_rng(0)
    inits = []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def bn(x, c, name):
        params = [const(f"{name}_{p}", rng.uniform(lo, hi, c).astype(np.float32))
                  for p, lo, hi in (("g", .5, 1.5), ("b", -.1, .1), ("m", -.1, .1), ("v", .5, 1.5))]
        return helper.make_node("BatchNormalization", [x, *params], [name], name=name,
                                epsilon=1e-5)

    nodes = [
        helper.make_node("Conv", ["x", const("w1", _x((8, 3, 3, 3), seed=1) * .3),
                                  const("b1", np.zeros(8, np.float32))], ["c1"], name="conv1",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        bn("c1", 8, "bn1"), helper.make_node("Relu", ["bn1"], ["r1"]),
        helper.make_node("Pad", ["r1"], ["p1"], pads=[0, 0, 1, 1, 0, 0, 1, 1], value=0.0),
        helper.make_node("MaxPool", ["p1"], ["m1"], kernel_shape=[3, 3], strides=[2, 2]),
        helper.make_node("Upsample", ["m1", const("scales", np.array([1, 1, 2, 2], np.float32))],
                         ["u1"], mode="linear"),
        helper.make_node("Conv", ["u1", const("w2", _x((12, 8, 3, 3), seed=2) * .2)], ["c2"],
                         name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        bn("c2", 12, "bn2"), helper.make_node("Clip", ["bn2"], ["r2"], min=0.0, max=6.0),
        helper.make_node("Slice", ["r2"], ["s2"], axes=[2, 3], starts=[0, 0], ends=[6, 6]),
        helper.make_node("Dropout", ["s2"], ["d2"], ratio=0.1),
        helper.make_node("GlobalAveragePool", ["d2"], ["g2"]),
        helper.make_node("Reshape", ["g2", const("shape", np.array([-1, 12], np.int64))], ["f2"]),
        helper.make_node("Gemm", ["f2", const("w3", _x((5, 12), seed=4) * .3),
                                  const("b3", np.zeros(5, np.float32))], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["prob"], axis=1)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])]
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in inits]
    graph = helper.make_graph(nodes, "tf2onnx_like", inputs,
                              [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 5])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)],
                              producer_name="tf2onnx")
    model.ir_version = 4
    onnx.checker.check_model(model)
    return model


def test_opset9_model_is_upgraded_pruned_and_reported(tmp_path):
    model = _opset9_model()
    src = tmp_path / "old.onnx"
    onnx.save(model, src)
    result = prune(src, tmp_path / "p.onnx", PruneConfig(ratio=0.5, round_to=1, latency=False))
    out = onnx.load(str(tmp_path / "p.onnx"))
    opset = next(i.version for i in out.opset_import if i.domain in ("", "ai.onnx"))
    assert opset >= 11
    report = json.loads((tmp_path / "p.report.json").read_text())
    assert report["loading"]["opset_read"] == 9 and report["loading"]["opset"] == opset
    assert f"upgraded from opset 9 to {opset}" in report["loading"]["notes"]
    removed = result.plan.removed
    assert len(removed["c1"]) == 4 and len(removed["c2"]) == 6
    # reference: the opset-9 file itself in onnxruntime, consumers of removed channels zeroed
    masked = _hand_masked(model, {"w2": removed["c1"], "w3": removed["c2"]})
    x = _x((2, 3, 8, 8))
    assert rel_err(run_model(out, {"x": x}), run_model(masked, {"x": x})) < 1e-5
    assert rel_err(run_model(model, {"x": x}), run_model(masked, {"x": x})) > 1e-3


def _image_scaler_model(op="ImageScaler", **attrs) -> onnx.ModelProto:
    """Opset 8, the model zoo's preprocessing op first (tiny-yolov2, emotion-ferplus)."""
    inits = [numpy_helper.from_array(_x(shape, seed=i), name) for i, (name, shape) in
             enumerate([("w1", (4, 3, 3, 3)), ("w2", (4, 4, 3, 3)), ("fc", (2, 4)), ("fb", (2,))])]
    nodes = [helper.make_node(op, ["x"], ["s"], **attrs),
             helper.make_node("Conv", ["s", "w1"], ["c1"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("GlobalAveragePool", ["c2"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "fc", "fb"], ["y"], transB=1)]
    graph = helper.make_graph(
        nodes, "scaler8", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)])
    model.ir_version = 4
    return model


@pytest.mark.parametrize("attrs", [{"scale": 0.5, "bias": [-1.0, 0.5, 2.0]}, {"bias": [.1, .2, .3]}])
def test_an_image_scaler_is_upgraded_as_mul_and_add(tmp_path, attrs):
    """onnx's converter knows no ImageScaler schema: the upgrade was refused with
    "Op '%s' has no registered schema", naming no op."""
    model = _image_scaler_model(**attrs)
    src = tmp_path / "old.onnx"
    onnx.save(model, src)
    result = prune(src, tmp_path / "p.onnx", PruneConfig(ratio=0.5, round_to=1, latency=False))
    x = _x((2, 3, 8, 8))
    masked = _hand_masked(model, {"w2": result.plan.removed["c1"],
                                  "fc": result.plan.removed["c2"]})
    assert rel_err(run_model(tmp_path / "p.onnx", {"x": x}), run_model(masked, {"x": x})) < 1e-5


def test_an_opset8_batchnorm_per_activation_after_a_dense_layer_is_upgraded(tmp_path):
    """CNTK writes BatchNormalization spatial=0 after a dense layer: on an (N, C) input
    that is per channel, but the converter upgrades spatial=1 only, and the model was
    refused ("Attribute spatial must have value 1 - export at opset 11")."""
    inits = [numpy_helper.from_array(_x(shape, seed=i), name) for i, (name, shape) in
             enumerate([("w1", (4, 3, 3, 3)), ("fc", (6, 4)), ("fb", (6,)), ("bs", (6,)),
                        ("bb", (6,)), ("bm", (6,)), ("oc", (2, 6)), ("ob", (2,))])]
    inits.append(numpy_helper.from_array(np.abs(_x((6,), seed=9)) + 0.5, "bv"))
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("GlobalAveragePool", ["r1"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "fc", "fb"], ["h"], transB=1),
             helper.make_node("BatchNormalization", ["h", "bs", "bb", "bm", "bv"], ["n"],
                              spatial=0),
             helper.make_node("Relu", ["n"], ["r2"]),
             helper.make_node("Gemm", ["r2", "oc", "ob"], ["y"], transB=1)]
    graph = helper.make_graph(
        nodes, "cntk8", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)])
    model.ir_version = 4
    src = tmp_path / "old.onnx"
    onnx.save(model, src)
    result = prune(src, tmp_path / "p.onnx", PruneConfig(ratio=0.5, round_to=1, latency=False))
    removed = result.plan.removed
    assert len(removed["c1"]) == 2 and len(removed["h"]) == 3
    masked = _hand_masked(model, {"fc": removed["c1"], "oc": removed["h"]})
    x = _x((2, 3, 8, 8))
    assert rel_err(run_model(tmp_path / "p.onnx", {"x": x}), run_model(masked, {"x": x})) < 1e-5


def test_an_experimental_op_without_schema_is_named():
    model = _image_scaler_model("Scale", scale=0.5)
    with pytest.raises(InputError, match="experimental op Scale") as err:
        gpp_onnx.model.accept(model)
    assert "\n" not in str(err.value)


def test_an_opset6_file_onnxruntime_cannot_run_is_refused_with_the_fix(tmp_path):
    """CaffeNet's Gemm-6 (broadcast=1): onnxruntime has no kernel for it, so the upgrade
    cannot be checked; the refusal was a VerificationError line naming no fix."""
    model = _image_scaler_model("Identity")
    model.opset_import[0].version = 6
    gemm = model.graph.node[-1]
    gemm.attribute.append(helper.make_attribute("broadcast", 1))
    for value in (model.graph.input[0], model.graph.output[0]):  # the converter's Gemm-6
        value.type.tensor_type.shape.dim[0].dim_value = 1        # adapter wants fixed sizes
    src = tmp_path / "old.onnx"
    onnx.save(model, src)
    with pytest.raises(InputError, match="at opset 6.*export the model at opset 11"):
        prune(src, tmp_path / "p.onnx", PruneConfig(ratio=0.5, round_to=1, latency=False))
    assert not (tmp_path / "p.onnx").exists()


def test_an_upgraded_upsample_adds_no_params(tmp_path):
    """The converter's Resize roi (a float constant no computation reads) is neither
    counted as a parameter nor written: the report counted 8 floats more than this
    opset-9 file holds, and the written model carried them."""
    inits = [numpy_helper.from_array(_x(shape, seed=i), name) for i, (name, shape) in
             enumerate([("w1", (4, 3, 3, 3)), ("w2", (4, 4, 3, 3)), ("fc", (2, 4))])]
    inits += [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
              numpy_helper.from_array(np.zeros(2, np.float32), "fb")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Upsample", ["c1", "scales"], ["u"], mode="nearest"),
             helper.make_node("Conv", ["u", "w2"], ["c2"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("GlobalAveragePool", ["c2"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "fc", "fb"], ["y"], transB=1)]
    graph = helper.make_graph(
        nodes, "upsample9", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 4
    src = tmp_path / "old.onnx"
    onnx.save(model, src)
    result = prune(src, tmp_path / "p.onnx", PruneConfig(ratio=0.5, round_to=1, latency=False))
    assert result.before.params == n_params(src) == 4 * 27 + 4 * 36 + 8 + 4 + 2
    assert result.after.params == n_params(tmp_path / "p.onnx") == 2 * 27 + 2 * 18 + 4 + 4 + 2
    x = _x((2, 3, 8, 8))
    assert rel_err(run_model(tmp_path / "p.onnx", {"x": x}),
                   run_model(_hand_masked(model, {"w2": result.plan.removed["c1"],
                                                  "fc": result.plan.removed["c2"]}),
                             {"x": x})) < 1e-5


def test_a_converter_change_of_outputs_is_refused(tmp_path, capsys, monkeypatch):
    """Without the Upsample fix, onnx's converter changes bilinear Upsample's coordinates;
    the check against the model as read refuses the result."""
    import gpp_onnx.compat as compat
    monkeypatch.setattr(compat, "_keep_old_resize_semantics", lambda model: None)
    src, out = tmp_path / "old.onnx", tmp_path / "p.onnx"
    onnx.save(_opset9_model(), src)
    assert main(["prune", str(src), "-o", str(out), "--no-latency"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "changed the model's outputs" in err and "opset 11 or newer" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.onnx"]


# -- float16, unsorted ------------------------------------------------------------------
def _chain(seed=0) -> onnx.ModelProto:
    b = GraphBuilder((1, 3, 8, 8), seed=seed)
    x = b.act(b.conv("input", 8), "Relu")
    x = b.act(b.conv(x, 8), "Relu")
    return b.build(b.gemm(b.flatten(b.gap(x)), 5))


def _to_float16(model: onnx.ModelProto, fp32_head: bool) -> onnx.ModelProto:
    """What fp16 converters write: float16 weights, Casts at the graph's edges appended
    at the END of the node list. `fp32_head`: the classifier Gemm stays float32 behind
    its own Cast (a mixed model)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    gemm = [n for n in g.node if n.op_type == "Gemm"][-1]
    keep = set(gemm.input) if fp32_head else set()
    for t in g.initializer:
        if t.data_type == TensorProto.FLOAT and t.name not in keep:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16),
                                               t.name))
    for node in g.node:
        node.input[:] = ["input.fp16" if i == "input" else i for i in node.input]
    g.node.append(helper.make_node("Cast", ["input"], ["input.fp16"], to=TensorProto.FLOAT16))
    if fp32_head:
        feature = gemm.input[0]
        gemm.input[0] = feature + ".fp32"
        g.node.append(helper.make_node("Cast", [feature], [feature + ".fp32"],
                                       to=TensorProto.FLOAT))
    else:
        logits = gemm.output[0]
        gemm.output[0] = logits + ".fp16"
        g.node.append(helper.make_node("Cast", [logits + ".fp16"], [logits],
                                       to=TensorProto.FLOAT))
    del g.value_info[:]
    return out


@pytest.mark.parametrize("fp32_head", [False, True], ids=["float16", "mixed"])
def test_unsorted_float16_model_prunes_with_l1_and_keeps_float16(fp32_head, tmp_path):
    model = _to_float16(_chain(), fp32_head)
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(model)
    src = tmp_path / "fp16.onnx"
    onnx.save(model, src)
    result = prune(src, tmp_path / "p.onnx", PruneConfig(ratio=0.5, criterion="l1", round_to=1,
                                                        latency=False))
    assert result.report["loading"]["nodes_sorted"]
    out = onnx.load(str(tmp_path / "p.onnx"))
    weights = {t.name: t for t in out.graph.initializer if t.name in {
        i for n in out.graph.node if n.op_type in ("Conv", "Gemm") for i in n.input[1:]}}
    expected = {name: TensorProto.FLOAT if fp32_head and name in
                next(n for n in out.graph.node if n.op_type == "Gemm").input
                else TensorProto.FLOAT16 for name in weights}
    assert {n: t.data_type for n, t in weights.items()} == expected
    assert out.graph.input[0].type == model.graph.input[0].type
    conv_w = [t for t in model.graph.initializer if len(t.dims) == 4]
    gemm_w = next(t for t in model.graph.initializer if len(t.dims) == 2)
    removed = result.plan.removed
    assert len(removed["conv1"]) == 4 and len(removed["conv3"]) == 4
    masked = _hand_masked(model, {conv_w[1].name: removed["conv1"],
                                  gemm_w.name: removed["conv3"]})
    x = {"input": _x((3, 3, 8, 8))}
    tol = result.tolerance.value
    assert 1e-5 < tol < 1e-2 and result.report["equivalence_tolerance"] == tol
    assert rel_err(run_model(out, x), run_model(masked, x)) < tol
    assert rel_err(run_model(model, x), run_model(masked, x)) > 10 * tol
    assert result.report["rounds"][0]["equivalence_relative_error_float32"] < 1e-5


def test_every_family_in_float16_keeps_its_dtype_and_matches_mask_only(tmp_path):
    """sample_cnn (BN, residual, concat, depthwise, SE, shuffle, Gemm) in float16: pruned
    vs the --mask-only replay of its plan, within the reported tolerance."""
    model = _to_float16(sample_cnn(), fp32_head=False)
    src, pruned, masked, result = prune_both(model, tmp_path, ratio=0.5)
    x = {"input": _x((2, 3, 32, 32))}
    assert result.plan.removed_channels > 100
    assert rel_err(run_model(pruned, x), run_model(masked, x)) < result.tolerance.value
    out = onnx.load(str(pruned))
    floats = {t.data_type for t in out.graph.initializer if t.data_type in (
        TensorProto.FLOAT, TensorProto.FLOAT16)}
    assert floats == {TensorProto.FLOAT16}
    assert out.ByteSize() < 0.5 * model.ByteSize()


def test_upcast_computes_the_float16_weights_in_float32():
    """Reference: the float32 chain whose weights are rounded to float16 by numpy."""
    fp32 = _chain()
    rounded = onnx.ModelProto()
    rounded.CopyFrom(fp32)
    for t in rounded.graph.initializer:
        w = numpy_helper.to_array(t).astype(np.float16).astype(np.float32)
        t.CopyFrom(numpy_helper.from_array(w, t.name))
    wide = upcast(_to_float16(fp32, fp32_head=False))
    assert not any(t.data_type == TensorProto.FLOAT16 for t in wide.graph.initializer)
    x = {"input": _x((2, 3, 8, 8))}
    assert rel_err(run_model(wide, x), run_model(rounded, x)) < 1e-6


def test_float32_check_catches_what_the_float16_tolerance_lets_through():
    """A masked model that differs by one slightly wrong weight column: within the
    float16 noise, far outside float32's."""
    pruned = _to_float16(_chain(), fp32_head=False)
    wrong = onnx.ModelProto()
    wrong.CopyFrom(pruned)
    w = next(t for t in wrong.graph.initializer if len(t.dims) == 4 and t.dims[1] == 8)
    array = numpy_helper.to_array(w).copy()
    array[:, 3] *= np.float16(1.01)
    w.CopyFrom(numpy_helper.from_array(array, w.name))
    x = {"input": _x((2, 3, 8, 8))}
    tol = measure_tolerance(wrong, x)
    check_equivalent(run_model(pruned, x), run_model(wrong, x), tolerance=tol)  # passes
    with pytest.raises(VerificationError, match="computed in float32"):
        check_in_float32(pruned, wrong, x)
    assert check_in_float32(pruned, pruned, x) == 0.0


def test_float16_with_data_is_refused(tmp_path, capsys):
    src, out = tmp_path / "fp16.onnx", tmp_path / "p.onnx"
    onnx.save(_to_float16(_chain(), False), src)
    assert main(["prune", str(src), "-o", str(out), "--data", "digits"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("gpp-onnx: error:") and "float16" in err and "--criterion l1" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp16.onnx"]


def _half_input(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` computing in float16 end to end: float16 weights, input and output."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16),
                                               t.name))
    for v in (*out.graph.input, *out.graph.output):
        v.type.tensor_type.elem_type = TensorProto.FLOAT16
    del out.graph.value_info[:]
    return out


def test_a_float16_input_model_is_evaluated_and_compared_on_images(tmp_path, capsys):
    """Images are prepared in float32; a model that takes float16 gets them in float16."""
    from gpp_onnx.data import DataSpec, load_dataset
    from gpp_onnx.samples import digits_cnn

    src, wide = tmp_path / "half.onnx", tmp_path / "wide.onnx"
    onnx.save(_half_input(digits_cnn(0)), src)
    onnx.save(digits_cnn(0), wide)
    data = load_dataset(DataSpec("digits", 1, 8, 8))
    session = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": data.x[:].astype(np.float16)})[0]
    expected = float(np.mean(logits.argmax(1) == data.y))
    assert main(["-q", "evaluate", str(src), "--data", "digits"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == f"top-1 accuracy {expected:.4f} on {len(data)} images"
    assert main(["-q", "compare", str(wide), str(src), "--data", "digits"]) == 0
    agreement = [line for line in capsys.readouterr().out.splitlines()
                 if "top-1 agreement" in line]
    assert len(agreement) == 1 and float(agreement[0].split()[-1]) > 0.95


def test_compare_of_models_with_other_inputs_is_one_line_exit_2(tmp_path, capsys):
    from gpp_onnx.samples import digits_cnn

    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(sample_cnn(), a)
    onnx.save(digits_cnn(0), b)
    assert main(["-q", "compare", str(a), str(b)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not take the inputs of" in err[0]
    assert "[1, 1, 8, 8]" in err[0] or "['?', 1, 8, 8]" in err[0]


def test_free_image_sides_run_at_the_datas_size(tmp_path, capsys):
    """A model that takes any image size runs at its data's (8x8 digits), not at 224."""
    from gpp_onnx.data import DataSpec, load_dataset
    from gpp_onnx.graph import GraphView
    from gpp_onnx.stats import count

    b = GraphBuilder((1, 1, 8, 8), seed=0)
    x = b.act(b.conv(b.act(b.conv("input", 8), "Relu"), 8), "Relu")
    model = b.build(b.gemm(b.flatten(b.gap(x)), 10))
    for value, axes in ((model.graph.input[0], (0, 2, 3)), (model.graph.output[0], (0,))):
        for axis in axes:
            value.type.tensor_type.shape.dim[axis].dim_param = f"d{axis}"
    del model.graph.value_info[:]
    src, out = tmp_path / "free.onnx", tmp_path / "small.onnx"
    onnx.save(model, src)
    data = load_dataset(DataSpec("digits", 1, 8, 8))
    session = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    expected = float(np.mean(session.run(None, {"input": data.x[:]})[0].argmax(1) == data.y))
    assert main(["-q", "evaluate", str(src), "--data", "digits"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == \
        f"top-1 accuracy {expected:.4f} on {len(data)} images"
    assert main(["-q", "prune", str(src), "--data", "digits", "--ratio", "0.5",
                 "--no-latency", "-o", str(out)]) == 0
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["before"]["macs"] == count(GraphView(model, (1, 1, 8, 8))).macs
    assert report["before"]["macs"] < count(GraphView(model)).macs      # 224 px
    # images larger than 224 a side stay resized down to 224 (time and memory bounded)
    from PIL import Image
    for k in range(4):
        folder = tmp_path / "big" / f"c{k % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((300, 320), 40 * k, np.uint8)).save(folder / f"{k}.png")
    big = tmp_path / "big_small.onnx"
    assert main(["-q", "prune", str(src), "--data", str(tmp_path / "big"), "--ratio", "0.5",
                 "--criterion", "l1", "--no-latency", "-o", str(big)]) == 0
    report = json.loads(big.with_suffix(".report.json").read_text())
    assert report["before"]["macs"] == count(GraphView(model)).macs


def _weights_behind_casts(model: onnx.ModelProto, low=np.float16) -> onnx.ModelProto:
    """Each float32 weight stored in `low` (float16, bfloat16), cast back to float32
    before its use."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    casts = []
    for t in out.graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            name = t.name
            stored = numpy_helper.to_array(t).astype(low)
            if stored.dtype == np.float16:
                t.CopyFrom(numpy_helper.from_array(stored, name + ".fp16"))
            else:  # bfloat16 by its bits: from_array takes ml_dtypes' type only from onnx 1.17
                t.CopyFrom(helper.make_tensor(name + ".fp16", TensorProto.BFLOAT16, stored.shape,
                                              stored.view(np.uint16).astype("<u2").tobytes(),
                                              raw=True))
            casts.append(helper.make_node("Cast", [name + ".fp16"], [name],
                                          to=TensorProto.FLOAT))
    nodes = casts + list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def test_weights_behind_casts_are_counted_and_stored_back_in_float16(tmp_path, capsys):
    """Normalising folds the Casts; a cut that only slices writes the weights back in
    float16 behind Casts, exactly; a repair that moves them off float16 says so."""
    from gpp_onnx.graph import GraphView
    from gpp_onnx.report import human
    from gpp_onnx.stats import count

    plain = _chain()
    cast = _weights_behind_casts(plain)
    result = assert_pruned_equals_masked(cast, tmp_path, ratio=0.5)
    pruned = onnx.load(tmp_path / "pruned.onnx")
    assert {t.data_type for t in pruned.graph.initializer} == {TensorProto.FLOAT16}
    assert not result.report["warnings"]
    assert main(["-q", "compare", str(tmp_path / "model.onnx"),
                 str(tmp_path / "pruned.onnx")]) == 0
    macs = [line for line in capsys.readouterr().out.splitlines() if line.startswith("MACs")]
    assert macs[0].split()[1] == human(count(GraphView(plain)).macs)
    # the repair (and fine-tuning) move the weights off float16: they stay float32, and
    # the run says so
    repaired = prune(tmp_path / "model.onnx", tmp_path / "repaired.onnx",
                     PruneConfig(ratio=0.5, round_to=1, latency=False,
                                 data=DataOptions("digits", labels=False),
                                 train=TrainOptions(epochs=0.2)))
    assert any("are written in float32" in w for w in repaired.report["warnings"])
    assert TensorProto.FLOAT in {t.data_type
                                 for t in onnx.load(tmp_path / "repaired.onnx").graph.initializer}


def test_weights_behind_casts_in_bfloat16_are_stored_back_in_bfloat16(tmp_path):
    """bfloat16 weights behind Casts were written in float32 (twice the bytes), silently."""
    ml_dtypes = pytest.importorskip("ml_dtypes")

    cast = _weights_behind_casts(_chain(), ml_dtypes.bfloat16)
    result = assert_pruned_equals_masked(cast, tmp_path, ratio=0.5)
    pruned = onnx.load(tmp_path / "pruned.onnx")
    assert {t.data_type for t in pruned.graph.initializer} == {TensorProto.BFLOAT16}
    assert not result.report["warnings"]
    assert (tmp_path / "pruned.onnx").stat().st_size < (tmp_path / "model.onnx").stat().st_size


# -- tolerance ----------------------------------------------------------------------------
def test_clean_float32_model_keeps_the_1e5_tolerance(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(sample_cnn(), src)
    result = prune(src, tmp_path / "p.onnx", PruneConfig(ratio=0.5, round_to=1, latency=False))
    report = json.loads((tmp_path / "p.report.json").read_text())
    assert report["equivalence_tolerance"] == 1e-5
    assert 0 < report["model_noise"] < 1e-6
    assert report["model_noise_sources"]["rounding"] == 0.0  # float32: the optimiser only
    assert result.equivalence_error < 1e-5


def test_tolerance_rule():
    """max(1e-5, 10 * noise): the Paddle case (1.29e-5 with noise of that order) passes,
    a clean model keeps 1e-5 exactly."""
    assert Tolerance().value == 1e-5 and Tolerance(4e-7, 0.0).value == 1e-5
    assert Tolerance(3e-6, 5e-6).value == pytest.approx(5e-5)
    ref = [np.ones(1000, np.float32)]
    got = [ref[0] + np.float32(1.29e-5)]
    with pytest.raises(VerificationError, match="tolerance 1.0e-05"):
        check_equivalent(got, ref)
    assert check_equivalent(got, ref, tolerance=Tolerance(3e-6)) == pytest.approx(1.29e-5,
                                                                                  rel=1e-2)


# -- several inputs ---------------------------------------------------------------------
def _two_inputs() -> onnx.ModelProto:
    """input (N,3,H,W) and aux (N,3,H/2,W/2), spatial dims symbolic: only per-name shapes
    of that ratio run (the default 224 for both does not)."""
    b = GraphBuilder((1, 3, 8, 8), seed=0)
    b.shapes["aux"] = (1, 3, 4, 4)
    a = b.conv("input", 8)
    c = b.resize(b.conv("aux", 8), 2)
    x = b.act(b.conv(b.act(b.binary("Add", a, c), "Relu"), 6), "Relu")
    out = b.gemm(b.flatten(b.gap(x)), 4)
    image = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, "H", "W"])
    aux = helper.make_tensor_value_info("aux", TensorProto.FLOAT, ["N", 3, "h", "w"])
    graph = helper.make_graph(b.nodes, "two_inputs", [image, aux],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", 4])],
                              b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_multi_input_model_with_per_name_shapes(tmp_path, capsys):
    model = _two_inputs()
    src, out = tmp_path / "two.onnx", tmp_path / "p.onnx"
    onnx.save(model, src)
    shapes = ["--input-shape", "input:1,3,8,8", "--input-shape", "aux:1,3,4,4"]
    assert main(["analyze", str(src), *shapes]) == 0
    assert main(["prune", str(src), "-o", str(out), "--no-latency", "--round-to", "1", *shapes]) == 0
    capsys.readouterr()
    plan = json.loads((tmp_path / "p.report.json").read_text())["plan"]
    assert json.loads((tmp_path / "p.report.json").read_text())["config"]["input_shape"] == {
        "input": [1, 3, 8, 8], "aux": [1, 3, 4, 4]}
    removed = {k: np.array(v, dtype=np.int64) for k, v in plan["removed"].items() if v}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    group_add = next(k for k in removed if k in (convs[0].output[0], convs[1].output[0]))
    masked = _hand_masked(model, {convs[2].input[1]: removed[group_add],
                                  gemm.input[1]: removed[convs[2].output[0]]})
    feeds = {"input": _x((2, 3, 10, 10)), "aux": _x((2, 3, 5, 5), seed=4)}
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert rel_err(session.run(None, feeds), run_model(masked, feeds)) < 1e-5
    assert len(removed) == 2


def test_per_name_shapes_from_python(tmp_path):
    src = tmp_path / "two.onnx"
    onnx.save(_two_inputs(), src)
    shapes = {"input": [1, 3, 8, 8], "aux": (1, 3, 4, 4)}
    assert PruneConfig(input_shape=shapes).checked().input_shape == {
        "input": (1, 3, 8, 8), "aux": (1, 3, 4, 4)}
    info = gpp_onnx.analyze(src, shapes)
    assert [s.shape for s in info.analysis.view.inputs] == [(1, 3, 8, 8), (1, 3, 4, 4)]
    cmp = gpp_onnx.compare(src, src, shapes, repeats=1)
    assert cmp.a.macs == info.stats.macs > 0
    with pytest.raises(InputError, match="not a shape"):
        PruneConfig(input_shape={"input": [1, 0, 8, 8]}).checked()


# -- bad input: one line, exit 2, nothing written ------------------------------------------
def _converter_fails(monkeypatch):
    def refuse(model, target):
        raise RuntimeError("No Adapter For Current Version")
    monkeypatch.setattr(onnx.version_converter, "convert_version", refuse)


BAD = [
    ("two", ["--input-shape", "1,3,8,8"], "is one shape but the model has 2 inputs"),
    ("two", ["--input-shape", "image:1,3,8,8"], "'image', which is not an input"),
    ("two", ["--input-shape", "input:1,3,8,8", "--input-shape", "4,4"], "without an input name"),
    ("two", ["--input-shape", "input:1,3,8,8", "--input-shape", "input:1,3,8,8"], "twice"),
    ("two", [], "NAME:1,3,224,224 for each input"),
    ("old", ["--converter-fails"], "cannot upgrade it to opset"),
]


@pytest.mark.parametrize("kind,extra,message", BAD, ids=[" ".join(c[1]) or c[0] for c in BAD])
def test_bad_load_options_are_one_line_exit_2(kind, extra, message, tmp_path, capsys,
                                              monkeypatch):
    model = _two_inputs() if kind == "two" else _opset9_model()
    if "--converter-fails" in extra:
        _converter_fails(monkeypatch)
        extra = []
    src, out = tmp_path / "m.onnx", tmp_path / "p.onnx"
    onnx.save(model, src)
    before = src.read_bytes()
    code = main(["prune", str(src), "-o", str(out), "--no-latency", *extra])
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("gpp-onnx: error:")]
    assert code == 2 and len(errors) == 1 and lines[-1] == errors[0]
    assert message in errors[0] and " - " in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert src.read_bytes() == before


def test_training_commands_say_when_float16_weights_are_written_in_float32(tmp_path, caplog):
    """push and gpp train every weight off float16: the weights the input stored in float16
    behind Casts are written in float32, and the run says how many."""
    from gpp_onnx import gpp, push
    from gpp_onnx.schedule import GppOptions

    src = tmp_path / "model.onnx"
    onnx.save(_weights_behind_casts(_chain()), src)
    rng = np.random.default_rng(0)
    y = np.arange(300) % 5
    x = np.clip(rng.normal(size=(300, 3, 8, 8)) * 0.1 + y[:, None, None, None] / 5, 0, 1)
    x = x.astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    data = DataOptions(str(tmp_path / "data.npz"))
    with caplog.at_level("WARNING"):
        push(src, tmp_path / "pushed.onnx", data, TrainOptions(epochs=0.5))
    warned = [r.getMessage() for r in caplog.records if "written in float32" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("6 of the weights")  # 2 convs, Gemm: w + b
    assert {t.data_type for t in onnx.load(tmp_path / "pushed.onnx").graph.initializer} == {
        TensorProto.FLOAT}
    caplog.clear()
    with caplog.at_level("WARNING"):
        gpp(src, tmp_path / "small.onnx", PruneConfig(data=data, target_macs=0.5, rounds=1,
                                                      latency=False),
            GppOptions(budget_epochs=5.0))
    assert any("written in float32" in r.getMessage() for r in caplog.records)


def test_a_free_output_dim_keeps_its_name(tmp_path):
    """Symbolic shape inference (run where Shape ops are) renamed an output's free dim 'T'
    after the input's width ('floor(W/2 - 1/2) + 1'); the written model keeps 'T'."""
    import torch

    class Seq(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(1, 8, 3, padding=1)
            self.c, self.f = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.Linear(32, 5)

        def forward(self, x):
            x = torch.relu(self.c(torch.relu(self.a(x))))
            return self.f(x.permute(3, 0, 1, 2).flatten(2))

    src, dst = tmp_path / "m.onnx", tmp_path / "p.onnx"
    torch.onnx.export(Seq().eval(), torch.randn(1, 1, 8, 32), str(src), dynamo=False,
                      opset_version=13, input_names=["x"], output_names=["out"],
                      dynamic_axes={"x": {0: "N", 3: "W"}, "out": {0: "T", 1: "N"}})
    prune(src, dst, ratio=0.5, latency=False)
    dims = onnx.load(dst).graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["T", "N", 5]


def test_an_integer_mask_cast_to_floats_is_not_taken_for_quantized_weights(tmp_path):
    """A uint8 mask cast to float32 that scales the input (no Conv/Gemm/MatMul weight) is
    no weight-only quantization: the model prunes as a float one."""
    model = sample_cnn()
    dims = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    model.graph.initializer.append(numpy_helper.from_array(np.ones(dims[1:], np.uint8), "mask"))
    first = model.graph.node[0]
    nodes = [helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", [first.input[0], "maskf"], ["masked_x"])]
    first.input[0] = "masked_x"
    nodes += list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    assert_pruned_equals_masked(model, tmp_path, ratio=0.5)


def _conv_in_a_function() -> onnx.ModelProto:
    """x (N,1,8,8) -> custom.Block(x, w1, b1) = Relu(Conv 16) -> Conv 16 -> Relu -> GAP ->
    Gemm 10: the first layer inside a local function, as a function-preserving export
    writes a module."""
    rng = np.random.default_rng(0)
    block = helper.make_function(
        "custom", "Block", ["X", "W", "B"], ["Y"],
        [helper.make_node("Conv", ["X", "W", "B"], ["C"], pads=[1] * 4),
         helper.make_node("Relu", ["C"], ["Y"])], opset_imports=[helper.make_opsetid("", 13)])
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.3, n)
             for n, s in [("w1", (16, 1, 3, 3)), ("b1", (16,)), ("w2", (16, 16, 3, 3)),
                          ("b2", (16,)), ("wf", (10, 16)), ("bf", (10,))]]
    nodes = [helper.make_node("Block", ["x", "w1", "b1"], ["r1"], domain="custom"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1] * 4),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], transB=1)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, functions=[block], opset_imports=[
        helper.make_opsetid("", 13), helper.make_opsetid("custom", 1)])


def test_a_layer_in_a_local_function_is_counted_pruned_and_trained(tmp_path):
    """The conv inside a local function counts (its MACs were left out: 147.5k printed for
    156.7k), its channels are cut, and the torch backend trains the model (it refused the
    function's domain)."""
    model = _conv_in_a_function()
    result = assert_pruned_equals_masked(model, tmp_path, ratio=0.5, round_to=1)
    assert result.before.macs == 16 * 9 * 64 + 16 * 16 * 9 * 64 + 16 * 10
    assert result.plan.removed_channels == 16      # 8 of 16 in both convs' groups
    src = tmp_path / "model.onnx"
    prune(src, tmp_path / "trained.onnx",
          PruneConfig(ratio=0.5, round_to=1, latency=False, data=gpp_onnx.DataOptions("digits"),
                      train=gpp_onnx.TrainOptions(epochs=0.2)))
    assert (tmp_path / "trained.onnx").exists()


@pytest.mark.parametrize("coordinates", [False, True])
def test_a_sparse_initializer_is_a_weight(tmp_path, coordinates):
    """A conv weight stored as a sparse_initializer (half its values zero) is counted and
    its layer pruned (it was taken for a computed weight: 'nothing can be pruned')."""
    model = _conv_in_a_function()
    model.functions.pop()
    model.graph.node[0].CopyFrom(helper.make_node("Conv", ["x", "w1", "b1"], ["c1"],
                                                  pads=[1] * 4))
    model.graph.node.insert(1, helper.make_node("Relu", ["c1"], ["r1"]))
    w2 = next(t for t in model.graph.initializer if t.name == "w2")
    dense = numpy_helper.to_array(w2).copy()
    dense[:, ::2] = 0
    flat = np.flatnonzero(dense)
    index = np.stack(np.unravel_index(flat, dense.shape), 1) if coordinates else flat
    model.graph.initializer.remove(w2)
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(
        numpy_helper.from_array(dense.ravel()[flat], "w2"),
        numpy_helper.from_array(index.astype(np.int64), "w2_index"), list(dense.shape)))
    result = assert_pruned_equals_masked(model, tmp_path, ratio=0.5, round_to=1)
    assert result.before.params == 16 * 9 + 16 + 16 * 16 * 9 + 16 + 10 * 16 + 10
    assert result.plan.removed_channels == 16
