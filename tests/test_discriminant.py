"""The GPP criterion: deconvnet / guided ReLU rules and utility tracing (METHOD 2)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from gpp_onnx.analysis import analyze_model
from gpp_onnx.data import Dataset
from gpp_onnx.importance import Evidence, get_criterion
from gpp_onnx.importance.discriminant import _DeconvRelu, _GuidedRelu
from gpp_onnx.model import normalize
from gpp_onnx.samples import GraphBuilder


def test_deconv_rule_rectifies_the_signal_and_ignores_the_forward_mask():
    x = torch.tensor([-1.0, 2.0, 3.0], requires_grad=True)
    (g,) = torch.autograd.grad(_DeconvRelu.apply(x), x, torch.tensor([3.0, -4.0, 5.0]))
    assert g.tolist() == [3.0, 0.0, 5.0]
    (g,) = torch.autograd.grad(_GuidedRelu.apply(x), x, torch.tensor([3.0, -4.0, 5.0]))
    assert g.tolist() == [0.0, 0.0, 5.0]


def _two_layer(dead: int, cut_off: int):
    """conv(4) -> relu -> conv(6) -> relu -> GAP -> Gemm(3); channel `dead` of the first
    conv never fires; channel `cut_off` feeds nothing (zero consumer weights)."""
    b = GraphBuilder((1, 2, 6, 6), seed=1)
    h = b.act(b.conv("input", 4, k=1), "Relu")
    f = b.act(b.conv(h, 6, k=1), "Relu")
    model = b.build(b.gemm(b.flatten(b.gap(f)), 3))
    inits = {t.name: t for t in model.graph.initializer}
    w0, b0, w2 = (numpy_helper.to_array(inits[n]).copy() for n in ("w0", "w1", "w2"))
    w0[dead], b0[dead] = 0.0, -1.0
    w2[:, cut_off] = 0.0
    for name, arr in (("w0", w0), ("w1", b0), ("w2", w2)):
        inits[name].CopyFrom(numpy_helper.from_array(arr, name))
    return model


def _data(n=60, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), n // 3)
    x = rng.standard_normal((n, 2, 6, 6)).astype(np.float32)
    x[:, 0] += y[:, None, None]  # classes separable by the first input channel
    return Dataset(x, y, ("a", "b", "c"), "synthetic")


@pytest.mark.parametrize("name", ["gpp", "gpp-deconv"])
def test_channel_feeding_nothing_gets_zero_utility(name):
    analysis = analyze_model(normalize(_two_layer(dead=0, cut_off=2)))
    evidence = Evidence(_data(), "relu4", device="cpu")
    scores = get_criterion(name).score(analysis, evidence)
    first = scores["conv1"]
    assert first[2] == 0 and first[1] > 0 and first[3] > 0
    assert set(scores) == {g.key for g in analysis.prunable}


def test_default_gpp_gives_a_dead_channel_zero_utility():
    analysis = analyze_model(normalize(_two_layer(dead=0, cut_off=2)))
    scores = get_criterion("gpp").score(analysis, Evidence(_data(), "relu4", device="cpu"))
    assert scores["conv1"][0] == 0


def test_final_layer_utility_follows_lda():
    """Final hidden neurons with no class information rank below discriminative ones."""
    analysis = analyze_model(normalize(_two_layer(dead=0, cut_off=2)))
    crit = get_criterion("gpp")
    scores = crit.score(analysis, Evidence(_data(), "relu4", device="cpu"))
    lda = crit.lda.utility
    final = scores["conv3"]
    assert np.all(final[lda == 0] == 0)
    ranks = lambda v: np.argsort(np.argsort(v))
    assert np.corrcoef(ranks(final), ranks(lda))[0, 1] > 0.5
