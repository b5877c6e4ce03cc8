"""Baseline criteria: first-order Taylor (Molchanov et al. 2019) and BatchNorm |gamma|.

Taylor is checked against an independent plain-torch computation of what it claims to
be: for every mini-batch, the derivative of the batch loss with respect to a gate that
scales the channel's output (autograd in float64, and a central finite difference), squared
and averaged over the batches.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from gpp_onnx import PruneConfig, prune
from gpp_onnx.analysis import analyze_model
from gpp_onnx.config import DataOptions
from gpp_onnx.data import Dataset, iter_batches
from gpp_onnx.errors import InputError
from gpp_onnx.importance import Evidence, Magnitude, get_criterion
from gpp_onnx.importance.bn_scale import BnScaleCriterion
from gpp_onnx.importance.taylor import TaylorCriterion
from gpp_onnx.model import normalize
from gpp_onnx.samples import GraphBuilder

BATCH = 8
N_IMAGES = 20  # 3 mini-batches: 8, 8, 4


def _dataset(shape=(1, 8, 8), classes: int = 3, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N_IMAGES, *shape)).astype(np.float32)
    y = rng.integers(0, classes, N_IMAGES)
    return Dataset(x, y, tuple(str(c) for c in range(classes)), "synthetic")


def _evidence(data: Dataset) -> Evidence:
    return Evidence(data=data, device="cpu", batch_size=BATCH, seed=3)


def _set(model: onnx.ModelProto, name: str, edit) -> None:
    """Replace initializer `name` by edit(its array)."""
    for init in model.graph.initializer:
        if init.name == name:
            init.CopyFrom(numpy_helper.from_array(edit(numpy_helper.to_array(init).copy()), name))
            return
    raise KeyError(name)


def _weights(analysis) -> dict[str, list[torch.Tensor]]:
    """node name -> its constant inputs as float64 tensors (inputs 1..)."""
    view = analysis.view
    return {n.name: [torch.from_numpy(np.asarray(view.const(i), np.float64)) if i else None
                     for i in n.input[1:]] for n in view.nodes}


def _gate_scores(data: Dataset, evidence: Evidence, loss_fn, n_gates: int, width: int,
                 fd_check: bool = False) -> np.ndarray:
    """(1/B) sum_b (sum_gates dL_b/d gate_c)^2 with every gate at 1 (plain torch, float64)."""
    total = np.zeros(width)
    batches = list(iter_batches(data, evidence.batch_size, shuffle=True, seed=evidence.seed))
    for x, y in batches:
        xb, yb = torch.from_numpy(x).double(), torch.from_numpy(y)
        gates = [torch.ones(width, dtype=torch.float64, requires_grad=True)
                 for _ in range(n_gates)]
        grads = torch.autograd.grad(loss_fn(xb, yb, gates), gates)
        s = sum(g for g in grads).numpy()
        if fd_check:  # the same derivative by central differences, all gates of c together
            h = 1e-5
            for c in range(width):
                def at(t):
                    g = torch.ones(width, dtype=torch.float64)
                    g[c] = t
                    return float(loss_fn(xb, yb, [g] * n_gates))
                assert (at(1 + h) - at(1 - h)) / (2 * h) == pytest.approx(s[c], abs=1e-7)
        total += s ** 2
    return total / len(batches)


def _ch(t: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return t * gate.view(1, -1, 1, 1)


# --------------------------------------------------------------------------- plain net
def _plain_model() -> onnx.ModelProto:
    """conv(1->6) -> Relu -> GAP -> Flatten -> Gemm(6->3); channels 0-3 are degenerate:
    0 dead (filter, bias and consumer all zero), 1 unread (consumer zero, big filter),
    2 silent (filter and bias zero, consumer kept), 3 dead ReLU (bias -100)."""
    b = GraphBuilder((1, 1, 8, 8), seed=1)
    model = b.build(b.gemm(b.flatten(b.gap(b.act(b.conv("input", 6), "Relu"))), 3))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    w, bias, head = conv.input[1], conv.input[2], gemm.input[1]

    def filt(a):
        a[0] = 0
        a[1] *= 5
        a[2] = 0
        return a

    def bias_edit(a):
        a[0] = a[2] = 0
        a[3] = -100
        return a

    def head_edit(a):  # Gemm B is (3, 6) with transB = 1: column c reads channel c
        a[:, 0] = a[:, 1] = 0
        return a

    _set(model, w, filt)
    _set(model, bias, bias_edit)
    _set(model, head, head_edit)
    return model


def _plain_forward(analysis):
    ws = _weights(analysis)
    conv = next(n.name for n in analysis.view.nodes if n.op_type == "Conv")
    gemm = next(n.name for n in analysis.view.nodes if n.op_type == "Gemm")
    (w1, b1), (w2, b2) = ws[conv], ws[gemm]

    def features(x, gate_out):
        return F.relu(_ch(F.conv2d(x, w1, b1, padding=1), gate_out)).mean(dim=(2, 3))

    def head(h, y):
        return F.cross_entropy(h @ w2.T + b2, y)

    return conv, features, head


def test_taylor_matches_gate_derivative_on_producer():
    analysis = analyze_model(normalize(_plain_model()))
    data = _dataset()
    ev = _evidence(data)
    key, features, head = _plain_forward(analysis)
    scores = TaylorCriterion().score(analysis, ev)
    assert set(scores) == {g.key for g in analysis.prunable} == {key}
    expected = _gate_scores(data, ev, lambda x, y, g: head(features(x, g[0]), y), 1, 6,
                            fd_check=True)
    np.testing.assert_allclose(scores[key], expected, rtol=1e-4, atol=1e-14)
    assert expected[4:].min() > 1e-10  # the live channels really carry signal


def test_taylor_over_chunks_of_a_batch_is_the_whole_batchs_score(monkeypatch):
    """Where a batch's activations are too large for one backward pass, its gradient is
    summed over chunks: the scores are still those of the whole mini-batches."""
    from gpp_onnx.importance import taylor
    from gpp_onnx.torch_backend import OnnxModule

    analysis = analyze_model(normalize(_plain_model()))
    data = _dataset()
    ev = _evidence(data)
    key, features, head = _plain_forward(analysis)
    per_image = 8 * sum(int(np.prod(analysis.view.shape(o)[1:])) for n in analysis.view.nodes
                        for o in n.output)
    monkeypatch.setattr(taylor, "GRAD_BYTES", 3 * per_image)
    sizes, run = [], OnnxModule.run
    monkeypatch.setattr(OnnxModule, "run", lambda self, feeds, outputs=None: (
        sizes.append(len(next(iter(feeds.values())))), run(self, feeds, outputs))[1])
    scores = TaylorCriterion().score(analysis, ev)
    assert max(sizes) == 3 < BATCH
    expected = _gate_scores(data, ev, lambda x, y, g: head(features(x, g[0]), y), 1, 6)
    np.testing.assert_allclose(scores[key], expected, rtol=1e-4, atol=1e-14)


def test_taylor_consumer_variant_matches_gate_on_consumer_input():
    analysis = analyze_model(normalize(_plain_model()))
    data = _dataset()
    ev = _evidence(data)
    key, features, head = _plain_forward(analysis)
    ones = torch.ones(6, dtype=torch.float64)
    scores = TaylorCriterion(roles=("in",)).score(analysis, ev)
    expected = _gate_scores(data, ev, lambda x, y, g: head(features(x, ones) * g[0], y), 1, 6)
    np.testing.assert_allclose(scores[key], expected, rtol=1e-4, atol=1e-14)


def test_taylor_zero_for_channels_that_cannot_change_the_loss():
    analysis = analyze_model(normalize(_plain_model()))
    ev = _evidence(_dataset())
    key = analysis.prunable[0].key
    taylor = TaylorCriterion().score(analysis, ev)[key]
    # dead, unread (zero consumer), silent (zero filter and bias), dead ReLU: exactly 0
    assert np.all(taylor[:4] == 0.0)
    assert np.all(taylor[4:] > 0)
    # magnitude still rates the unread channel (big filter) highly; Taylor sees through it
    l1 = Magnitude(1).score(analysis)[key]
    assert l1[1] > l1[4:].max()
    plan_removed = np.argsort(taylor, kind="stable")[:3]
    assert set(plan_removed.tolist()) <= {0, 1, 2, 3}


def test_taylor_is_deterministic_and_needs_data():
    analysis = analyze_model(normalize(_plain_model()))
    ev = _evidence(_dataset())
    a = get_criterion("taylor").score(analysis, ev)
    b = get_criterion("taylor").score(analysis, ev)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    with pytest.raises(InputError, match="labelled data"):
        get_criterion("taylor").score(analysis, Evidence())
    with pytest.raises(InputError, match="labelled data"):
        PruneConfig(criterion="taylor").checked()


# ------------------------------------------------------------------ residual with BN
def _residual_bn_model() -> onnx.ModelProto:
    b = GraphBuilder((1, 1, 8, 8), seed=2)
    x = b.act(b.bn(b.conv("input", 4)), "Relu")
    y = b.bn(b.conv(b.act(b.conv(x, 3), "Relu"), 4))
    z = b.act(b.binary("Add", x, y), "Relu")
    return b.build(b.gemm(b.flatten(b.gap(z)), 3))


def _bn(x, params, eps=1e-5):
    gamma, beta, mean, var = params
    shape = (1, -1, 1, 1)
    return (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps) * gamma.view(shape) \
        + beta.view(shape)


def test_taylor_residual_bn_sums_every_producing_gate():
    """Group conv1 is produced by conv1 (+bn2) and conv6 (+bn7) through the Add: its
    Taylor sum is the sum of the gate derivatives after each conv and after each BN."""
    analysis = analyze_model(normalize(_residual_bn_model()))
    ws = _weights(analysis)
    names = [n.name for n in analysis.view.nodes]
    conv1, bn2, conv4, conv6, bn7, gemm = (next(n for n in names if n.startswith(p)) for p in
                                           ("conv1", "batchnormalization2", "conv4", "conv6",
                                            "batchnormalization7", "gemm"))
    ones3 = torch.ones(3, dtype=torch.float64)

    def loss(x, y, gates, mid=ones3):
        g1, g2, g3, g4 = gates
        a = F.relu(_ch(_bn(_ch(F.conv2d(x, *ws[conv1], padding=1), g1), ws[bn2]), g2))
        r = F.relu(_ch(F.conv2d(a, *ws[conv4], padding=1), mid))
        c = _ch(_bn(_ch(F.conv2d(r, *ws[conv6], padding=1), g3), ws[bn7]), g4)
        h = F.relu(a + c).mean(dim=(2, 3))
        w, bias = ws[gemm]
        return F.cross_entropy(h @ w.T + bias, y)

    data = _dataset(seed=5)
    ev = _evidence(data)
    scores = TaylorCriterion().score(analysis, ev)
    ones4 = torch.ones(4, dtype=torch.float64)
    expected = _gate_scores(data, ev, loss, 4, 4)
    np.testing.assert_allclose(scores[conv1], expected, rtol=1e-4, atol=1e-14)
    expected_mid = _gate_scores(data, ev, lambda x, y, g: loss(x, y, [ones4] * 4, g[0]), 1, 3)
    np.testing.assert_allclose(scores[conv4], expected_mid, rtol=1e-4, atol=1e-14)


def test_taylor_grouped_conv_transpose_counts_shared_slices_once():
    """Grouped ConvTranspose: output positions j and 2+j are one channel and share the
    weight column W[:, j]; the gate scales that column once (not once per group)."""
    b = GraphBuilder((1, 1, 4, 4), seed=4)
    x = b.act(b.conv("input", 4), "Relu")
    t = b.act(b.conv_transpose(x, 4, k=2, stride=2, groups=2), "Relu")
    model = b.build(b.gemm(b.flatten(b.gap(t)), 3))
    analysis = analyze_model(normalize(model))
    ws = _weights(analysis)
    conv = next(n.name for n in analysis.view.nodes if n.op_type == "Conv")
    convt = next(n.name for n in analysis.view.nodes if n.op_type == "ConvTranspose")
    gemm = next(n.name for n in analysis.view.nodes if n.op_type == "Gemm")
    group = analysis.group(convt)
    assert group.width == 2 and group.members[0].elements.tolist() == [[0, 2], [1, 3]]

    def loss(xb, yb, gates):
        g = gates[0].repeat(2)  # channel j gates outputs j and 2 + j
        a = F.relu(F.conv2d(xb, *ws[conv], padding=1))
        o = F.relu(_ch(F.conv_transpose2d(a, *ws[convt], stride=2, groups=2), g))
        w, bias = ws[gemm]
        return F.cross_entropy(o.mean(dim=(2, 3)) @ w.T + bias, yb)

    data = _dataset((1, 4, 4), seed=6)
    ev = _evidence(data)
    scores = TaylorCriterion().score(analysis, ev)
    expected = _gate_scores(data, ev, loss, 1, 2, fd_check=True)
    np.testing.assert_allclose(scores[convt], expected, rtol=1e-4, atol=1e-14)


def test_taylor_reads_logits_before_softmax():
    b = GraphBuilder((1, 1, 8, 8), seed=1)
    logits = b.gemm(b.flatten(b.gap(b.act(b.conv("input", 6), "Relu"))), 3)
    with_softmax = b.build(b.op("Softmax", [logits], b.shapes[logits], axis=1))
    b2 = GraphBuilder((1, 1, 8, 8), seed=1)
    plain = b2.build(b2.gemm(b2.flatten(b2.gap(b2.act(b2.conv("input", 6), "Relu"))), 3))
    ev = _evidence(_dataset())
    a = TaylorCriterion().score(analyze_model(normalize(with_softmax)), ev)
    p = TaylorCriterion().score(analyze_model(normalize(plain)), ev)
    assert list(a) == list(p)
    for k in a:
        np.testing.assert_allclose(a[k], p[k], rtol=1e-6)


# ------------------------------------------------------------------------ BN |gamma|
def _gamma(analysis, bn_prefix: str) -> np.ndarray:
    node = next(n for n in analysis.view.nodes if n.name.startswith(bn_prefix))
    return np.abs(analysis.view.const(node.input[1]).astype(np.float64))


def test_bn_scores_sum_abs_gamma_and_fall_back_to_l1(caplog):
    analysis = analyze_model(normalize(_residual_bn_model()))
    keys = [g.key for g in analysis.prunable]
    assert len(keys) == 2
    res_key = next(k for k in keys if k.startswith("conv1"))
    mid_key = next(k for k in keys if k.startswith("conv4"))
    with caplog.at_level(logging.WARNING, logger="gpp_onnx.importance.bn_scale"):
        scores = get_criterion("bn").score(analysis)
    assert set(scores) == set(keys)
    # the residual group holds two BNs (one per Add branch): |gamma| sums over both
    np.testing.assert_allclose(scores[res_key], _gamma(analysis, "batchnormalization2")
                               + _gamma(analysis, "batchnormalization7"), rtol=1e-12)
    # conv4 -> Relu has no BN: the l1 score of that group
    np.testing.assert_array_equal(scores[mid_key], Magnitude(1).score(analysis)[mid_key])
    messages = [r.getMessage() for r in caplog.records if r.name.endswith("bn_scale")]
    assert len(messages) == 1 and "1 of 2" in messages[0]


def test_bn_without_any_bn_is_l1_and_depthwise_sums_multiplier():
    b = GraphBuilder((1, 2, 8, 8), seed=3)
    x = b.act(b.conv("input", 4), "Relu")
    model = b.build(b.gemm(b.flatten(b.gap(b.conv(x, 5))), 3))
    analysis = analyze_model(normalize(model))
    scores = BnScaleCriterion().score(analysis)
    l1 = Magnitude(1).score(analysis)
    assert set(scores) == set(l1)
    for k in scores:
        np.testing.assert_array_equal(scores[k], l1[k])
    # depthwise multiplier 2 + BN: a channel owns two BN outputs (2c, 2c+1)
    b = GraphBuilder((1, 2, 8, 8), seed=3)
    x = b.act(b.conv("input", 4), "Relu")
    y = b.act(b.bn(b.conv(x, 8, groups=4)), "Relu")
    model = b.build(b.gemm(b.flatten(b.gap(b.conv(y, 5))), 3))
    analysis = analyze_model(normalize(model))
    scores = BnScaleCriterion().score(analysis)
    gamma = _gamma(analysis, "batchnormalization")
    key = next(g.key for g in analysis.prunable if g.width == 4)
    np.testing.assert_allclose(scores[key], gamma[0::2] + gamma[1::2], rtol=1e-12)


# ------------------------------------------------------------------------- end to end
def _digits_cnn() -> onnx.ModelProto:
    b = GraphBuilder((1, 1, 8, 8), seed=0)
    x = b.act(b.bn(b.conv("input", 8)), "Relu")
    x = b.act(b.conv(x, 8), "Relu")
    return b.build(b.gemm(b.flatten(b.gap(x)), 10))


@pytest.mark.parametrize("criterion", ["taylor", "bn"])
def test_prune_end_to_end_on_digits(tmp_path, criterion):
    src = tmp_path / "cnn.onnx"
    onnx.save(_digits_cnn(), src)
    dst = tmp_path / "cnn.pruned.onnx"
    data = DataOptions("digits", per_class=8) if criterion == "taylor" else None
    result = prune(src, dst, PruneConfig(ratio=0.5, criterion=criterion, data=data, round_to=1,
                                         latency=False))
    assert dst.exists() and result.report_path.exists()
    assert result.plan.meta["criterion"] == criterion
    assert result.plan.removed and all(len(r) == 4 for r in result.plan.removed.values())
    assert result.after.params < result.before.params
    assert result.equivalence_error < 1e-4
    if criterion == "taylor":
        assert result.accuracy_before is not None
