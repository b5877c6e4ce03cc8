"""The push step of Grow-Push-Prune: train with cross-entropy plus the push loss
(``train.losses.PushLoss``, METHOD section 4) so that the class discriminants of the final
hidden layer line up with a compact set of neurons, before the prune scores them.

``push_model`` returns the pushed model and a ``PushReport``: held-out accuracy and the
off-diagonal energy share of S_w (``||offdiag(S_w)||_F^2 / ||S_w||_F^2`` over the
held-out images' final hidden layer; 0 when the discriminants lie on neuron axes) before
and after.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import numpy as np
import onnx

from . import distributed
from .config import TrainOptions
from .evaluation import accuracy

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PushWeights:
    sep: float = 1.0     # class separation (Fisher ratios)
    cov: float = 1.0     # within-class covariance off the diagonal
    align: float = 0.1   # discriminant power on few neurons


@dataclass(frozen=True)
class PushReport:
    feature: str
    accuracy_before: float
    accuracy_after: float
    offdiag_before: float | None   # None: not measurable (see offdiag_share)
    offdiag_after: float | None
    steps: int


def push_model(model: onnx.ModelProto, train, val, feature: str, options: TrainOptions,
               weights: PushWeights = PushWeights(), seed: int = 0
               ) -> tuple[onnx.ModelProto, PushReport]:
    """`options.epochs` of cross-entropy + push on `train`; measured on `val`."""
    import torch

    from .finetune import _batches
    from .torch_backend import OnnxModule, resolve_device, write_back
    from .train import CrossEntropy, PushLoss, Trainer

    before = (accuracy(model, val), offdiag_share(model, val, feature))
    steps = max(1, round(options.epochs * math.ceil(len(train) / options.batch_size)))
    torch.manual_seed(seed + distributed.rank())  # dropout masks differ between ranks
    module = OnnxModule(model, device=resolve_device(options.device))
    push = PushLoss(feature, int(train.num_classes), weights.sep, weights.cov, weights.align)
    # the push weights were chosen without BatchNorm put back on folded convs
    Trainer(module, [CrossEntropy(), push], replace(options, renorm=False), steps).fit(
        _batches(train, options.batch_size, seed), "push")
    pushed = write_back(module, model)
    after = (accuracy(pushed, val), offdiag_share(pushed, val, feature))
    logger.info("push: held-out accuracy %.4f -> %.4f, S_w off-diagonal energy %s -> %s",
                before[0], after[0], share_text(before[1]), share_text(after[1]))
    return pushed, PushReport(feature, before[0], after[0], before[1], after[1], steps)


def share_text(share: float | None) -> str:
    """An off-diagonal share as printed: 'n/a' where it could not be measured."""
    return "n/a" if share is None else f"{share:.3f}"


def offdiag_share(model: onnx.ModelProto, ds, feature: str, batch_size: int = 256
                  ) -> float | None:
    """||offdiag(S_w)||_F^2 / ||S_w||_F^2 of `feature` over `ds` (spatially averaged); None
    where S_w is zero, so that there is nothing to measure: no class of `ds` has two images
    (100 classes of 5 images held out 50, one a class; 0 was reported, the value of
    discriminants that lie on neuron axes), or the features do not vary within a class."""
    import torch

    from .batching import module_inputs, tensors
    from .data import iter_batches
    from .importance.lda import scatter
    from .torch_backend import OnnxModule
    from .train.losses import pooled

    module = OnnxModule(model).eval()
    feats = []
    with torch.no_grad():
        for x, _ in iter_batches(ds, batch_size):
            feats.append(pooled(module.run(module_inputs(tensors(x)), [feature])[feature]))
    s_w, _ = scatter(torch.cat(feats).double(), torch.from_numpy(np.asarray(ds.y)))
    off = s_w - torch.diag(torch.diagonal(s_w))
    total = (s_w ** 2).sum()
    return None if total <= 1e-30 else float((off ** 2).sum() / total)
