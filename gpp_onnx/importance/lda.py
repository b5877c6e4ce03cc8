"""Discriminant utility of the final hidden layer (METHOD section 1).

Firing matrix X (N x M) over labelled images; zero-variance and duplicate columns get
utility 0 and are left out. With X~ = X - mean(X) and X~_i class i's rows centred on
the class mean:

    S_w = sum_i X~_i^T X~_i        S_a = X~^T X~        S_b = S_a - S_w

Per-neuron Fisher ratio: ``v_j = S_b[j,j] / (S_w[j,j] + eps)``.
Generalised eigenproblem ``S_b e = v S_w e`` with ``S_w`` regularised by
``eps * tr(S_w)/M * I``, solved on the whitened problem (Cholesky ``S_w = L L^T``,
``eigh(L^-1 S_b L^-T)``); a neuron's utility is ``sum_j v_j e_j[k]^2`` over the top
``classes - 1`` eigenpairs (unit-norm ``e_j``). It equals the Fisher ratio of the top
neurons when the scatters are diagonal. ``offdiag_ratio`` = ``||offdiag(S_w)||_F^2 /
||S_w||_F^2`` reports how diagonal S_w is (0 = diagonal).

The same eigenpairs define the LDA classifier of the layer ([design], used by the default
``gpp`` criterion): ``z = D^T (x - mean(X))`` with the top ``classes - 1`` directions as the
columns of D, each scaled to unit within-class variance (``d^T S_w d / N = 1``), and class
means ``m_c`` of z; class c's logit is ``-||z - m_c||^2 / 2`` (nearest class mean in the
whitened discriminant space). Dropped neurons have zero rows in D.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

EPS = 1e-6


@dataclass(frozen=True, eq=False)
class LdaResult:
    fisher: np.ndarray          # (M,) per-neuron Fisher ratio, 0 for dropped neurons
    utility: np.ndarray         # (M,) generalised-eigen utility, 0 for dropped neurons
    eigenvalues: np.ndarray     # top (classes - 1) discriminant values
    offdiag_ratio: float
    dropped: int                # zero-variance or duplicate neurons
    directions: np.ndarray | None = None   # (M, K) D: whitened discriminant directions
    center: np.ndarray | None = None       # (M,) mean of X
    class_means: np.ndarray | None = None  # (classes, K) m_c in z space
    classes: np.ndarray | None = None      # the labels, in the order of class_means

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """LDA-classifier logits ``-||D^T (x - center) - m_c||^2 / 2`` for x (N, M)."""
        d = torch.as_tensor(self.directions, dtype=x.dtype, device=x.device)
        c = torch.as_tensor(self.center, dtype=x.dtype, device=x.device)
        m = torch.as_tensor(self.class_means, dtype=x.dtype, device=x.device)
        z = (x - c) @ d
        return -0.5 * ((z[:, None, :] - m[None]) ** 2).sum(dim=2)

    def summary(self) -> dict:
        return {"neurons": int(len(self.utility)), "dropped": self.dropped,
                "offdiag_ratio": round(self.offdiag_ratio, 4),
                "top_eigenvalues": [round(float(v), 4) for v in self.eigenvalues[:5]]}


def _usable_columns(x: torch.Tensor) -> torch.Tensor:
    """Mask of columns with variance and not duplicating an earlier column."""
    var = x.var(dim=0, unbiased=False)
    keep = var > EPS * max(float(var.max()), 1e-30)
    scale = float(x.abs().max()) or 1.0  # duplicates are judged relative to the data's scale
    rounded = torch.round(x / scale * 1e5)
    _, first = np.unique(rounded.T.cpu().numpy(), axis=0, return_index=True)
    unique = torch.zeros_like(keep)
    unique[torch.as_tensor(first, device=x.device)] = True
    return keep & unique


def scatter(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Within-class and between-class scatter of x (N, M) with labels y (N,)."""
    xc = x - x.mean(dim=0)
    s_a = xc.T @ xc
    s_w = torch.zeros_like(s_a)
    for c in torch.unique(y):
        xi = x[y == c]
        xi = xi - xi.mean(dim=0)
        s_w += xi.T @ xi
    return s_w, s_a - s_w


def lda_utility(features: np.ndarray, labels: np.ndarray) -> LdaResult:
    x_all = torch.as_tensor(features, dtype=torch.float64)
    y = torch.as_tensor(labels)
    m = x_all.shape[1]
    cols = _usable_columns(x_all)
    x = x_all[:, cols]
    classes = int(torch.unique(y).numel())
    fisher = np.zeros(m)
    utility = np.zeros(m)
    if x.shape[1] == 0 or classes < 2:  # nothing to separate: a classifier with no directions
        labels = torch.unique(y).numpy()
        return LdaResult(fisher, utility, np.zeros(0), 0.0, int(m - cols.sum()),
                         np.zeros((m, 0)), x_all.mean(dim=0).numpy(),
                         np.zeros((len(labels), 0)), labels)
    s_w, s_b = scatter(x, y)
    d_w, d_b = torch.diagonal(s_w), torch.diagonal(s_b)
    fisher[cols.numpy()] = (d_b / (d_w + EPS * float(d_w.mean()) + 1e-30)).numpy()
    values, vectors = _generalised_eig(s_w, s_b)
    top = min(classes - 1, len(values))
    vals, vecs = values[-top:].flip(0), vectors[:, -top:].flip(1)
    utility[cols.numpy()] = ((vecs ** 2) * vals.clamp(min=0)).sum(dim=1).numpy()
    off = s_w - torch.diag(d_w)
    ratio = float((off ** 2).sum() / ((s_w ** 2).sum() + 1e-30))
    scale = torch.sqrt(torch.diagonal(vecs.T @ s_w @ vecs) / len(x)).clamp(min=1e-12)
    directions = np.zeros((m, top))
    directions[cols.numpy()] = (vecs / scale).numpy()
    center = x_all.mean(dim=0).numpy()
    labels = torch.unique(y)
    z = (x_all.numpy() - center) @ directions
    means = np.stack([z[(y == c).numpy()].mean(axis=0) for c in labels])
    return LdaResult(fisher, utility, vals.numpy(), ratio, int(m - cols.sum()), directions,
                     center, means, labels.numpy())


def _generalised_eig(s_w: torch.Tensor, s_b: torch.Tensor):
    """Eigenpairs of S_b e = v S_w_reg e (ascending), unit-norm e in neuron space."""
    m = s_w.shape[0]
    # relative regularisation only, so the utility does not depend on the features' scale
    ridge = max(EPS * float(torch.trace(s_w)) / m, 1e-300)
    reg = s_w + ridge * torch.eye(m, dtype=s_w.dtype)
    chol = torch.linalg.cholesky(reg)
    inv = torch.linalg.solve_triangular(chol, torch.eye(m, dtype=s_w.dtype), upper=False)
    whitened = inv @ s_b @ inv.T
    values, u = torch.linalg.eigh((whitened + whitened.T) / 2)
    vectors = inv.T @ u
    vectors = vectors / vectors.norm(dim=0, keepdim=True).clamp(min=1e-30)
    return values, vectors
