"""Normalising on the skeleton (weights as headers, copied in once at the end) gives the
model the long way gives, byte for byte; where folding would read a weight it is not used."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import feeds_for, run_model
from gpp_onnx import model as model_io, skeleton
from gpp_onnx.samples import GraphBuilder, sample_cnn


def _identity_weights() -> onnx.ModelProto:
    """Exporter style: convs read their (large) weights through Identity, one a chain."""
    b = GraphBuilder((1, 3, 16, 16), seed=0)
    x = b.act(b.conv("input", 64), "Relu")
    alias = b.op("Identity", [b.weight(64, 64, 3, 3)], (64, 64, 3, 3))
    chain = b.op("Identity", [alias], (64, 64, 3, 3))
    y = b.op("Conv", [x, alias], (1, 64, 16, 16), kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    y = b.op("Conv", [b.act(y, "Relu"), chain], (1, 64, 16, 16), kernel_shape=[3, 3],
             pads=[1, 1, 1, 1])
    return b.build(b.gemm(b.flatten(b.gap(b.act(y, "Relu"))), 3))


def _shuffle_and_constants() -> onnx.ModelProto:
    """A channel shuffle (becomes a Gather) and a weight held in a Constant node."""
    b = GraphBuilder((1, 3, 16, 16), seed=0)
    x = b.shuffle(b.act(b.bn(b.conv("input", 64)), "Relu"), 4)
    model = b.build(b.gemm(b.reshape_flatten(b.gap(b.conv(x, 64))), 10))
    first = model.graph.initializer[0]
    model.graph.node.insert(0, onnx.helper.make_node("Constant", [], [first.name],
                                                     value=first))
    del model.graph.initializer[0]
    return model


def _folds_arithmetic_on_a_weight() -> onnx.ModelProto:
    """Weight normalisation left in the graph: Mul(weight, scale) is computed by folding."""
    b = GraphBuilder((1, 3, 16, 16), seed=0)
    x = b.act(b.conv("input", 64), "Relu")
    w = b.op("Mul", [b.weight(64, 64, 3, 3), b.const(np.float32(0.5), "s")], (64, 64, 3, 3))
    y = b.op("Conv", [x, w], (1, 64, 16, 16), kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    return b.build(b.gemm(b.flatten(b.gap(y)), 3))


@pytest.mark.parametrize("make", [_identity_weights, _shuffle_and_constants, sample_cnn])
def test_skeleton_normalisation_is_the_long_way_byte_for_byte(make):
    loaded = model_io.accept(make()).model
    assert skeleton.strip(loaded)[1]                      # there are weights to strip
    quick = skeleton.normalized(loaded, model_io._normalize)
    assert quick is not None
    assert quick.SerializeToString() == model_io._normalize(loaded).SerializeToString()
    feeds = feeds_for(loaded)
    assert all(np.array_equal(a, b) for a, b in zip(run_model(loaded, feeds),
                                                    run_model(quick, feeds)))


def test_folding_that_reads_a_weight_takes_the_long_way():
    loaded = model_io.accept(_folds_arithmetic_on_a_weight()).model
    assert skeleton.normalized(loaded, model_io._normalize) is None
    normalized = model_io.normalize(loaded)
    assert not any(n.op_type == "Mul" for n in normalized.graph.node)   # folded
    feeds = feeds_for(loaded)
    np.testing.assert_allclose(run_model(normalized, feeds)[0], run_model(loaded, feeds)[0],
                               rtol=1e-5, atol=1e-6)


def test_restore_gives_back_the_original_tensors():
    model = _identity_weights()
    skel, stripped = skeleton.strip(model)
    assert all(not t.raw_data for t in skel.graph.initializer if t.name in stripped)
    skeleton.restore(skel, stripped)
    assert skel.SerializeToString() == model.SerializeToString()
