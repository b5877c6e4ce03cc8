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


def test_default_gpp_signal_is_the_lda_loss_change_per_image():
    """gpp's per-channel signal at the final hidden layer equals an independent numpy
    computation: (1/N) sum_n |dL_n/dp_c * p_{n,c}| with L_n the LDA classifier's
    cross-entropy and p the pooled features (the layer feeds GAP, so the spatial sum of
    dL/dh * h is dL/dp * p)."""
    from gpp_onnx.torch_backend import OnnxModule
    from gpp_onnx.verify import make_session

    model = normalize(_two_layer(dead=0, cut_off=2))
    analysis = analyze_model(model)
    data = _data()
    crit = get_criterion("gpp")
    crit.score(analysis, Evidence(data, "relu4", device="cpu"))
    module = OnnxModule(model).eval()
    got = crit._trace(module, "input", Evidence(data, "relu4", device="cpu"), ["relu4"],
                      None, 8, torch.device("cpu"), analysis.axes)["relu4"]
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    exposed.graph.output.extend([onnx.ValueInfoProto(name="relu4")])
    session = make_session(exposed, optimize=False)
    h = session.run(["relu4"], {"input": data.x[:]})[0].astype(np.float64)
    p = h.mean(axis=(2, 3))
    lda = crit.lda
    z = (p - lda.center) @ lda.directions
    logits = -0.5 * ((z[:, None, :] - lda.class_means[None]) ** 2).sum(axis=2)
    soft = np.exp(logits - logits.max(axis=1, keepdims=True))
    soft /= soft.sum(axis=1, keepdims=True)
    dz = soft @ lda.class_means - lda.class_means[data.y]       # dL/dz
    dp = dz @ lda.directions.T                                   # dL/dp
    expected = np.abs(dp * p).mean(axis=0)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)
    assert expected.max() > 0


@pytest.mark.parametrize("name", ["gpp", "gpp-guided", "gpp-deconv"])
def test_constant_final_layer_is_a_clear_error(name):
    from gpp_onnx.errors import DataError

    model = _two_layer(dead=0, cut_off=2)
    inits = {t.name: t for t in model.graph.initializer}
    for w in ("w2", "w3"):  # the second conv outputs its (negative) bias only: relu -> 0
        arr = numpy_helper.to_array(inits[w]).copy()
        arr[...] = 0.0 if w == "w2" else -1.0
        inits[w].CopyFrom(numpy_helper.from_array(arr, w))
    analysis = analyze_model(normalize(model))
    with pytest.raises(DataError, match="constant on the data"):
        get_criterion(name).score(analysis, Evidence(_data(), "relu4", device="cpu"))


@pytest.mark.parametrize("name", ["gpp", "gpp-deconv"])
def test_tracing_batch_is_capped_by_bytes_and_scores_do_not_depend_on_it(name, monkeypatch):
    """A large-input model traces fewer images at a time; per-channel sums over the data
    are the same whatever the batch (one image at a time as the reference)."""
    from gpp_onnx.importance import discriminant

    analysis = analyze_model(normalize(_two_layer(dead=0, cut_off=2)))
    evidence = Evidence(_data(), "relu4", device="cpu", batch_size=64)
    assert discriminant._trace_batch(analysis.view, 64) == 32
    whole = get_criterion(name).score(analysis, evidence)
    monkeypatch.setattr(discriminant, "TRACE_BYTES", 1)  # less than one image's values
    assert discriminant._trace_batch(analysis.view, 64) == 1
    one = get_criterion(name).score(analysis, evidence)
    for key in whole:
        np.testing.assert_allclose(one[key], whole[key], rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("name", ["gpp", "gpp-deconv"])
def test_a_dropout_with_its_mask_output_changes_no_score(name):
    """A head Dropout that also outputs its (boolean) mask, as some exporters write it, is
    the identity at inference: every group's channels score as they do without the
    Dropout, up to the group's scale (a group sums its values' signals, and the Dropout's
    output is one more value of the final hidden layer's group)."""
    def head(dropout: bool):
        b = GraphBuilder((1, 2, 6, 6), seed=3)
        h = b.act(b.conv("input", 4, k=1), "Relu")
        f = b.act(b.gemm(b.flatten(b.gap(b.act(b.conv(h, 6, k=1), "Relu"))), 8), "Relu")
        if dropout:
            f, _ = b.op("Dropout", [f], b.shapes[f], n_out=2)
        return b.build(b.gemm(f, 3)), f

    scores = []
    for dropout in (False, True):
        model, feature = head(dropout)
        analysis = analyze_model(normalize(model))
        scores.append(get_criterion(name).score(analysis, Evidence(_data(), feature,
                                                                   device="cpu")))
    plain, masked = scores
    assert set(plain) <= set(masked)
    for key in plain:
        np.testing.assert_allclose(masked[key] / masked[key].max(),
                                   plain[key] / plain[key].max(), rtol=1e-6, atol=1e-12)


def test_gpp_scores_a_flatten_head_wider_than_the_scoring_images(tmp_path):
    """A Paddle-style head (Flatten of the conv maps into the classifier) has more neurons
    than --per-class x classes images: the LDA classifier then separates every scoring
    image with a saturated loss, whose gradient is exactly 0, unless scoring takes more
    images than the layer has neurons."""
    import gpp_onnx
    from gpp_onnx.config import DataOptions

    b = GraphBuilder((1, 2, 6, 6), seed=1)
    h = b.act(b.conv("input", 8, k=1), "Relu")
    model = b.build(b.gemm(b.flatten(h), 3))  # 8 x 36 = 288 features
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 240)
    x = rng.standard_normal((720, 2, 6, 6)).astype(np.float32)
    x[:, 0] += y[:, None, None]
    np.savez(tmp_path / "d.npz", x=x, y=y)
    res = gpp_onnx.prune(model, ratio=0.5, round_to=1,
                         data=DataOptions(str(tmp_path / "d.npz"), per_class=8))
    utility = [g["utility"] for g in res.report["groups"] if g.get("utility")]
    assert utility and all(max(u) > 0 for u in utility)


def test_gpp_warns_when_the_data_has_fewer_images_than_the_head_has_neurons(tmp_path, caplog):
    """60 images for a final hidden layer of 288 neurons: no per-class count helps, so the
    run says the discriminant scores may be 0 and names the way out."""
    import logging

    import gpp_onnx
    from gpp_onnx.config import DataOptions

    b = GraphBuilder((1, 2, 6, 6), seed=1)
    model = b.build(b.gemm(b.flatten(b.act(b.conv("input", 8, k=1), "Relu")), 3))
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((60, 2, 6, 6)).astype(np.float32), y=y)
    with caplog.at_level(logging.WARNING):
        gpp_onnx.prune(model, ratio=0.5, round_to=1, data=DataOptions(str(tmp_path / "d.npz")))
    assert any("288 neurons" in r.getMessage() and "--criterion taylor" in r.getMessage()
               for r in caplog.records)
