"""Every supported graph family: the pruned model equals the masked original (fp32, ORT)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import assert_pruned_equals_masked, feeds_for, run_model
from gpp_onnx import prune, PruneConfig
from gpp_onnx.analysis import analyze_model
from gpp_onnx.model import normalize
from gpp_onnx.samples import GraphBuilder


def _head(b: GraphBuilder, x: str, classes: int = 5) -> onnx.ModelProto:
    return b.build(b.gemm(b.flatten(b.gap(x)), classes))


def plain(b):
    x = b.act(b.bn(b.conv("input", 16)), "Relu")
    return _head(b, b.act(b.conv(x, 16), "LeakyRelu", alpha=0.1))


def residual(b):
    x = b.act(b.conv("input", 16), "Relu")
    y = b.conv(b.act(b.conv(x, 8), "Relu"), 16)
    return _head(b, b.act(b.binary("Add", x, y), "Relu"))


def residual_sub(b):
    x = b.act(b.conv("input", 12), "Relu")
    return _head(b, b.binary("Sub", b.conv(x, 12), x))


def inception(b):
    x = b.act(b.conv("input", 16), "Relu")
    branches = [b.conv(x, 8, k=1), b.conv(b.conv(x, 6, k=1), 10),
                b.conv(b.conv(b.conv(x, 4, k=1), 6), 6), b.conv(b.pool(b.pad(x), k=3, stride=1), 4, k=1)]
    return _head(b, b.act(b.concat(branches), "Relu"))


def depthwise(b):
    x = b.act(b.conv("input", 16, k=1), "Clip")
    x = b.act(b.conv(x, 16, groups=16), "HardSwish")
    return _head(b, b.conv(x, 12, k=1))


def depthwise_multiplier(b):
    x = b.act(b.conv("input", 8, k=1), "Relu")
    return _head(b, b.conv(b.conv(x, 16, groups=8), 12, k=1))


def grouped(b):
    x = b.act(b.conv("input", 16), "Relu")
    return _head(b, b.conv(b.act(b.conv(x, 24, groups=4), "Relu"), 8))


def squeeze_excitation(b):
    x = b.act(b.conv("input", 16), "Sigmoid")
    return _head(b, b.conv(b.se(x), 8, k=1))


def channel_shuffle(b):
    x = b.act(b.conv("input", 16), "Relu")
    left, right = b.split(x, [8, 8])
    right = b.act(b.conv(b.conv(right, 8, k=1), 8, groups=8), "Relu")
    return _head(b, b.conv(b.shuffle(b.concat([left, right]), 2), 8, k=1))


def slice_branches(b):
    x = b.act(b.conv("input", 16), "Relu")
    return _head(b, b.concat([b.conv(b.slice(x, 0, 6), 4), b.conv(b.slice(x, 6, 16), 4)]))


def flatten_gemm(b):
    x = b.pool(b.act(b.conv("input", 8), "Relu"))
    x = b.act(b.gemm(b.flatten(x), 20), "Relu")
    return b.build(b.gemm(x, 4))


def reshape_gemm(b):
    x = b.pool(b.act(b.conv("input", 8), "Tanh"))
    return b.build(b.gemm(b.reshape_flatten(x), 4))


def norms_and_slopes(b):
    x = b.act(b.instance_norm(b.conv("input", 12)), "PRelu")
    x = b.channel_const("Mul", b.channel_const("Add", x))
    return _head(b, b.act(b.conv(x, 10), "Erf"))


def resize_and_transpose_conv(b):
    x = b.act(b.conv("input", 12, stride=2), "Relu")
    x = b.resize(b.conv_transpose(x, 10), 1)
    return _head(b, b.conv(b.act(x, "Sigmoid"), 6))


def reduce_mean_matmul(b):
    x = b.act(b.conv("input", 12), "Relu")
    x = b.op("Flatten", [b.reduce_mean(x)], (1, 12), axis=1)
    b.shapes[x] = (1, 12)
    return b.build(b.matmul(b.act(b.matmul(x, 16), "Relu"), 3))


FAMILIES = [plain, residual, residual_sub, inception, depthwise, depthwise_multiplier, grouped,
            squeeze_excitation, channel_shuffle, slice_branches, flatten_gemm, reshape_gemm,
            norms_and_slopes, resize_and_transpose_conv, reduce_mean_matmul]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("criterion", ["l1", "random"])
def test_family_pruned_equals_masked(family, criterion, tmp_path):
    model = family(GraphBuilder((1, 3, 16, 16), seed=3))
    result = assert_pruned_equals_masked(model, tmp_path, ratio=0.5, criterion=criterion)
    assert result.plan.removed_channels > 0
    assert result.after.macs < result.before.macs


def test_sample_cnn_every_group_prunable_but_io(sample_model, tmp_path):
    analysis = analyze_model(normalize(sample_model))
    blocked = {g.key for g in analysis.groups if not g.prunable}
    assert blocked == {"input", analysis.view.output_names[0]}
    assert_pruned_equals_masked(sample_model, tmp_path, ratio=0.5)


def test_conv_chain_matches_hand_computed_channel_removal(tmp_path):
    """Independent reference: delete channels by hand in numpy and compare."""
    b = GraphBuilder((1, 2, 5, 5), seed=0)
    h = b.act(b.conv("input", 6, k=1), "Relu")
    model = b.build(b.conv(h, 3, k=1))
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    result = prune(src, tmp_path / "p.onnx", PruneConfig(ratio=0.5, round_to=1, latency=False))
    removed = list(result.plan.removed["conv1"])
    w1, b1, w2, b2 = (numpy_helper.to_array(t) for t in model.graph.initializer)
    keep = [c for c in range(6) if c not in removed]
    x = feeds_for(model)["input"]
    hidden = np.maximum(np.einsum("oc,nchw->nohw", w1[keep, :, 0, 0], x)
                        + b1[keep, None, None], 0)
    expected = np.einsum("oc,nchw->nohw", w2[:, keep, 0, 0], hidden) + b2[:, None, None]
    got = run_model(tmp_path / "p.onnx", {"input": x})[0]
    assert len(removed) == 3
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_ratio_zero_changes_nothing(sample_model, tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(sample_model, src)
    result = prune(src, tmp_path / "p.onnx", PruneConfig(ratio=0.0, latency=False))
    feeds = feeds_for(sample_model)
    assert result.plan.removed_channels == 0
    np.testing.assert_allclose(run_model(tmp_path / "p.onnx", feeds)[0],
                               run_model(src, feeds)[0], rtol=1e-5, atol=1e-6)


def test_single_channel_map_with_lower_rank_broadcast_constant(tmp_path):
    """A 1-channel map plus a (W,) constant: the constant broadcasts, it is not per-channel."""
    b = GraphBuilder((1, 3, 8, 8), seed=0)
    x = b.conv(b.act(b.conv("input", 6), "Relu"), 1, k=1)
    x = b.op("Add", [x, b.const(np.linspace(0, 1, 8).astype(np.float32))], (1, 1, 8, 8))
    model = b.build(b.gemm(b.flatten(b.act(x, "Relu")), 3))
    result = assert_pruned_equals_masked(model, tmp_path, ratio=0.5)
    assert result.plan.removed["conv1"] and not result.plan.removed.get("conv3")


@pytest.mark.parametrize("batch", [1, 4])
def test_macs_are_per_sample_for_gemm_and_matmul_whatever_the_batch(batch):
    """A conv's MACs are counted per sample; a Gemm's and a MatMul's were multiplied by a
    batch the input fixes."""
    from gpp_onnx.graph import GraphView
    from gpp_onnx.stats import count

    b = GraphBuilder((batch, 1, 8, 8), seed=0, dynamic_batch=False)
    x = b.act(b.conv("input", 6), "Relu")                                   # 6*9 per pixel
    seq = b.op("Reshape", [x, b.const(np.array([batch, 6, 64], dtype=np.int64))],
               (batch, 6, 64))
    seq = b.matmul(seq, 5)                                                  # 6 rows of 64x5
    model = b.build(b.gemm(b.op("Reshape", [seq, b.const(np.array([batch, 30],
                                                                    dtype=np.int64))],
                                (batch, 30)), 3))                           # 30x3
    assert count(GraphView(model)).macs == 64 * 6 * 9 + 6 * 64 * 5 + 30 * 3


def test_an_nhwc_inputs_channel_group_is_its_last_axis():
    """A channels-last input that a Transpose turns NCHW: the input's group is its one
    channel (the first conv's input channels), not its height."""
    b = GraphBuilder((1, 8, 8, 1), seed=0)
    x = b.op("Transpose", ["input"], (1, 1, 8, 8), perm=[0, 3, 1, 2])
    x = b.act(b.conv(x, 6), "Relu")
    analysis = analyze_model(b.build(b.gemm(b.flatten(b.gap(x)), 3)))
    group = next(g for g in analysis.groups if ("input", 3) in
                 {(m.value, m.axis) for m in g.members})
    assert group.width == 1 and not group.prunable


def test_a_reshape_that_only_moves_the_channels_keeps_them_apart(tmp_path):
    """tf2onnx writes the transpose to channels-last before a classifier as a Reshape
    (N, C, 1, 1) -> (N, 1, 1, C): its channels are one-to-one, not merged into one."""
    b = GraphBuilder((1, 3, 8, 8), seed=0)
    x = b.act(b.conv(b.act(b.conv("input", 8), "Relu"), 16), "Relu")
    g = b.gap(x)                                                     # (1, 16, 1, 1)
    t = b.op("Reshape", [g, b.const(np.array([-1, 1, 1, 16], dtype=np.int64))], (1, 1, 1, 16))
    flat = b.op("Reshape", [t, b.const(np.array([-1, 16], dtype=np.int64))], (1, 16))
    model = b.build(b.gemm(flat, 4))
    analysis = analyze_model(model)
    group = next(g for g in analysis.groups if (x, 1) in {(m.value, m.axis) for m in g.members})
    assert group.width == 16 and group.prunable
    assert_pruned_equals_masked(model, tmp_path, ratio=0.5)


def test_a_gather_of_one_logit_does_not_stop_the_cut(tmp_path):
    """A classifier that returns one column of its (N, C) output (``prob[:, 1]``)."""
    b = GraphBuilder((1, 3, 8, 8), seed=0)
    x = b.act(b.conv(b.act(b.conv("input", 8), "Relu"), 8), "Relu")
    logits = b.gemm(b.flatten(b.gap(x)), 2)
    model = b.build(b.op("Gather", [logits, b.const(np.array(1, dtype=np.int64))], (1,),
                         axis=1))
    result = assert_pruned_equals_masked(model, tmp_path, ratio=0.5)
    assert result.plan.removed_channels


def test_a_gather_of_one_channel_leaves_the_gated_convs_prunable(tmp_path):
    """x[:, 0] (Gather, scalar index) gating another conv's output: its (N, H, W) result
    has no channel axis, so the gated conv's group stays prunable."""
    b = GraphBuilder((1, 3, 8, 8), seed=0)
    x = b.act(b.conv("input", 8), "Relu")
    g = b.op("Gather", [b.conv(x, 4, k=1), b.const(np.array(0, dtype=np.int64))],
             (1, 8, 8), axis=1)
    gate = b.op("Unsqueeze", [b.act(g, "Sigmoid"), b.const(np.array([1], dtype=np.int64))],
                (1, 1, 8, 8))
    y = b.conv(x, 12)
    model = _head(b, b.act(b.binary("Mul", y, gate), "Relu"))
    assert analyze_model(normalize(model)).group(y).prunable
    result = assert_pruned_equals_masked(model, tmp_path, ratio=0.5)
    assert result.plan.removed[y]


def test_a_conv_weight_read_by_two_convs_is_counted_per_conv(tmp_path):
    """One weight applied twice (a recursive block): each conv cuts its own copy, so the
    printed MACs and params are the written model's and --target-macs is met."""
    from gpp_onnx.graph import GraphView
    from gpp_onnx.stats import count

    b = GraphBuilder((1, 3, 8, 8), seed=0)
    x = b.act(b.conv("input", 16), "Relu")
    w = b.weight(16, 16, 3, 3)
    for _ in range(2):
        x = b.act(b.op("Conv", [x, w], b.shapes[x], kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
    src = tmp_path / "m.onnx"
    onnx.save(_head(b, x), src)
    result = prune(src, tmp_path / "p.onnx", PruneConfig(target_macs=0.3, latency=False))
    written = count(GraphView(onnx.load(tmp_path / "p.onnx")))
    assert (result.after.macs, result.after.params) == (written.macs, written.params)
    assert written.macs <= 0.3 * result.before.macs

def _after_conv(op, shape=None, opset=17, params=(), **attrs):
    """conv1 (8 channels) -> `op` -> conv (6) -> head; `params`: the op's constant inputs."""
    def family(b):
        x = b.act(b.conv("input", 8), "Sigmoid")
        inputs = [x, *(b.const(np.asarray(p, np.float32)) for p in params)]
        y = b.op(op, inputs, shape or b.shapes[x], **attrs)
        return _head(b, b.conv(y, 6))
    family.opset = opset
    return family


def _group_norm_channels_last(b):
    """channels moved to the last axis: GroupNormalization's groups run over the height,
    its statistics over every axis from 1, the channels included."""
    x = b.act(b.conv("input", 8), "Relu")
    t = b.op("Transpose", [x], (1, 16, 16, 8), perm=[0, 2, 3, 1])
    ones, zeros = b.const(np.ones(16, np.float32)), b.const(np.zeros(16, np.float32))
    g = b.op("GroupNormalization", [t, ones, zeros], (1, 16, 16, 8), num_groups=4)
    return _head(b, b.conv(b.op("Transpose", [g], (1, 8, 16, 16), perm=[0, 3, 1, 2]), 6))


_group_norm_channels_last.opset = 21

# (id, family, whether conv1's channels may be pruned through the op)
MIXING = [
    ("depth_to_space_dcr", _after_conv("DepthToSpace", (1, 2, 32, 32), blocksize=2), False),
    ("depth_to_space_crd", _after_conv("DepthToSpace", (1, 2, 32, 32), blocksize=2, mode="CRD"), False),
    ("space_to_depth", _after_conv("SpaceToDepth", (1, 32, 8, 8), blocksize=2), False),
    ("group_norm", _after_conv("GroupNormalization", opset=21, params=(np.ones(8), np.zeros(8)),
                               num_groups=4), False),
    ("group_norm_channels_last", _group_norm_channels_last, False),
    ("lp_normalization_axis1", _after_conv("LpNormalization", axis=1), False),
    ("lp_normalization_last_axis", _after_conv("LpNormalization"), True),
    ("mvn_over_channels", _after_conv("MeanVarianceNormalization", opset=13, axes=[1, 2, 3]), False),
    ("mvn_per_channel", _after_conv("MeanVarianceNormalization", opset=13, axes=[0, 2, 3]), True),
    ("hardmax_13_axis1", _after_conv("Hardmax", opset=13, axis=1), False),
    ("hardmax_11_coerced_from_axis1", _after_conv("Hardmax", opset=11), False),
    ("hardmax_13_last_axis", _after_conv("Hardmax", opset=13), True),
    ("lp_pool", _after_conv("LpPool", (1, 8, 8, 8), kernel_shape=[2, 2], strides=[2, 2], p=3), True),
    ("global_lp_pool", _after_conv("GlobalLpPool", (1, 8, 1, 1)), True),
    ("celu", _after_conv("Celu", alpha=0.5), True),
    ("shrink", _after_conv("Shrink", lambd=0.6, bias=0.1), True),
    ("thresholded_relu", _after_conv("ThresholdedRelu", alpha=0.6), True),
    ("reduce_log_sum_over_channels", _after_conv("ReduceLogSum", (1, 1, 16, 16), opset=13,
                                                 axes=[1]), True),
]


@pytest.mark.parametrize("family, prunable", [m[1:] for m in MIXING], ids=[m[0] for m in MIXING])
def test_channel_mixing_ops_keep_channels_and_pruned_equals_masked(family, prunable, tmp_path):
    """Ops whose outputs mix channels (DepthToSpace / SpaceToDepth move them into space,
    GroupNormalization, and Lp / mean-variance normalization and Hardmax over the channel
    axis, take statistics across them) keep conv1's channels; the per-channel ones tie
    them (a ReduceLogSum over the channels reduces over the kept ones). Either way the
    pruned model equals the masked original."""
    model = family(GraphBuilder((1, 3, 16, 16), seed=3, opset=family.opset))
    analysis = analyze_model(model)
    group = next(g for g in analysis.groups if g.key == "conv1")
    assert group.prunable == prunable, group.reason
    result = assert_pruned_equals_masked(model, tmp_path, ratio=0.5, criterion="l1")
    assert result.plan.removed_channels > 0 and bool(result.plan.removed.get("conv1")) == prunable


def test_a_cut_that_unshares_a_weight_into_more_params_says_so(tmp_path):
    """One 4x4 conv weight read by two convs: a cut that leaves their copies different holds
    more params than the input. The run says why, not 'nothing was cut'."""
    from gpp_onnx.graph import GraphView
    from gpp_onnx.stats import count

    b = GraphBuilder((1, 3, 8, 8), seed=0)
    x = b.act(b.conv(b.act(b.conv("input", 2), "Relu"), 4), "Relu")
    w = b.weight(4, 4, 3, 3)
    x = b.act(b.op("Conv", [x, w, b.vector(4)], b.shapes[x], kernel_shape=[3, 3],
                   pads=[1, 1, 1, 1]), "Relu")
    x = b.op("Conv", [x, w], b.shapes[x], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    model = _head(b, x)
    shared_out = [n.output[0] for n in model.graph.node if n.op_type == "Conv"][2:]
    res = prune(model, tmp_path / "p.onnx", PruneConfig(ratio=0.25, round_to=1, latency=False,
                                                        ignore=shared_out))
    written = count(GraphView(onnx.load(tmp_path / "p.onnx")))
    assert res.plan.removed_channels and written.params > res.before.params
    assert any("gets a copy in each" in w for w in res.report["warnings"])
    assert not any("nothing was cut" in w for w in res.report["warnings"])
