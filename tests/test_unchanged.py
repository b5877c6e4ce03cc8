"""The input model == normalised model check: proven from the graphs where normalising only
folded constants' Identity nodes, run in onnxruntime otherwise (a normalisation that
changes what the model computes must still be caught)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import feeds_for, run_model
from gpp_onnx import PruneConfig, model as model_io, pipeline, prune, verify
from gpp_onnx.compat import same_computation
from gpp_onnx.errors import VerificationError
from gpp_onnx.graph import GraphView
from gpp_onnx.samples import GraphBuilder, sample_cnn


def _with_identity() -> onnx.ModelProto:
    """A conv net whose second conv reads its weight through Identity (as exporters do)."""
    b = GraphBuilder((1, 3, 8, 8), seed=0)
    x = b.act(b.conv("input", 8), "Relu")
    alias = b.op("Identity", [b.weight(8, 8, 3, 3)], (8, 8, 3, 3))
    y = b.op("Conv", [x, alias], (1, 8, 8, 8), kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    return b.build(b.gemm(b.flatten(b.gap(b.act(y, "Relu"))), 3))


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


@pytest.mark.parametrize("arrays", [False, True])
def test_identity_folding_is_proven_and_really_computes_the_same(arrays):
    model = _with_identity()
    normalized = model_io.normalize(model)
    assert not any(n.op_type == "Identity" for n in normalized.graph.node)  # it folded
    lookup = GraphView(normalized).const if arrays else None
    assert same_computation(model, normalized, lookup)
    feeds = feeds_for(model)
    assert all(np.array_equal(a, b) for a, b in zip(run_model(model, feeds),
                                                    run_model(normalized, feeds)))


@pytest.mark.parametrize("arrays", [False, True])
def test_a_changed_weight_is_not_the_same(arrays):
    model = _with_identity()
    normalized = model_io.normalize(model)
    for name in (normalized.graph.initializer[0].name,   # a plain weight
                 next(n.input[1] for n in model.graph.node if n.op_type == "Conv"
                      and n.input[1] not in {t.name for t in model.graph.initializer})):
        changed = _copy(normalized)
        t = next(t for t in changed.graph.initializer if t.name == name)
        value = numpy_helper.to_array(t).copy()
        value.flat[0] += 1.0
        t.CopyFrom(numpy_helper.from_array(value, name))
        lookup = GraphView(changed).const if arrays else None
        assert not same_computation(model, changed, lookup)


def test_changed_nodes_are_not_the_same():
    model = _with_identity()
    normalized = model_io.normalize(model)
    pads = _copy(normalized)
    conv = next(n for n in pads.graph.node if n.op_type == "Conv")
    next(a for a in conv.attribute if a.name == "pads").ints[:] = [0, 0, 0, 0]
    dropped = _copy(normalized)
    relu = next(n for n in dropped.graph.node if n.op_type == "Relu")
    dropped.graph.node.remove(relu)
    consumer = next(n for n in dropped.graph.node if relu.output[0] in n.input)
    consumer.input[list(consumer.input).index(relu.output[0])] = relu.input[0]
    renamed = _copy(normalized)
    renamed.graph.output[0].name = "other"
    renamed.graph.node[-1].output[0] = "other"
    for other in (pads, dropped, renamed):
        assert not same_computation(model, other)
    assert same_computation(model, _copy(normalized))


def test_a_normalisation_that_changes_the_outputs_is_caught(tmp_path, monkeypatch):
    """Normalising must not change what the model computes: a weight changed on the way
    is found by running both models (the graphs no longer prove it) and nothing is written."""
    src = tmp_path / "m.onnx"
    onnx.save(sample_cnn(), src)
    real = model_io.normalize
    runs = []

    def broken(model):
        out = real(model)
        t = max(out.graph.initializer, key=lambda t: int(np.prod(t.dims)))
        value = numpy_helper.to_array(t) * 1.01
        t.CopyFrom(numpy_helper.from_array(value.astype(np.float32), t.name))
        return out

    def counted(model, feeds, where="model"):
        runs.append(where)
        return real_run(model, feeds, where)

    real_run = verify.run
    monkeypatch.setattr(pipeline.model_io, "normalize", broken)
    monkeypatch.setattr(verify, "run", counted)
    with pytest.raises(VerificationError, match="normalised model differs from the input"):
        prune(src, tmp_path / "out.onnx", PruneConfig(ratio=0.5, latency=False))
    assert "input model" in runs
    assert not (tmp_path / "out.onnx").exists()


def test_an_unchanged_normalisation_is_not_run_again(tmp_path, monkeypatch):
    src = tmp_path / "m.onnx"
    onnx.save(_with_identity(), src)
    runs = []
    real_run = verify.run
    monkeypatch.setattr(verify, "run", lambda m, f, where="model": (runs.append(where),
                                                                    real_run(m, f, where))[1])
    prune(src, tmp_path / "out.onnx", PruneConfig(ratio=0.5, latency=False, round_to=1))
    assert "input model" not in runs and "pruned model" in runs
