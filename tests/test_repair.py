"""Repair after the cut: mean folding into biases and least-squares reconstruction.

The repaired model is judged by what it is for: how close its outputs stay to the
original model's on images the repair never saw. The pruned == masked invariant is
checked with the repair's weights in place, through onnxruntime.
"""
from __future__ import annotations

import numpy as np
import pytest

from gpp_onnx import surgery
from gpp_onnx.analysis import analyze_model
from gpp_onnx.config import PruneConfig
from gpp_onnx.errors import InputError
from gpp_onnx.model import normalize
from gpp_onnx.plan import kept_elements, model_digest, plan_by_ratio
from gpp_onnx.repair import bias_deltas, channel_means, reconstruct, values_to_measure
from gpp_onnx.samples import GraphBuilder
from gpp_onnx.verify import check_equivalent, run


def _net(seed=0, depthwise=False, pad_only_conv=False):
    """conv 12 -> relu -> [depthwise] -> conv 12 (or 1x1) -> relu -> pool -> conv 8 ->
    relu -> flatten -> gemm 16 -> relu -> gemm 5; positive-mean inputs so that removed
    channels carry a mean the repair has to replace."""
    b = GraphBuilder((1, 3, 8, 8), seed=seed)
    h = b.act(b.conv("input", 12), "Relu")
    if depthwise:
        h = b.act(b.conv(h, 12, groups=12), "Relu")
    h = b.act(b.conv(h, 12, k=1 if pad_only_conv else 3), "Relu")
    h = b.act(b.conv(b.pool(h), 8), "Relu")
    h = b.act(b.gemm(b.flatten(h), 16), "Relu")
    return normalize(b.build(b.gemm(h, 5)))


def _images(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3, 8, 8)).astype(np.float32)
    return x + np.linspace(0, 1, 8, dtype=np.float32)[None, None, :, None]  # spatial structure


def _cut_and_repair(model, ratio=0.5, repair="lsq", seed=0):
    analysis = analyze_model(model)
    scores = {g.key: np.random.default_rng(seed).random(g.width) for g in analysis.prunable}
    plan = plan_by_ratio(analysis, scores, ratio, model_digest(model))
    kept = kept_elements(analysis, plan)
    fit = _images(256, seed=1)
    deltas, weights = {}, {}
    if repair != "none":
        means = channel_means(model, values_to_measure(analysis, kept), [fit])
        deltas = bias_deltas(analysis, kept, means)
    if repair == "lsq":
        weights, deltas = reconstruct(analysis, kept, deltas, fit, "cpu", seed=seed)
    return analysis, kept, deltas, weights


def _output_error(model, analysis, kept, deltas, weights, images):
    pruned = surgery.cut(analysis, kept, deltas, weights)
    ref = run(model, {"input": images})[0]
    got = run(pruned, {"input": images})[0]
    return float(np.mean((got - ref) ** 2) / np.mean(ref ** 2))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lsq_repair_tracks_the_original_better_than_the_mean_repair(seed):
    model = _net(seed)
    unseen = _images(200, seed=100 + seed)
    errors = {r: _output_error(model, *_cut_and_repair(model, repair=r, seed=seed), unseen)
              for r in ("none", "bias", "lsq")}
    assert errors["lsq"] < errors["bias"] < errors["none"]
    assert errors["lsq"] < 0.9 * errors["bias"]


def test_lsq_repair_keeps_pruned_equal_to_masked():
    model = _net(3, depthwise=True)
    analysis, kept, deltas, weights = _cut_and_repair(model, ratio=0.4, seed=3)
    assert weights, "expected some layers to be refitted"
    images = _images(4, seed=9)
    pruned = surgery.cut(analysis, kept, deltas, weights)
    masked = surgery.mask(analysis, kept, deltas, weights)
    check_equivalent(run(pruned, {"input": images}), run(masked, {"input": images}))
    # the masked model really carries the new weights (it differs from the plain mask)
    plain = surgery.mask(analysis, kept)
    assert not np.allclose(run(masked, {"input": images})[0], run(plain, {"input": images})[0])


def test_lsq_refits_only_dense_convs_and_gemms_and_zeroes_removed_inputs():
    model = _net(4, depthwise=True)
    analysis, kept, _, weights = _cut_and_repair(model, ratio=0.5, seed=4)
    nodes = {n.name: n for n in analysis.view.nodes}
    for (name, index), w in weights.items():
        node = nodes[name]
        assert index == 1 and node.op_type in ("Conv", "Gemm")
        if node.op_type == "Conv":
            attrs = {a.name: a.i for a in node.attribute if a.name == "group"}
            assert attrs.get("group", 1) == 1
            assert w.shape == analysis.view.const(node.input[1]).shape
            removed = np.setdiff1d(np.arange(w.shape[1]), kept.get(node.input[0], np.arange(w.shape[1])))
            assert np.all(w[:, removed] == 0)


def test_lsq_without_enough_images_falls_back_to_the_mean_repair():
    model = _net(5)
    analysis = analyze_model(model)
    scores = {g.key: np.arange(g.width, dtype=float) for g in analysis.prunable}
    kept = kept_elements(analysis, plan_by_ratio(analysis, scores, 0.5, model_digest(model)))
    deltas = {"x": np.zeros(1)}
    weights, out = reconstruct(analysis, kept, deltas, _images(2, 0), "cpu")
    assert weights == {} and out is deltas


def test_repair_option_values():
    assert PruneConfig().checked().repair == "lsq"
    assert PruneConfig(repair=False).checked().repair == "none"
    assert PruneConfig(repair=True).checked().repair == "lsq"
    with pytest.raises(InputError, match="--repair"):
        PruneConfig(repair="magic").checked()


@pytest.mark.parametrize("mode", ["lsq", "bias", "none"])
def test_prune_reports_what_the_repair_changed(tmp_path, mode):
    import onnx

    from gpp_onnx import prune
    from gpp_onnx.config import DataOptions
    from gpp_onnx.samples import digits_cnn

    src = tmp_path / "digits.onnx"
    onnx.save(digits_cnn(0), src)
    result = prune(src, tmp_path / "small.onnx",
                   PruneConfig(ratio=0.5, criterion="l1", repair=mode, latency=False,
                               data=DataOptions("digits", per_class=8)))
    info = result.report["rounds"][0]["repair"]
    if mode == "none":
        assert info is None
    else:
        assert info["mode"] == mode and info["biases_changed"] > 0
        assert (info["layers_refitted"] > 0) == (mode == "lsq")


def test_staged_pass_gives_the_same_refit_as_a_pass_per_layer(monkeypatch):
    import gpp_onnx.repair as repair_module

    model = _net(6, depthwise=True)
    monkeypatch.setattr(repair_module, "STAGED_BYTES", 1 << 40)
    staged = _cut_and_repair(model, seed=6)
    monkeypatch.setattr(repair_module, "STAGED_BYTES", 0)
    per_layer = _cut_and_repair(model, seed=6)
    assert staged[3] and set(staged[3]) == set(per_layer[3])
    for key in staged[3]:
        np.testing.assert_allclose(staged[3][key], per_layer[3][key], rtol=1e-5, atol=1e-6)
    for key in staged[2]:
        np.testing.assert_allclose(staged[2][key], per_layer[2][key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attrs", [
    {"strides": [2, 2]},
    {"strides": [2, 3], "pads": [1, 0, 0, 2], "output_padding": [1, 2]},
    {"strides": [1, 2], "dilations": [2, 1], "pads": [2, 1, 1, 0]},
])
def test_conv_transpose_rows_times_the_flipped_kernel_give_its_output(attrs):
    """The repair's patch rows of a ConvTranspose input, multiplied by the weight as the
    equivalent Conv's, reproduce onnxruntime's ConvTranspose at the sampled positions."""
    import torch
    from onnx import helper, numpy_helper

    from gpp_onnx.repair_rows import _rows_conv_transpose, as_conv_weight

    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 4, 5, 6)).astype(np.float32)
    w = rng.standard_normal((4, 5, 3, 2)).astype(np.float32)
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], **attrs)
    graph = helper.make_graph([node], "t", [helper.make_tensor_value_info("x", 1, x.shape)],
                              [helper.make_tensor_value_info("y", 1, None)],
                              [numpy_helper.from_array(w, "w")])
    y = run(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
            {"x": x})[0]
    count = y.shape[2] * y.shape[3]
    positions = np.stack([rng.choice(count, 7, replace=False) for _ in range(3)])
    conv_w = as_conv_weight(w.astype(np.float64))
    rows = _rows_conv_transpose(node, torch.from_numpy(x).double(), conv_w.shape, positions)
    got = rows.numpy() @ conv_w.reshape(5, -1).T                  # (3*7, O)
    want = y.reshape(3, 5, -1).transpose(0, 2, 1)[np.arange(3)[:, None], positions]
    np.testing.assert_allclose(got, want.reshape(-1, 5), rtol=1e-5, atol=1e-5)
    assert np.array_equal(as_conv_weight(as_conv_weight(w)), w)


def _decoder_net(seed):
    """conv 12 -> relu -> conv 12 -> relu -> ConvTranspose 8 (stride 2) -> relu -> conv 4,
    the shape of a segmentation decoder."""
    b = GraphBuilder((1, 3, 8, 8), seed=seed)
    h = b.act(b.conv("input", 12), "Relu")
    h = b.act(b.conv(h, 12), "Relu")
    h = b.act(b.conv_transpose(h, 8), "Relu")
    return normalize(b.build(b.conv(h, 4)))


@pytest.mark.parametrize("seed", [0, 1])
def test_lsq_refits_a_conv_transpose_and_tracks_the_original_better(seed):
    model = _decoder_net(seed)
    analysis, kept, deltas, weights = _cut_and_repair(model, ratio=0.5, seed=seed)
    convt = next(n for n in analysis.view.nodes if n.op_type == "ConvTranspose")
    assert (convt.name, 1) in weights
    w = weights[(convt.name, 1)]
    assert w.shape == analysis.view.const(convt.input[1]).shape
    removed = np.setdiff1d(np.arange(w.shape[0]), kept[convt.input[0]])
    assert len(removed) and np.all(w[removed] == 0)         # input channels are W's rows
    images = _images(4, seed=9)
    pruned = surgery.cut(analysis, kept, deltas, weights)
    masked = surgery.mask(analysis, kept, deltas, weights)
    check_equivalent(run(pruned, {"input": images}), run(masked, {"input": images}))
    unseen = _images(200, seed=100 + seed)
    errors = {r: _output_error(model, *_cut_and_repair(model, repair=r, seed=seed), unseen)
              for r in ("bias", "lsq")}
    assert errors["lsq"] < 0.9 * errors["bias"]


@pytest.mark.parametrize("attrs", [
    {"pads": [1, 1, 1, 1]},
    {"strides": [2, 2], "pads": [1, 0, 2, 1]},
    {"strides": [1, 2], "dilations": [2, 1], "pads": [2, 1, 2, 0]},
])
def test_conv_rows_are_the_unfolded_patches_at_the_sampled_positions(attrs):
    """The repair gathers only the sampled patches of a Conv input; they equal the columns
    of torch's full unfold at those positions, exactly."""
    import torch
    import torch.nn.functional as F
    from onnx import helper

    from gpp_onnx.ops.conv import torch_pads
    from gpp_onnx.repair_rows import _rows_conv

    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 2], **attrs)
    x = torch.from_numpy(np.random.default_rng(6).standard_normal((3, 4, 9, 8)))
    cols = F.unfold(F.pad(x, torch_pads(node, 2)), (3, 2),
                    dilation=attrs.get("dilations", 1), stride=attrs.get("strides", 1))
    positions = np.stack([np.random.default_rng(i).choice(cols.shape[2], 5, replace=False)
                          for i in range(3)])
    want = cols.permute(0, 2, 1)[torch.arange(3)[:, None], torch.as_tensor(positions)]
    got = _rows_conv(node, x, (7, 4, 3, 2), positions)
    assert torch.equal(got, want.reshape(-1, cols.shape[1]))


def test_a_bias_shared_by_name_takes_its_repair_in_each_consumer():
    """Two convs read one bias initializer (a pruned and fine-tuned round can leave byte-
    identical biases that are shared again); both consume a cut group and are cut. The
    bias fold read the copy's new name and stopped with an internal error."""
    from conftest import feeds_for, rel_err, run_model

    b = GraphBuilder((1, 3, 8, 8), seed=1)
    x = b.act(b.conv("input", 8), "Relu")
    left, right = b.conv(x, 6), b.conv(x, 6)
    shared = next(n for n in b.nodes if n.output[0] == left).input[2]
    next(n for n in b.nodes if n.output[0] == right).input[2] = shared
    y = b.act(b.binary("Add", left, right), "Relu")
    model = normalize(b.build(b.gemm(b.flatten(b.gap(y)), 4)))
    analysis = analyze_model(model)
    rng = np.random.default_rng(0)
    scores = {g.key: rng.random(g.width) for g in analysis.prunable}
    kept = kept_elements(analysis, plan_by_ratio(analysis, scores, 0.5, model_digest(model)))
    images = rng.standard_normal((16, 3, 8, 8)).astype(np.float32)
    means = channel_means(model, values_to_measure(analysis, kept), [images])
    deltas = bias_deltas(analysis, kept, means)
    assert len(deltas) >= 2
    feeds = feeds_for(model, batch=3)
    pruned = surgery.cut(analysis, kept, deltas)
    masked = surgery.mask(analysis, kept, deltas)
    assert rel_err(run_model(pruned, feeds), run_model(masked, feeds)) < 1e-5


def test_large_activations_are_repaired_in_smaller_batches_with_the_same_fit(monkeypatch):
    """One batch of the target pass holds every fitted layer's output: with a budget of
    about one image's activations the batches shrink, and the fit stays the same."""
    import gpp_onnx.repair as repair_module
    from gpp_onnx.torch_backend import OnnxModule

    model = _net(6)
    whole = _cut_and_repair(model, seed=6)
    sizes = []
    run = OnnxModule.run

    def spy(self, inputs, outputs=None):
        sizes.append(len(next(iter(inputs.values()))))
        return run(self, inputs, outputs)

    monkeypatch.setattr(OnnxModule, "run", spy)
    monkeypatch.setattr(repair_module, "STAGED_BYTES", 0)      # every pass through run
    monkeypatch.setattr(repair_module, "BATCH_BYTES", 3 * 12 * 8 * 8 * 4 * 3)
    small = _cut_and_repair(model, seed=6)
    assert sizes and max(sizes) <= 3 < 64                        # 64: the default batch
    assert whole[3] and set(whole[3]) == set(small[3])
    for key in whole[3]:
        np.testing.assert_allclose(small[3][key], whole[3][key], rtol=1e-4, atol=1e-5)


def test_the_mean_probe_runs_fewer_images_where_the_maps_are_large(tmp_path, monkeypatch):
    """The mean probe exposes every measured map: where a batch of them would pass the
    budget it runs fewer images at a time, and the cut and its repair stay the same."""
    import onnx

    import gpp_onnx.repair as repair_module
    from gpp_onnx import prune
    from gpp_onnx.config import DataOptions
    from gpp_onnx.samples import digits_cnn

    src = tmp_path / "digits.onnx"
    onnx.save(digits_cnn(0), src)
    config = PruneConfig(ratio=0.5, criterion="l1", repair="bias", latency=False,
                         data=DataOptions("digits", per_class=8))
    whole = prune(src, tmp_path / "a.onnx", config)
    sizes, means = [], repair_module.channel_means

    def spy(model, values, batches):
        return means(model, values, (sizes.append(len(x)) or x for x in batches))

    monkeypatch.setattr(repair_module, "channel_means", spy)
    monkeypatch.setattr(repair_module, "BATCH_BYTES", 8 * 4 * 8 * 8 * 4)  # ~4 images' maps
    small = prune(src, tmp_path / "b.onnx", config)
    assert sizes and max(sizes) < 64
    x = np.random.default_rng(0).random((5, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(small.model, {"input": x})[0],
                               run(whole.model, {"input": x})[0], rtol=1e-5, atol=1e-6)
