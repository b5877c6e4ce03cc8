"""StepPruner: the user's trained weights go into each cut; the steps reach the target."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from conftest import feeds_for, run_model
from gpp_onnx import StepPruner
from gpp_onnx.errors import InputError
from gpp_onnx.samples import GraphBuilder


class Position:
    """Higher channel numbers are kept: which channels survive is known in advance."""
    name = "position"

    def score(self, analysis, evidence=None):
        return {g.key: np.arange(g.width, dtype=float) for g in analysis.prunable}


def _net() -> onnx.ModelProto:
    b = GraphBuilder((1, 3, 8, 8), seed=0)
    x = b.act(b.conv(b.act(b.conv("input", 16), "Relu"), 16), "Relu")
    return b.build(b.gemm(b.flatten(b.gap(x)), 4))


def _convs(model: onnx.ModelProto) -> list[np.ndarray]:
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [init[n.input[1]] for n in model.graph.node if n.op_type == "Conv"]


def test_steps_cut_the_trained_weights_down_to_the_target():
    model = _net()
    w0 = _convs(model)[0]
    pruner = StepPruner(model, steps=2, ratio=0.5, round_to=1, criterion=Position())
    module = pruner.module
    first = next(p for name, p in module.named_onnx_parameters() if p.dim() == 4)
    with torch.no_grad():
        first.mul_(2.0)                                   # "training" between the steps
    module = pruner.step(module)
    # step k keeps (1 - 0.5)^(k/2) of the 16 channels, as --rounds 2: 12, then 8
    np.testing.assert_allclose(_convs(pruner.model)[0], 2.0 * w0[4:], rtol=1e-6)
    module = pruner.step(module)
    small = pruner.to_onnx(module)
    assert [w.shape[0] for w in _convs(small)] == [8, 8]
    np.testing.assert_allclose(_convs(small)[0], 2.0 * w0[8:], rtol=1e-6)
    feeds = feeds_for(small, batch=2)
    x = torch.from_numpy(feeds["input"])
    np.testing.assert_allclose(run_model(small, feeds)[0], module(x).detach().numpy(),
                               rtol=1e-4, atol=1e-5)


def test_a_step_past_the_last_is_refused():
    pruner = StepPruner(_net(), steps=1, ratio=0.5, round_to=1)
    pruner.step()
    with pytest.raises(InputError, match="all 1 steps are done"):
        pruner.step()


def test_a_fixed_batch_is_declared_again_as_prune_declares_it():
    """A model exported with batch 1 comes back from to_onnx() with batch 1 in its
    input and output, as prune's result does, not with the symbolic batch of the run."""
    from gpp_onnx import prune

    model = _net()
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    pruner = StepPruner(model, steps=1, ratio=0.5, round_to=1)
    pruner.step()
    small = pruner.to_onnx()
    pruned = prune(model, ratio=0.5, round_to=1, latency=False).model
    for a, b in ((small.graph.input[0], model.graph.input[0]),
                 (small.graph.output[0], model.graph.output[0]),
                 (pruned.graph.input[0], model.graph.input[0])):
        assert a.type.tensor_type.shape.dim[0] == b.type.tensor_type.shape.dim[0]
    assert run_model(small, feeds_for(small, batch=1))[0].shape == (1, 4)
