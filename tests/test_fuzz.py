"""Random CNN graphs (hypothesis): pruned == masked original, for any mix of blocks."""
from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import assert_pruned_equals_masked
from gpp_onnx.samples import GraphBuilder

ACTS = ["Relu", "Sigmoid", "HardSwish", "Tanh", "LeakyRelu", "PRelu", "Clip"]


def _even(n: int) -> int:
    return max(2, n - n % 2)


def block_conv(b, x, w, act):
    return b.act(b.conv(x, w), act)


def block_bn(b, x, w, act):
    return b.act(b.bn(b.conv(x, w, k=1)), act)


def block_residual(b, x, w, act):
    c = b.channels(x)
    return b.act(b.binary("Add", x, b.conv(b.act(b.conv(x, w), act), c)), act)


def block_inception(b, x, w, act):
    return b.concat([b.conv(x, w, k=1), b.conv(b.conv(x, w, k=1), w + 1),
                     b.conv(b.pool(b.pad(x), k=3, stride=1), 2, k=1)])


def block_depthwise(b, x, w, act):
    c = b.channels(x)
    return b.act(b.conv(b.act(b.conv(x, c, groups=c), act), w, k=1), act)


def block_se(b, x, w, act):
    return b.se(b.act(b.conv(x, w), act), reduction=2)


def block_shuffle(b, x, w, act):
    w = _even(w)
    left, right = b.split(b.act(b.conv(x, 2 * w, k=1), act), [w, w])
    right = b.act(b.conv(b.conv(right, w, groups=w), w, k=1), act)
    return b.shuffle(b.concat([left, right]), 2)


def block_grouped(b, x, w, act):
    return b.act(b.conv(b.conv(x, 2 * w, k=1), 2 * w, groups=2), act)


def block_slices(b, x, w, act):
    x = b.act(b.conv(x, 2 * w), act)
    return b.concat([b.conv(b.slice(x, 0, w), w, k=1), b.slice(x, w, 2 * w)])


def block_norm(b, x, w, act):
    return b.channel_const("Mul", b.act(b.instance_norm(b.conv(x, w)), act))


def block_layer_norm(b, x, w, act):
    """A LayerNorm over the channels, written out (older exporters) or as the op on
    channels-last (ConvNeXt), after a residual add that ties it to the block's input."""
    y = b.binary("Add", x, b.conv(x, b.channels(x)))
    y = b.layer_norm(y) if w % 2 else b.layer_norm_op(y)
    return b.act(b.conv(y, w, k=1), act)


BLOCKS = [block_conv, block_bn, block_residual, block_inception, block_depthwise, block_se,
          block_shuffle, block_grouped, block_slices, block_norm, block_layer_norm]


def head_gap(b, x):
    return b.gemm(b.flatten(b.gap(x)), 4)


def head_flatten(b, x):
    return b.gemm(b.act(b.gemm(b.flatten(b.pool(x)), 6), "Relu"), 4)


def head_reshape(b, x):
    return b.gemm(b.reshape_flatten(b.pool(x, "AveragePool")), 4)


def head_channels_last(b, x):
    """tf2onnx's classifier: GAP, a Reshape (N, C, 1, 1) -> (N, 1, 1, C), a flatten."""
    g = b.gap(x)
    c = b.shapes[g][1]
    t = b.op("Reshape", [g, b.const(np.array([-1, 1, 1, c], dtype=np.int64))], (1, 1, 1, c))
    flat = b.op("Reshape", [t, b.const(np.array([-1, c], dtype=np.int64))], (1, c))
    return b.gemm(flat, 4)


HEADS = [head_gap, head_flatten, head_reshape, head_channels_last]


@st.composite
def cnn_graphs(draw):
    b = GraphBuilder((1, 3, 8, 8), seed=draw(st.integers(0, 2 ** 16)))
    x = b.act(b.conv("input", draw(st.integers(2, 8))), "Relu")
    for _ in range(draw(st.integers(1, 4))):
        block = draw(st.sampled_from(BLOCKS))
        x = block(b, x, draw(st.integers(2, 8)), draw(st.sampled_from(ACTS)))
    return b.build(draw(st.sampled_from(HEADS))(b, x))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model=cnn_graphs(), ratio=st.sampled_from([0.25, 0.5, 0.75]),
       criterion=st.sampled_from(["l1", "l2", "random"]))
def test_random_graphs_pruned_equals_masked(model, ratio, criterion, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    assert_pruned_equals_masked(model, tmp, expect_change=False, ratio=ratio, criterion=criterion)


@settings(max_examples=20, deadline=None)
@given(model=cnn_graphs(), ratio=st.sampled_from([0.25, 0.5, 0.75]), seed=st.integers(0, 99))
def test_random_graphs_repaired_pruned_equals_repaired_masked(model, ratio, seed):
    """The invariant with the least-squares repair's new weights and biases on both sides."""
    from conftest import assert_repaired_pruned_equals_masked

    assert_repaired_pruned_equals_masked(model, ratio, seed)


@st.composite
def fixed_batch_graphs(draw):
    """The graphs above as a tracing exporter writes them for one example: the input fixes
    batch 1 and every Reshape target has the 1 written in (the dynamo exporter's form,
    with or without ``allowzero``)."""
    from onnx import helper, numpy_helper

    b = GraphBuilder((1, 3, 8, 8), seed=draw(st.integers(0, 2 ** 16)), dynamic_batch=False)
    x = b.act(b.conv("input", draw(st.integers(2, 8))), "Relu")
    for _ in range(draw(st.integers(1, 3))):
        block = draw(st.sampled_from(BLOCKS))
        x = block(b, x, draw(st.integers(2, 8)), draw(st.sampled_from(ACTS)))
    model = b.build(draw(st.sampled_from(HEADS))(b, x))
    inits = {t.name: t for t in model.graph.initializer}
    allowzero = draw(st.booleans())
    for node in model.graph.node:
        if node.op_type == "Reshape" and node.input[1] in inits:
            target = numpy_helper.to_array(inits[node.input[1]]).copy()
            if target[0] == -1:
                target[0] = 1
                inits[node.input[1]].CopyFrom(numpy_helper.from_array(target, node.input[1]))
                if allowzero:
                    node.attribute.append(helper.make_attribute("allowzero", 1))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    return model


@settings(max_examples=25, deadline=None)
@given(model=fixed_batch_graphs())
def test_random_fixed_batch_graphs_are_freed_and_compute_what_they_did(model):
    """Normalising frees the batch, and the freed model on 3 images computes what the file
    as written computes on each image alone."""
    import numpy as np

    from conftest import rel_err, run_model
    from gpp_onnx.model import normalize

    freed = normalize(model)
    assert freed.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    got = run_model(freed, {"input": x})
    want = [np.concatenate(parts) for parts in
            zip(*(run_model(model, {"input": x[i:i + 1]}) for i in range(3)))]
    assert rel_err(got, want) < 1e-5
