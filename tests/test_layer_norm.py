"""LayerNorms over the channel axis (ConvNeXt, transformer embeddings, older exporters'
written-out LayerNorm): the channels they normalise are prunable, and the pruned model
is the network whose LayerNorms run over the kept channels only. Each test compares
the pruned ONNX model with that network written independently in torch, from the
original weights sliced to the kept channels."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from conftest import assert_pruned_equals_masked, feeds_for, run_model
from gpp_onnx.analysis import analyze_model
from gpp_onnx.model import normalize
from gpp_onnx.samples import GraphBuilder


def _weights(model: onnx.ModelProto) -> dict[str, torch.Tensor]:
    return {t.name: torch.from_numpy(numpy_helper.to_array(t).copy())
            for t in model.graph.initializer}


def _node(model, op_type, k=0):
    return [n for n in model.graph.node if n.op_type == op_type][k]


def _ln_net(kind: str, opset: int = 17) -> onnx.ModelProto:
    b = GraphBuilder((1, 3, 8, 8), seed=3, opset=opset)
    x = b.act(b.conv("input", 8), "Relu")
    x = b.layer_norm(x) if kind == "written" else b.layer_norm_op(x, kind == "channels_last")
    x = b.act(b.conv(x, 6), "Relu")
    return b.build(b.gemm(b.flatten(b.gap(x)), 4))


def _reference(model: onnx.ModelProto, kind: str, keep: np.ndarray, x: np.ndarray,
               keep2: np.ndarray = np.arange(6)):
    """The network of `_ln_net` with conv1's channels `keep` and conv2's `keep2` only,
    in torch."""
    w = _weights(model)
    c1, c2, gemm = _node(model, "Conv"), _node(model, "Conv", 1), _node(model, "Gemm")
    k = torch.from_numpy(keep)
    h = F.relu(F.conv2d(torch.from_numpy(x), w[c1.input[1]][k], w[c1.input[2]][k], padding=1))
    if kind == "written":
        mul = next(n for n in model.graph.node if n.op_type == "Mul" and n.input[1] in w)
        add = next(n for n in model.graph.node if n.op_type == "Add" and n.input[0] == mul.output[0])
        mean = h.mean(1, keepdim=True)
        var = ((h - mean) ** 2).mean(1, keepdim=True)
        h = (h - mean) / torch.sqrt(var + 1e-5) * w[mul.input[1]][k] + w[add.input[1]][k]
    elif kind == "channels_last":
        ln = _node(model, "LayerNormalization")
        h = F.layer_norm(h.permute(0, 2, 3, 1), (len(keep),), w[ln.input[1]][k],
                         w[ln.input[2]][k], eps=1e-6).permute(0, 3, 1, 2)
    else:  # over C, H, W
        ln = _node(model, "LayerNormalization")
        h = F.layer_norm(h, tuple(h.shape[1:]), w[ln.input[1]][k], w[ln.input[2]][k])
    k2 = torch.from_numpy(keep2)
    h = F.relu(F.conv2d(h, w[c2.input[1]][k2][:, k], w[c2.input[2]][k2], padding=1))
    return F.linear(h.mean((2, 3)), w[gemm.input[1]][:, k2], w[gemm.input[2]]).numpy()


@pytest.mark.parametrize("kind,opset", [("written", 13), ("written", 18),
                                        ("channels_last", 17), ("chw", 17)])
def test_pruned_layer_norm_normalises_over_the_kept_channels(kind, opset, tmp_path):
    model = _ln_net(kind, opset)
    result = assert_pruned_equals_masked(model, tmp_path, ratio=0.5, criterion="l1")
    removed = result.plan.removed[_node(model, "Conv").name]
    assert len(removed) == 4
    keep = np.setdiff1d(np.arange(8), removed)
    keep2 = np.setdiff1d(np.arange(6), result.plan.removed[_node(model, "Conv", 1).name])
    feeds = feeds_for(model, batch=3)
    got = run_model(tmp_path / "pruned.onnx", feeds)[0]
    np.testing.assert_allclose(got, _reference(model, kind, keep, feeds["input"], keep2),
                               rtol=1e-4, atol=1e-5)


def test_the_unpruned_reference_is_the_original():
    """The torch reference with every channel kept computes the original model."""
    for kind in ("written", "channels_last", "chw"):
        model = _ln_net(kind)
        feeds = feeds_for(model, batch=2)
        np.testing.assert_allclose(_reference(model, kind, np.arange(8), feeds["input"]),
                                   run_model(model, feeds)[0], rtol=1e-4, atol=1e-5)


def test_transformer_layer_norm_over_the_embedding(tmp_path):
    """(N, tokens, C) with LayerNormalization over C: the embedding's producer and the
    LayerNorm's scale and bias lose the same columns."""
    b = GraphBuilder((1, 4, 8), seed=0)
    h = b.act(b.matmul("input", 16), "Relu")
    y = b.matmul(h, 8)
    scale = b.const(np.linspace(0.5, 1.5, 8).astype(np.float32))
    shift = b.const(np.linspace(-0.1, 0.1, 8).astype(np.float32))
    y = b.op("LayerNormalization", [y, scale, shift], (1, 4, 8), axis=-1)
    model = b.build(b.matmul(y, 3))
    analysis = analyze_model(normalize(model))
    assert sorted(g.width for g in analysis.prunable) == [8, 16]
    result = assert_pruned_equals_masked(model, tmp_path, ratio=0.5, criterion="l1")
    w = _weights(model)
    m1, m2, m3 = (_node(model, "MatMul", i) for i in range(3))
    keep_h = np.setdiff1d(np.arange(16), result.plan.removed[m1.name])
    keep_y = np.setdiff1d(np.arange(8), result.plan.removed[m2.name])
    x = torch.from_numpy(feeds_for(model, batch=2)["input"])
    hidden = torch.relu(x @ w[m1.input[1]][:, keep_h])
    emb = hidden @ w[m2.input[1]][keep_h][:, keep_y]
    k = torch.from_numpy(keep_y)
    ref = F.layer_norm(emb, (len(keep_y),), w[scale][k], w[shift][k]) @ w[m3.input[1]][k]
    got = run_model(tmp_path / "pruned.onnx", {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op", ["ReduceMax", "ReduceMin", "ReduceProd", "ReduceLogSumExp"])
def test_reductions_a_zero_channel_would_change_keep_their_channels(op):
    b = GraphBuilder((1, 3, 8, 8), seed=0)
    x = b.act(b.conv("input", 8), "Relu")
    r = b.op(op, [x], (1, 1, 8, 8), axes=[1], keepdims=1)
    model = b.build(b.gemm(b.flatten(b.binary("Mul", x, r)), 4))
    analysis = analyze_model(normalize(model))
    group = next(g for g in analysis.groups if x in g.values)
    assert not group.prunable and "reduces over the channel axis" in group.reason


@pytest.mark.parametrize("op", ["ReduceSum", "ReduceL2", "ReduceSumSquare", "ReduceL1"])
def test_sums_over_channels_run_over_the_kept_ones(op, tmp_path):
    b = GraphBuilder((1, 3, 8, 8), seed=0)
    x = b.act(b.conv("input", 8), "Relu")
    if op == "ReduceSum":  # axes are an input from opset 13 on
        r = b.op(op, [x, b.const(np.array([1]))], (1, 1, 8, 8), keepdims=1)
    else:
        r = b.op(op, [x], (1, 1, 8, 8), axes=[1], keepdims=1)
    model = b.build(b.gemm(b.flatten(b.binary("Add", b.conv(x, 4), r)), 4))
    result = assert_pruned_equals_masked(model, tmp_path, ratio=0.5, criterion="l1")
    conv1 = _node(model, "Conv")
    keep = np.setdiff1d(np.arange(8), result.plan.removed[conv1.name])
    w = _weights(model)
    feeds = feeds_for(model, batch=2)
    h = F.relu(F.conv2d(torch.from_numpy(feeds["input"]), w[conv1.input[1]][keep],
                        w[conv1.input[2]][keep], padding=1))
    stat = {"ReduceSum": h.sum(1, keepdim=True), "ReduceL1": h.abs().sum(1, keepdim=True),
            "ReduceL2": h.pow(2).sum(1, keepdim=True).sqrt(),
            "ReduceSumSquare": h.pow(2).sum(1, keepdim=True)}[op]
    conv2, gemm = _node(model, "Conv", 1), _node(model, "Gemm")
    keep2 = np.setdiff1d(np.arange(4), result.plan.removed.get(conv2.name, ()))
    y = F.conv2d(h, w[conv2.input[1]][keep2][:, keep], w[conv2.input[2]][keep2], padding=1)
    columns = (keep2[:, None] * 64 + np.arange(64)).ravel()  # Flatten of (4, 8, 8)
    ref = F.linear((y + stat).flatten(1), w[gemm.input[1]][:, columns], w[gemm.input[2]])
    got = run_model(tmp_path / "pruned.onnx", feeds)[0]
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4, atol=1e-4)


def test_layer_norm_written_as_sums_with_a_computed_scale(tmp_path):
    """jax2tf's form: ``mean = ReduceSum(x) / C``, ``var = ReduceSum(x*x) / C - mean^2``,
    ``y = (x - mean) * (rsqrt(var + eps) * gamma) + beta``: the scale is computed from a
    per-channel constant and a statistic, and gamma is cut with the channels. The sums
    run over the kept channels; the constant 1/C stays as written."""
    b = GraphBuilder((1, 12), seed=0)
    x = b.act(b.gemm("input", 8), "Relu")
    inv_c = b.const(np.float32(1 / 8))
    axes = b.const(np.array([1]))
    mean = b.binary("Mul", b.op("ReduceSum", [x, axes], (1, 1), keepdims=1), inv_c)
    sq = b.binary("Mul", b.op("ReduceSum", [b.binary("Mul", x, x), axes], (1, 1), keepdims=1),
                  inv_c)
    var = b.binary("Sub", sq, b.binary("Mul", mean, mean))
    r = b.act(b.act(b.binary("Add", var, b.const(np.float32(1e-5))), "Sqrt"), "Reciprocal")
    gamma = b.const(np.linspace(0.5, 1.5, 8, dtype=np.float32).reshape(1, 8))
    beta = b.const(np.linspace(-0.1, 0.1, 8, dtype=np.float32).reshape(1, 8))
    y = b.binary("Add", b.binary("Mul", b.binary("Sub", x, mean), b.binary("Mul", r, gamma)),
                 beta)
    model = b.build(b.gemm(y, 3))
    result = assert_pruned_equals_masked(model, tmp_path, ratio=0.5, criterion="l1")
    g1, g2 = _node(model, "Gemm"), _node(model, "Gemm", 1)
    keep = np.setdiff1d(np.arange(8), result.plan.removed[g1.name])
    assert len(keep) == 4
    w, k = _weights(model), torch.from_numpy(keep)
    feeds = feeds_for(model, batch=3)
    h = torch.relu(F.linear(torch.from_numpy(feeds["input"]), w[g1.input[1]][k], w[g1.input[2]][k]))
    mean_ = h.sum(1, keepdim=True) / 8
    var_ = (h * h).sum(1, keepdim=True) / 8 - mean_ ** 2
    z = (h - mean_) * (w[gamma][0, k] / torch.sqrt(var_ + 1e-5)) + w[beta][0, k]
    ref = F.linear(z, w[g2.input[1]][:, k], w[g2.input[2]])
    got = run_model(tmp_path / "pruned.onnx", feeds)[0]
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["written", "channels_last", "chw"])
def test_masked_layer_norm_is_exact_in_float64(kind, tmp_path):
    """3 of 8 channels kept (1/3 has no exact float): the masked form's statistics must
    still equal the pruned LayerNorm's in float64, where the check's last word is said."""
    from gpp_onnx.exact import FLOAT64_TOLERANCE, float64_outputs

    model = _ln_net(kind)
    assert_pruned_equals_masked(model, tmp_path, ratio=0.625, criterion="l1")
    feeds = feeds_for(model, batch=2)
    (p,) = float64_outputs(onnx.load(tmp_path / "pruned.onnx"), feeds)
    (m,) = float64_outputs(onnx.load(tmp_path / "masked.onnx"), feeds)
    assert np.abs(p - m).max() / np.abs(m).max() < FLOAT64_TOLERANCE / 1000


@pytest.mark.parametrize("kind", ["written", "channels_last", "chw"])
def test_float16_layer_norm_prunes_and_stays_float16(kind, tmp_path):
    from onnx import TensorProto

    model = _ln_net(kind)
    for t in model.graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16),
                                               t.name))
    for v in [*model.graph.input, *model.graph.output]:
        v.type.tensor_type.elem_type = TensorProto.FLOAT16
    from gpp_onnx import PruneConfig, prune

    onnx.save(model, tmp_path / "m.onnx")
    result = prune(tmp_path / "m.onnx", tmp_path / "p.onnx",
                   PruneConfig(ratio=0.5, latency=False, round_to=1, criterion="l1"))
    assert result.plan.removed_channels == 7
    pruned = onnx.load(tmp_path / "p.onnx")
    assert pruned.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert {t.data_type for t in pruned.graph.initializer
            if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)} == {TensorProto.FLOAT16}
