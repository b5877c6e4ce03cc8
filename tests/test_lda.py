"""LDA utility of the final hidden layer (METHOD section 1)."""
from __future__ import annotations

import numpy as np

from gpp_onnx.importance.lda import lda_utility, scatter


def _two_class(n=400, m=6, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n // 2)
    x = rng.standard_normal((n, m))
    for c in (0, 1):  # exactly equal class means for every neuron but 0
        x[y == c, 1:] -= x[y == c, 1:].mean(axis=0)
    x[:, 0] += 3.0 * y
    return x, y


def test_dead_and_duplicate_neurons_get_zero():
    x, y = _two_class()
    x = np.concatenate([x, np.full((len(y), 1), 2.0), x[:, :1]], axis=1)  # constant, duplicate
    res = lda_utility(x, y)
    assert res.dropped == 2
    assert res.utility[6] == 0 and res.utility[7] == 0 and res.fisher[6] == 0
    assert res.utility[0] > 0


def test_discriminative_neuron_ranks_first_and_matches_fisher_when_diagonal():
    x, y = _two_class(n=4000)
    res = lda_utility(x, y)
    assert np.argmax(res.utility) == 0 and np.argmax(res.fisher) == 0
    assert res.offdiag_ratio < 0.01
    # one discriminant (2 classes): it lies on neuron 0, with the Fisher ratio as its value
    assert abs(res.utility[0] - res.fisher[0]) / res.fisher[0] < 0.02
    assert res.utility[1:].max() < 0.02 * res.utility[0]


def test_scatter_decomposition_and_fisher_definition():
    x, y = _two_class(n=200, seed=3)
    import torch
    s_w, s_b = scatter(torch.as_tensor(x), torch.as_tensor(y))
    xc = x - x.mean(axis=0)
    np.testing.assert_allclose((s_w + s_b).numpy(), xc.T @ xc, rtol=1e-9, atol=1e-9)
    res = lda_utility(x, y)
    expected = np.diag(s_b.numpy()) / (np.diag(s_w.numpy()) + 1e-6 * np.diag(s_w.numpy()).mean())
    np.testing.assert_allclose(res.fisher, expected, rtol=1e-6)


def test_fewer_samples_than_neurons_and_scale_invariance():
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(4), 5)
    x = rng.standard_normal((20, 100))
    x[:, 3] += 4 * y
    res = lda_utility(x, y)
    assert np.all(np.isfinite(res.utility)) and len(res.eigenvalues) == 3
    scaled = x.copy()
    scaled[:, 3] *= 1000
    np.testing.assert_allclose(lda_utility(scaled, y).fisher[3], res.fisher[3], rtol=1e-6)


def test_lda_classifier_whitens_and_separates_the_classes():
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(3), 300)
    x = rng.standard_normal((900, 5)) @ rng.standard_normal((5, 5))  # correlated noise
    x[:, :2] += 4.0 * np.stack([y == 1, y == 2], axis=1)              # classes apart
    x = np.concatenate([x, np.zeros((900, 1))], axis=1)               # a dead neuron
    res = lda_utility(x, y)
    assert res.directions.shape == (6, 2) and np.all(res.directions[5] == 0)
    z = (x - res.center) @ res.directions
    within = np.concatenate([z[y == c] - z[y == c].mean(axis=0) for c in range(3)])
    np.testing.assert_allclose(within.var(axis=0), 1.0, rtol=1e-3)   # unit within-class var
    import torch
    logits = res.logits(torch.as_tensor(x)).numpy()
    assert (np.argmax(logits, axis=1) == y).mean() > 0.95
    np.testing.assert_array_equal(res.classes, [0, 1, 2])


def test_degenerate_lda_still_gives_a_classifier_with_no_directions():
    import torch

    x = np.ones((10, 3))                      # every neuron constant
    res = lda_utility(x, np.repeat([0, 1], 5))
    assert res.dropped == 3 and res.directions.shape == (3, 0)
    assert np.all(res.logits(torch.as_tensor(x)).numpy() == 0)   # no class preferred


def test_utility_does_not_depend_on_the_features_scale():
    x, y = _two_class()
    big, tiny = lda_utility(x, y), lda_utility(x * 1e-9, y)
    assert tiny.dropped == big.dropped == 0
    for a, b in ((tiny.utility, big.utility), (tiny.fisher, big.fisher)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9 * b.max())
    assert big.utility[0] > 1.0
