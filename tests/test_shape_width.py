"""A Reshape whose computed target re-reads the tensor's own channel count through
Shape -> Gather -> Unsqueeze -> Concat (PyTorch's ``y.view(T * b, y.size(2))`` in CRNN
heads): the channels stay prunable, the shape follows the cut at run time."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from conftest import assert_pruned_equals_masked, run_model
from gpp_onnx import prune
from gpp_onnx.analysis import analyze_model
from gpp_onnx.model import normalize
from gpp_onnx.samples import GraphBuilder

SEQ, HIDDEN = 6, 8


def _i64(*values):
    return np.array(values, dtype=np.int64)


def _dim(b, x, d):
    """Unsqueeze(Gather(Shape(x), d)) -> a one-entry shape piece."""
    g = b.op("Gather", [b.op("Shape", [x], (len(b.shapes[x]),)), b.const(_i64(d)[0])], (),
             axis=0)
    return g, b.op("Unsqueeze", [g, b.const(_i64(0))], (1,))


def crnn_head(width_feeds_elsewhere: bool = False):
    """conv -> (SEQ, N, C) -> bi-LSTM -> (SEQ, N, 2H) -> view(SEQ * N, size(2)) -> Gemm."""
    b = GraphBuilder((1, 3, 8, 2 * SEQ), seed=3, dynamic_batch=False)
    x = b.act(b.conv("input", 8, stride=2), "Relu")
    x = b.op("MaxPool", [x], (1, 8, 1, SEQ), kernel_shape=[4, 1], strides=[4, 1])
    y = b.recurrent(b.to_sequence(x), "LSTM", hidden=HIDDEN, direction="bidirectional")[0]
    merged = b.merge_directions(y)                               # (SEQ, N, 2H)
    t, _ = _dim(b, merged, 0)
    n, _ = _dim(b, merged, 1)
    width, piece = _dim(b, merged, 2)
    rows = b.op("Unsqueeze", [b.op("Mul", [t, n], ()), b.const(_i64(0))], (1,))
    target = b.op("Concat", [rows, piece], (2,), axis=0)
    flat = b.op("Reshape", [merged, target], (SEQ, 2 * HIDDEN))
    out = b.gemm(flat, 5)
    if width_feeds_elsewhere:  # the channel count also scales the logits: not a shape
        scale = b.op("Cast", [width], (), to=1)
        out = b.op("Div", [out, scale], b.shapes[out])
    model = b.build(out)
    # a free image width, as text recognizers have: after the strided conv the sequence
    # length is floor((W - 1) / 2) + 1, shape inference cannot cancel it out of the
    # Reshape(0, 0, -1) width, and the Shape -> Gather pieces stay computed at run time
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_param = "W"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "rows"
    return model


def _lstm_group(model):
    analysis = analyze_model(normalize(model))
    lstm = next(n for n in model.graph.node if n.op_type == "LSTM")
    return next(g for g in analysis.groups if lstm.output[0] in g.values)


def test_own_width_reshape_keeps_the_hidden_units_prunable(tmp_path):
    model = crnn_head()
    assert _lstm_group(model).prunable
    result = assert_pruned_equals_masked(model, tmp_path, ratio=0.5, round_to=1,
                                         latency=False)
    lstm = next(n for n in model.graph.node if n.op_type == "LSTM")
    assert len(result.plan.removed[lstm.output[0]]) == HIDDEN // 2


def test_pruned_own_width_reshape_follows_other_widths(tmp_path):
    model = crnn_head()
    small = prune(model, ratio=0.5, round_to=1, latency=False).model
    masked = prune(model, ratio=0.5, round_to=1, latency=False, mask_only=True).model
    feeds = {"input": np.random.default_rng(0).standard_normal((1, 3, 8, 18), np.float32)}
    got, ref = run_model(small, feeds), run_model(masked, feeds)
    assert got[0].shape == (9, 5)           # 9 steps: another image width
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-4, atol=1e-5)
    gemm = next(n for n in small.graph.node if n.op_type == "Gemm")
    init = {t.name: t for t in small.graph.initializer}
    assert list(init[gemm.input[1]].dims) == [5, HIDDEN]   # 2 directions x HIDDEN / 2


def test_channel_count_used_as_a_number_stays_blocked():
    group = _lstm_group(crnn_head(width_feeds_elsewhere=True))
    assert not group.prunable
    assert "read by Shape" in group.reason
    # the unpruned graph is valid as built (the check above is not about a broken model)
    model = crnn_head(width_feeds_elsewhere=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 2 * SEQ)).astype(np.float32)
    assert sess.run(None, {"input": x})[0].shape == (SEQ, 5)


# -- Resize whose sizes re-read the resized tensor's own channel count ------------------

def _unet_resize(own: bool, dynamo_form: bool = False):
    """conv -> pool -> conv -> Resize back to the skip's size -> Concat with the skip ->
    conv: PyTorch's ``F.interpolate(x, size=skip.shape[2:])`` writes the sizes as
    ``Concat(Shape(x)[0:2], hw)``. ``own=False`` reads N, C from another tensor of the
    same width instead (that C does not follow a cut of x)."""
    b = GraphBuilder((1, 3, 8, 8), seed=2)
    skip = b.act(b.conv("input", 8), "Relu")
    deep = b.act(b.conv(b.pool(skip), 8), "Relu")                 # (1, 8, 4, 4)
    other = b.act(b.conv(b.pool(skip), 8), "Relu")
    src = deep if own else other
    if dynamo_form:
        nc = b.op("Shape", [src], (2,), start=0, end=2)
    else:
        nc = b.op("Slice", [b.op("Shape", [src], (4,)), b.const(_i64(0)), b.const(_i64(2)),
                            b.const(_i64(0))], (2,))
    sizes = b.op("Concat", [nc, b.const(_i64(8, 8))], (4,), axis=0)
    up = b.op("Resize", [deep, "", "", sizes], (1, 8, 8, 8), mode="linear")
    y = b.act(b.conv(b.concat([up, skip]), 6), "Relu")
    if not own:
        y = b.binary("Add", y, b.conv(b.op("Resize", [other, "", b.const(
            np.array([1, 1, 2, 2], np.float32))], (1, 8, 8, 8), mode="nearest"), 6))
    return b.build(b.gemm(b.flatten(b.gap(y)), 3)), deep


@pytest.mark.parametrize("dynamo_form", [False, True])
def test_resize_sizes_from_own_shape_follow_the_cut(dynamo_form, tmp_path):
    model, value = _unet_resize(own=True, dynamo_form=dynamo_form)
    analysis = analyze_model(normalize(model))
    deep = next(g for g in analysis.groups if value in g.values)
    assert deep.prunable, deep.reason
    result = assert_pruned_equals_masked(model, tmp_path, ratio=0.5, criterion="l1")
    assert len(result.plan.removed[deep.key]) == 4


def test_resize_sizes_read_from_another_tensor_keep_the_channels():
    model, value = _unet_resize(own=False)
    analysis = analyze_model(normalize(model))
    deep = next(g for g in analysis.groups if value in g.values)
    assert not deep.prunable and "Resize" in deep.reason
