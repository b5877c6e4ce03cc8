"""Attention heads as channels: a hand-built block against a numpy hand-cut, and tiny
torchvision ViTs from both exporters against their masked originals."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import (assert_pruned_equals_masked, feeds_for, n_params, rel_err, run_model,
                      zoo_tool)
from gpp_onnx import PruneConfig, prune
from gpp_onnx.analysis import analyze_model
from gpp_onnx.model import normalize

L, E, H = 5, 64, 4
D = E // H


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = {f"W{p}": (rng.standard_normal((E, E)) / np.sqrt(E)).astype(np.float32) for p in "qkvo"}
    w.update({f"b{p}": rng.uniform(-0.5, 0.5, E).astype(np.float32) for p in "qkvo"})
    return w


def attention_block(w: dict[str, np.ndarray], extra_output: str | None = None) -> onnx.ModelProto:
    """x (N, L, E) -> separate q/k/v projections -> (N, H, L, d) heads -> softmax
    attention -> merge -> out-projection: the (batch, seq, heads, dim) layout of timm/HF,
    unlike torchvision's packed, sequence-first one."""
    n = []
    for p in "qkv":
        n.append(helper.make_node("MatMul", ["x", f"W{p}"], [f"{p}0"]))
        n.append(helper.make_node("Add", [f"{p}0", f"b{p}"], [f"{p}1"]))
        n.append(helper.make_node("Reshape", [f"{p}1", "split_heads"], [f"{p}2"]))
        perm = [0, 2, 3, 1] if p == "k" else [0, 2, 1, 3]
        n.append(helper.make_node("Transpose", [f"{p}2"], [f"{p}3"], perm=perm))
    n += [helper.make_node("MatMul", ["q3", "k3"], ["s0"]),
          helper.make_node("Mul", ["s0", "scale"], ["s1"]),
          helper.make_node("Softmax", ["s1"], ["a"], axis=-1),
          helper.make_node("MatMul", ["a", "v3"], ["o0"]),
          helper.make_node("Transpose", ["o0"], ["o1"], perm=[0, 2, 1, 3]),
          helper.make_node("Reshape", ["o1", "merge_heads"], ["o2"]),
          helper.make_node("MatMul", ["o2", "Wo"], ["y0"]),
          helper.make_node("Add", ["y0", "bo"], ["y"])]
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    inits += [numpy_helper.from_array(np.array([0, L, H, D], np.int64), "split_heads"),
              numpy_helper.from_array(np.array([0, L, E], np.int64), "merge_heads"),
              numpy_helper.from_array(np.array(D ** -0.5, np.float32), "scale")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", L, E])]
    if extra_output:
        outputs.append(helper.make_tensor_value_info(extra_output, TensorProto.FLOAT, None))
    graph = helper.make_graph(n, "attention", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["N", L, E])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def reference(w: dict[str, np.ndarray], x: np.ndarray, heads: list[int]) -> np.ndarray:
    """The block computed in numpy with only `heads` left: their q/k/v columns and
    out-projection rows, everything else deleted by hand."""
    cols = np.concatenate([np.arange(h * D, (h + 1) * D) for h in heads])
    split = [(x @ w[f"W{p}"][:, cols] + w[f"b{p}"][cols]).reshape(len(x), L, len(heads), D)
             .transpose(0, 2, 1, 3) for p in "qkv"]
    q, k, v = split
    s = q @ k.transpose(0, 1, 3, 2) * D ** -0.5
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = (a @ v).transpose(0, 2, 1, 3).reshape(len(x), L, len(heads) * D)
    return o @ w["Wo"][cols, :] + w["bo"]


def test_reference_with_all_heads_is_the_model():
    w = _weights()
    x = feeds_for(attention_block(w), batch=2)["x"]
    np.testing.assert_allclose(run_model(attention_block(w), {"x": x})[0],
                               reference(w, x, list(range(H))), rtol=1e-5, atol=1e-5)


def test_removing_heads_matches_hand_cut(tmp_path):
    w = _weights()
    model = attention_block(w)
    groups = {g.width: g for g in analyze_model(normalize(model)).groups}
    assert groups[H].prunable, groups[H].reason
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    # default widths: a head spans D = 16 elements of every tensor, a multiple of the
    # runtime block (8 or 16), so the head count itself is not rounded
    result = prune(src, tmp_path / "p.onnx", PruneConfig(ratio=0.5, latency=False))
    (removed,) = [list(v) for v in result.plan.removed.values() if v]
    kept = [h for h in range(H) if h not in removed]
    assert len(kept) == 2
    x = feeds_for(model, batch=3)["x"]
    got = run_model(tmp_path / "p.onnx", {"x": x})[0]
    np.testing.assert_allclose(got, reference(w, x, kept), rtol=1e-5, atol=1e-5)
    assert rel_err([got], [reference(w, x, list(range(H)))]) > 1e-2  # heads really went
    per_head = 3 * (E * D + D) + D * E
    assert n_params(tmp_path / "p.onnx") == n_params(src) - len(removed) * per_head


def test_heads_narrower_than_the_block_are_kept_in_whole_blocks_of_heads(tmp_path):
    """Heads of D = 16 with blocks of 32: two heads fill a block, so half of 4 heads go
    (the head count itself used to be rounded up to 32, keeping all 4)."""
    src = tmp_path / "m.onnx"
    onnx.save(attention_block(_weights()), src)
    result = prune(src, tmp_path / "p.onnx", PruneConfig(ratio=0.5, round_to=32, latency=False))
    assert sorted(len(v) for v in result.plan.removed.values()) == [2]


def test_attention_block_pruned_equals_masked(tmp_path):
    assert_pruned_equals_masked(attention_block(_weights(1)), tmp_path, ratio=0.5)


def test_block_value_used_outside_keeps_heads_with_reason():
    model = attention_block(_weights(), extra_output="a")  # attention map is an output
    groups = analyze_model(normalize(model)).groups
    for value in ("q1", "v1", "o2"):  # a projection's heads, the out-projection's input
        (group,) = [g for g in groups if value in g.values]
        assert not group.prunable
        assert "attention heads not followed: 'a' is a model output" in group.reason


def test_shape_read_by_slice_off_the_channel_axis_keeps_channels_prunable(tmp_path):
    """x.view(x.shape[:1] + (-1,)): the target slices Shape(x)[0:1] (the batch), which the
    Shape rule now sees does not read the channels (legacy MHA targets slice like this)."""
    from gpp_onnx.samples import GraphBuilder

    b = GraphBuilder((1, 3, 6, 6), seed=0)
    x = b.act(b.conv("input", 16), "Relu")
    size = b.op("Shape", [x], (4,))
    batch = b.op("Slice", [size, b.const(np.array([0])), b.const(np.array([1]))], (1,))
    target = b.op("Concat", [batch, b.const(np.array([-1]))], (2,), axis=0)
    model = b.build(b.gemm(b.op("Reshape", [x, target], (1, 16 * 36)), 4))
    (group,) = [g for g in analyze_model(normalize(model)).groups if g.width == 16]
    assert group.prunable, group.reason
    assert_pruned_equals_masked(model, tmp_path, ratio=0.5)


# -- torchvision ViT through both exporters ---------------------------------------------

VIT = dict(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
           mlp_dim=128, num_classes=10)


def _tiny_vit(path: Path, exporter: str) -> onnx.ModelProto:
    pytest.importorskip("torch")
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed")
    from adapters.pytorch import _import_torchvision, export_torch

    zoo = zoo_tool()
    shape = (1, 3, 32, 32)
    model = zoo.perturb(_import_torchvision().models.VisionTransformer(**VIT), shape)
    export_torch(model, path, shape, exporter=exporter, opset=17)
    return onnx.load(str(path))


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_vit_heads_prune_in_both_exporters(tmp_path, exporter):
    model = _tiny_vit(tmp_path / "vit.onnx", exporter)
    analysis = analyze_model(normalize(model))
    heads = [g for g in analysis.groups if g.width == VIT["num_heads"] and g.prunable]
    assert len(heads) == VIT["num_layers"], [(g.key, g.reason) for g in analysis.groups]
    result = assert_pruned_equals_masked(model, tmp_path, ratio=0.5)
    assert all(len(result.plan.removed[g.key]) == 2 for g in heads)
    # MLP hidden alone left 0.797 of the params; the heads take q/k/v and out-proj too
    assert n_params(tmp_path / "pruned.onnx") / n_params(tmp_path / "model.onnx") < 0.6


# -- other attention modules, both exporters ---------------------------------------------

def _attention_net(kind: str):
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class TimmAttention(nn.Module):  # packed qkv, unbind: Split (legacy) / Slice (dynamo)
        def __init__(self, dim=32, heads=4):
            super().__init__()
            self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

        def forward(self, x):
            b, n, c = x.shape
            qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            a = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(dim=-1)
            return self.proj((a @ v).transpose(1, 2).reshape(b, n, c))

    class TorchMHA(nn.Module):  # nn.MultiheadAttention; dynamo reads Shape(k)[:2]
        def __init__(self, dim=32, heads=4):
            super().__init__()
            self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    class Net(nn.Module):
        def __init__(self, block):
            super().__init__()
            self.inp, self.block, self.head = nn.Linear(8, 32), block, nn.Linear(32, 5)

        def forward(self, x):
            h = self.inp(x)
            h = h + self.block(nn.functional.layer_norm(h, (32,)))
            return self.head(h.mean(1))

    torch.manual_seed(0)
    return Net({"timm": TimmAttention, "mha": TorchMHA}[kind]()).eval()


@pytest.mark.parametrize("kind", ["timm", "mha"])
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_attention_modules_prune_by_heads(tmp_path, kind, exporter):
    from adapters.pytorch import export_torch

    export_torch(_attention_net(kind), tmp_path / "a.onnx", (2, 6, 8), exporter=exporter)
    model = onnx.load(str(tmp_path / "a.onnx"))
    prunable = [g for g in analyze_model(normalize(model)).groups if g.prunable]
    # the heads, and the 32-wide residual stream (its LayerNorm runs over the kept ones)
    assert sorted(g.width for g in prunable) == [4, 32]
    (heads,) = [g for g in prunable if g.width == 4]
    result = assert_pruned_equals_masked(model, tmp_path, ratio=0.5)
    assert len(result.plan.removed[heads.key]) == 2
