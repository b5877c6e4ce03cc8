"""Rare forms of ops the channel rules meet: int32 Slice bounds, channel-shifting pads, a
Gemm with beta 0 (explicit small models)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import assert_pruned_equals_masked


def _model(nodes, inits, name: str, side: int, classes: int) -> onnx.ModelProto:
    """A checked opset-17 model of `nodes` from input (N, 3, side, side) to logits."""
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, side, side])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _slice_model(index_dtype) -> onnx.ModelProto:
    """conv (6 ch) -> Relu -> Slice channels 1:5 (bounds and axes in `index_dtype`) ->
    conv -> GAP -> Gemm."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a, n) for a, n in [
        (rng.standard_normal((6, 3, 1, 1)).astype(np.float32), "w1"),
        (np.array([1], index_dtype), "s"), (np.array([5], index_dtype), "e"),
        (np.array([1], index_dtype), "ax"),
        (rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "w2"),
        (rng.standard_normal((3, 4)).astype(np.float32), "fc")]]
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Slice", ["r1", "s", "e", "ax"], ["sl"], name="slice"),
             helper.make_node("Conv", ["sl", "w2"], ["c2"], name="conv2"),
             helper.make_node("GlobalAveragePool", ["c2"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fc"], ["logits"], name="fc", transB=1)]
    return _model(nodes, inits, "slice_index_type", 4, 3)


def test_channel_slice_with_int32_bounds_keeps_their_type(tmp_path):
    """Slice's starts, ends, axes and steps share one index type; the cut rewrote int32
    bounds as int64 beside int32 axes, and the pruned model failed the ONNX checker
    (VerificationError, nothing written)."""
    result = assert_pruned_equals_masked(_slice_model(np.int32), tmp_path, ratio=0.5,
                                         criterion="l1")
    assert result.plan.removed_channels
    pruned = onnx.load(str(tmp_path / "pruned.onnx"))
    inits = {t.name: t for t in pruned.graph.initializer}
    (node,) = [n for n in pruned.graph.node if n.op_type == "Slice"]
    assert {inits[name].data_type for name in node.input[1:]} == {TensorProto.INT32}
    onnx.checker.check_model(pruned, full_check=True)


def test_channel_pad_that_shifts_the_channels_keeps_them(tmp_path):
    """Pad with pads -1 / +1 on the channel axis keeps the width but shifts the channels
    (output k is input k-1): the rule tied them one to one, and the cut differed from the
    masked model (VerificationError, 'please report this model'). Such channels stay; the
    conv behind the Pad is still pruned."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a, n) for a, n in [
        (rng.standard_normal((5, 3, 1, 1)).astype(np.float32), "w1"),
        (np.array([0, 1, 0, 0, 0, -1, 0, 0], np.int64), "pads"),
        (rng.standard_normal((4, 5, 1, 1)).astype(np.float32), "w2"),
        (rng.standard_normal((3, 4)).astype(np.float32), "fc")]]
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], name="conv1"),
             helper.make_node("Sigmoid", ["c1"], ["s1"], name="sigmoid1"),
             helper.make_node("Pad", ["s1", "pads"], ["p"], name="pad", mode="constant"),
             helper.make_node("Conv", ["p", "w2"], ["c2"], name="conv2"),
             helper.make_node("GlobalAveragePool", ["c2"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fc"], ["logits"], name="fc", transB=1)]
    model = _model(nodes, inits, "pad_shift", 4, 3)
    result = assert_pruned_equals_masked(model, tmp_path, ratio=0.5, criterion="l1")
    assert result.plan.removed_channels
    pruned = onnx.load(str(tmp_path / "pruned.onnx"))
    weights = {t.name: tuple(t.dims) for t in pruned.graph.initializer}
    (conv1,) = [n for n in pruned.graph.node if n.name == "conv1"]
    assert weights[conv1.input[1]][0] == 5     # the shifted channels stay


def test_repair_writes_no_bias_into_a_gemm_with_beta_0(tmp_path):
    """A Gemm head with beta 0 ignores its C: the bias repair wrote C = delta / beta, i.e.
    infinities (NaN by the spec's 0 * inf, NaN in the torch backend's fine-tuning, and a
    model gpp-onnx itself refuses at load). Now that Gemm gets no bias repair and no refit."""
    from gpp_onnx import PruneConfig, prune
    from gpp_onnx.config import DataOptions
    from gpp_onnx.model import read

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a, n) for a, n in [
        (rng.standard_normal((6, 3, 3, 3)).astype(np.float32), "w1"),
        (rng.uniform(-0.1, 0.1, 6).astype(np.float32), "b1"),
        (rng.standard_normal((4, 6)).astype(np.float32), "fc"),
        (rng.uniform(-0.1, 0.1, 4).astype(np.float32), "fc_c")]]
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1",
                              pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("GlobalAveragePool", ["r1"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fc", "fc_c"], ["logits"], name="fc", transB=1,
                              beta=0.0)]
    model = _model(nodes, inits, "gemm_beta0", 8, 4)
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((80, 3, 8, 8)).astype(np.float32),
             y=rng.integers(0, 4, 80))
    for mode in ("bias", "lsq"):
        out = tmp_path / f"{mode}.onnx"
        prune(tmp_path / "m.onnx", out, PruneConfig(
            ratio=0.5, criterion="l1", repair=mode, latency=False, round_to=1,
            data=DataOptions(str(tmp_path / "d.npz"), per_class=4)))
        for t in onnx.load(str(out)).graph.initializer:
            assert np.all(np.isfinite(numpy_helper.to_array(t))), (mode, t.name)
        read(out)   # gpp-onnx opens what it wrote (it refuses non-finite weights)


def test_computed_channel_factor_read_twice_keeps_its_channels(tmp_path):
    """A per-channel factor computed as ``gamma * map`` (a channel-free map) that scales two
    branches: its constant gamma was cut with each branch's channels, and two different
    cuts of it stopped the prune ('conflicting cuts', nothing written); read by a conv
    instead, the cut shrank its input (the pruned model failed to run). The branches it
    scales now keep their channels; the convs behind them are pruned."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in [
        (rng.standard_normal((6, 3, 1, 1)), "w1"), (rng.standard_normal((6, 6, 1, 1)), "w2"),
        (rng.uniform(0.5, 1.5, (1, 6, 1, 1)), "gamma"),
        (rng.standard_normal((4, 6, 1, 1)), "w3"), (rng.standard_normal((4, 6, 1, 1)), "w4"),
        (rng.standard_normal((3, 4)), "fc")]]
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("ReduceMean", ["input"], ["t"], name="mean", axes=[1]),
             helper.make_node("Mul", ["gamma", "t"], ["s"], name="factor"),
             helper.make_node("Mul", ["r1", "s"], ["ya"], name="scale_a"),
             helper.make_node("Mul", ["r2", "s"], ["yb"], name="scale_b"),
             helper.make_node("Conv", ["ya", "w3"], ["c3"], name="conv3"),
             helper.make_node("Conv", ["yb", "w4"], ["c4"], name="conv4"),
             helper.make_node("Add", ["c3", "c4"], ["a"], name="add"),
             helper.make_node("GlobalAveragePool", ["a"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fc"], ["logits"], name="fc", transB=1)]
    model = _model(nodes, inits, "shared_factor", 4, 3)
    result = assert_pruned_equals_masked(model, tmp_path, ratio=0.5, criterion="l1")
    assert result.plan.removed_channels
    pruned = onnx.load(str(tmp_path / "pruned.onnx"))
    weights = {t.name: tuple(t.dims) for t in pruned.graph.initializer}
    assert weights["gamma"] == (1, 6, 1, 1)      # the factor's channels stay


def test_a_broadcast_token_read_twice_keeps_its_channels(tmp_path):
    """A learned token (1, 6, 1, 4) expanded over a batch read from the input and joined
    (Concat along H) to two maps that are cut on their own: the token was cut with each
    map's channels, and two different cuts of it stopped the prune ('conflicting cuts')."""
    rng = np.random.default_rng(0)
    f32 = [(rng.standard_normal((6, 3, 1, 1)), "w1"), (rng.standard_normal((6, 6, 1, 1)), "w2"),
           (rng.standard_normal((1, 6, 1, 4)), "token"),
           (rng.standard_normal((4, 6, 1, 1)), "w3"), (rng.standard_normal((4, 6, 1, 1)), "w4"),
           (rng.standard_normal((3, 4)), "fc")]
    i64 = [(np.array([0]), "zero"), (np.array([1]), "one"), (np.array([1, 1, 4]), "rest")]
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in f32] + \
        [numpy_helper.from_array(a.astype(np.int64), n) for a, n in i64]
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Shape", ["input"], ["shape"], name="shape"),
             helper.make_node("Slice", ["shape", "zero", "one"], ["n"], name="batch"),
             helper.make_node("Concat", ["n", "rest"], ["target"], name="target", axis=0),
             helper.make_node("Expand", ["token", "target"], ["tok"], name="expand"),
             helper.make_node("Concat", ["r1", "tok"], ["ja"], name="join_a", axis=2),
             helper.make_node("Concat", ["r2", "tok"], ["jb"], name="join_b", axis=2),
             helper.make_node("Conv", ["ja", "w3"], ["c3"], name="conv3"),
             helper.make_node("Conv", ["jb", "w4"], ["c4"], name="conv4"),
             helper.make_node("Add", ["c3", "c4"], ["a"], name="add"),
             helper.make_node("GlobalAveragePool", ["a"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fc"], ["logits"], name="fc", transB=1)]
    model = _model(nodes, inits, "shared_token", 4, 3)
    result = assert_pruned_equals_masked(model, tmp_path, ratio=0.5, criterion="l1")
    assert result.plan.removed_channels
    pruned = onnx.load(str(tmp_path / "pruned.onnx"))
    weights = {t.name: tuple(t.dims) for t in pruned.graph.initializer}
    assert weights["token"] == (1, 6, 1, 4)      # the token's channels stay


def test_mean_variance_normalization_with_its_default_axes_is_pruned(tmp_path):
    """MeanVarianceNormalization without ``axes`` (default [0, 2, 3]: per channel) is valid
    and onnxruntime runs it, but onnx's full checker fails on it; the model was scored,
    cut and verified, then refused at the end ('pruned model fails the ONNX checker')."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in [
        (rng.standard_normal((8, 3, 3, 3)), "w1"), (rng.standard_normal((8, 8, 3, 3)), "w2"),
        (rng.standard_normal((3, 8)), "fc")]]
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], name="conv1", pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("MeanVarianceNormalization", ["r1"], ["m"], name="mvn"),
             helper.make_node("Conv", ["m", "w2"], ["c2"], name="conv2", pads=[1] * 4),
             helper.make_node("GlobalAveragePool", ["c2"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fc"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(
        nodes, "mvn", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    result = assert_pruned_equals_masked(model, tmp_path, ratio=0.5, criterion="l1")
    assert result.plan.removed_channels


def _returned_shape_model(tail, returned: str, length: int, i64: dict) -> onnx.ModelProto:
    """conv1 -> Relu -> conv2 -> Relu (r2, 8 channels) -> `tail` nodes (from r2 to
    'pooled' (N, 8)) -> Gemm; the int64 shape value `returned` is a model output too."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in [
        (rng.standard_normal((8, 3, 3, 3)), "w1"), (rng.standard_normal((8, 8, 3, 3)), "w2"),
        (rng.standard_normal((4, 8)), "fc")]] + \
        [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in i64.items()]
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], name="conv1", pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1] * 4),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Shape", ["r2"], ["shape"], name="shape"), *tail,
             helper.make_node("Gemm", ["pooled", "fc"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(
        nodes, "returned_shape",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info(returned, TensorProto.INT64, [length])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _conv_widths(tmp_path) -> dict[str, int]:
    pruned = onnx.load(str(tmp_path / "pruned.onnx"))
    weights = {t.name: tuple(t.dims) for t in pruned.graph.initializer}
    return {n.name: weights[n.input[1]][0] for n in pruned.graph.node if n.op_type == "Conv"}


def test_reshape_target_the_model_returns_keeps_its_channels(tmp_path):
    """A Reshape to a computed target ``Concat(N, 8, -1)`` whose channel entry surgery
    rewrites to the kept count: where the model also returns that target, the returned
    value changed too, and the prune stopped ('pruned model differs', please report). The
    reshaped channels now stay; conv1 is still pruned."""
    tail = [helper.make_node("Slice", ["shape", "zero", "one"], ["n"], name="batch"),
            helper.make_node("Concat", ["n", "eight", "m1"], ["target"], name="target", axis=0),
            helper.make_node("Reshape", ["r2", "target"], ["seq"], name="reshape"),
            helper.make_node("ReduceMean", ["seq"], ["pooled"], name="pool", axes=[2],
                             keepdims=0)]
    model = _returned_shape_model(tail, "target", 3,
                                  {"zero": [0], "one": [1], "eight": [8], "m1": [-1]})
    result = assert_pruned_equals_masked(model, tmp_path, ratio=0.5, criterion="l1")
    assert result.plan.removed_channels
    assert _conv_widths(tmp_path) == {"conv1": 4, "conv2": 8}


@pytest.mark.parametrize("returned", ["sizes", "nc", "sizes_id"])
def test_resize_sizes_the_model_returns_keep_their_channels(tmp_path, returned):
    """``F.interpolate(x, size=...)``: Resize(x, sizes=Concat(Shape(x)[0:2], hw)), whose
    sizes follow a cut of x at run time. Where the model also returns the sizes (or
    Shape(x)[0:2], or the sizes through an Identity), the returned value changed with the
    cut and the prune stopped ('pruned model differs', please report). The resized
    channels now stay; conv1 is still pruned."""
    tail = [helper.make_node("Slice", ["shape", "zero", "two"], ["nc"], name="nc"),
            helper.make_node("Concat", ["nc", "hw"], ["sizes"], name="sizes", axis=0),
            helper.make_node("Identity", ["sizes"], ["sizes_id"], name="sizes_id"),
            helper.make_node("Resize", ["r2", "", "", "sizes_id"], ["up"], name="resize",
                             mode="nearest"),
            helper.make_node("GlobalAveragePool", ["up"], ["g"], name="gap"),
            helper.make_node("Flatten", ["g"], ["pooled"], name="flat")]
    if returned != "sizes_id":   # the Resize reads the sizes themselves
        del tail[2]
        tail[2].input[3] = "sizes"
    model = _returned_shape_model(tail, returned, 2 if returned == "nc" else 4,
                                  {"zero": [0], "two": [2], "hw": [16, 16]})
    result = assert_pruned_equals_masked(model, tmp_path, ratio=0.5, criterion="l1")
    assert result.plan.removed_channels
    assert _conv_widths(tmp_path) == {"conv1": 4, "conv2": 8}
