"""The Grow-Push-Prune criterion: LDA utility traced back through the net (METHOD 1-2).

1. Final hidden layer h (N x M, spatial maps average-pooled) over labelled images;
   per-neuron LDA utility v (``lda.lda_utility``), max-normalised to weights w in [0, 1];
   dead and duplicate neurons get 0.
2. Deconvnet tracing: the backward pass is seeded at h with the weighted activations
   ``w * h`` and runs through the model with ReLU's backward replaced by the deconvnet
   rule ``grad_in = relu(grad_out)``; max-pool routes through its forward switches, convs
   apply their transposed filters, Concat splits, forks sum, Add feeds both inputs (all
   plain autograd). The signal reaching value V is averaged over images,
   ``U = (1/N) sum_n dV_n``, and a channel's utility is its maximum over space,
   ``u_c = max_hw U_c`` (negative signals count as 0).
3. A group's utility per channel is the sum over its members of the member utilities,
   each max-normalised per member value.

Variants ([design], chosen by measurement, see docs/fashion-mnist.md): the deconvnet
signal ignores whether a channel fires on the data at all, so a dead channel with
positive outgoing weights still looks useful. ``contribution=True`` weighs the signal
by the channel's own activation, ``U_c = (1/N) sum_n dV_n * V_n`` (a first-order
estimate of the channel's share of the weighted discriminant features), and
``rule="guided"`` additionally gates the rectified signal by the forward ReLU mask.

``objective="lda-nll"`` seeds the backward pass with the class separation itself rather
than with the weighted activations: the loss is the cross-entropy of the layer's LDA
classifier (``LdaResult.logits``: nearest class mean in the whitened space of the top
``classes - 1`` discriminants) on each image's true label, so a neuron matters as much as
it moves images towards or away from their class in discriminant space. With
``aggregate="image"`` a channel's utility is ``(1/N) sum_n |sum_{h,w} dL_n/dV * V|``:
per image, the first-order change of the LDA loss when the channel is removed, summed
over space, then its size averaged over images (``aggregate="max"`` is step 2's max over
space of the image-averaged signal).

Criterion names: ``gpp`` (default): lda-nll objective, plain gradient, image aggregate;
``gpp-guided``: weighted-activation seed, guided rule, contribution, max over space;
``gpp-deconv``: the literal METHOD 2 rule.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from ..batching import feeds, tensors
from ..errors import DataError, InputError
from ..progress import track
from .lda import LdaResult, lda_utility

logger = logging.getLogger(__name__)


class _DeconvRelu(torch.autograd.Function):
    """ReLU forward; deconvnet backward: the signal itself is rectified."""

    @staticmethod
    def forward(ctx, x):
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp(min=0)


class _GuidedRelu(torch.autograd.Function):
    """ReLU forward; guided backward: rectified signal, gated by the forward mask."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad.clamp(min=0) * (x > 0)


def deconv_relu(node, x):
    return _DeconvRelu.apply(x)


def guided_relu(node, x):
    return _GuidedRelu.apply(x)


RULES = {"deconv": deconv_relu, "guided": guided_relu, "gradient": None}
TRACE_BYTES = 256 << 20  # one tracing batch's forward values (autograd keeps them; grads add more)


def _pool(h: torch.Tensor) -> torch.Tensor:
    return h.flatten(2).mean(dim=2) if h.dim() > 2 else h


def _trace_batch(view, wanted: int) -> int:
    """At most ``wanted`` and 32 images, and few enough that their forward values fit in
    TRACE_BYTES (resnet18 at 224 px holds 22 MB per image: 11 images; at 64 px: 32)."""
    per_image = sum(4 * int(np.prod(shape[1:])) for node in view.model.graph.node
                    for name in node.output if name and (shape := view.shape(name)))
    return max(1, min(wanted, 32, TRACE_BYTES // max(per_image, 1)))


def _batches(data, batch_size: int):
    for start in range(0, len(data.y), batch_size):
        yield data.x[start:start + batch_size], data.y[start:start + batch_size]


class DiscriminantCriterion:
    needs_feature = True  # reads the final hidden layer

    def __init__(self, name: str = "gpp", rule: str = "deconv", contribution: bool = False,
                 weight_by_utility: bool = True, objective: str = "activation",
                 aggregate: str = "max"):
        if objective not in ("activation", "lda-nll") or aggregate not in ("max", "image"):
            raise ValueError(f"unknown objective {objective!r} or aggregate {aggregate!r}")
        self.name, self.rule, self.contribution = name, rule, contribution
        self.weight_by_utility = weight_by_utility
        self.objective, self.aggregate = objective, aggregate
        self.lda: LdaResult | None = None
        self.report: dict = {}

    def score(self, analysis, evidence=None) -> dict[str, np.ndarray]:
        if evidence is None or evidence.data is None or evidence.feature is None:
            raise InputError("the gpp criterion needs labelled data - pass --data")
        from ..torch_backend import OnnxModule, resolve_device

        device = resolve_device(evidence.device)
        relu = RULES[self.rule]
        module = OnnxModule(analysis.view.model, device=device,
                            op_overrides={"Relu": relu} if relu else None).eval()
        input_name = analysis.view.input_names[0]
        batch = _trace_batch(analysis.view, evidence.batch_size)
        self.lda = self._lda(module, input_name, evidence, batch, device)
        weights = None  # the lda-nll objective weighs neurons through the LDA classifier
        if self.objective == "activation":
            weights = self.lda.utility / max(float(self.lda.utility.max()), 1e-30)
            if not self.weight_by_utility:
                weights = (self.lda.utility > 0).astype(np.float64)
        values = sorted({m.value for g in analysis.prunable for m in g.members})
        signal = self._trace(module, input_name, evidence, values, weights, batch, device,
                             analysis.axes)
        if self.aggregate == "image":
            utilities = signal
        else:
            utilities = {v: _channel_utility(signal[v], analysis.axes[v]) for v in values}
        self.report = {"feature_tensor": evidence.feature, "rule": self.rule,
                       "contribution": self.contribution, "objective": self.objective,
                       "aggregate": self.aggregate, "images": len(evidence.data.y),
                       "lda": self.lda.summary()}
        return {g.key: _group_utility(g, utilities) for g in analysis.prunable}

    def _lda(self, module, input_name, evidence, batch, device) -> LdaResult:
        feats = []
        with torch.no_grad():
            for x, _ in _batches(evidence.data, batch):
                h = module.run(feeds(tensors(x, device), input_name),
                               [evidence.feature])[evidence.feature]
                feats.append(_pool(h).double().cpu().numpy())
        features = np.concatenate(feats)
        if not np.all(np.isfinite(features)):
            raise DataError(f"the final hidden layer '{evidence.feature}' has NaN/inf "
                            "activations on the data - check the input scaling (--mean/--std)")
        result = lda_utility(features, evidence.data.y)
        if result.dropped == len(result.utility):
            raise DataError(f"the final hidden layer '{evidence.feature}' is constant on the "
                            f"data (all {len(result.utility)} neurons dead or duplicates), so "
                            "it separates no classes - check that the model is trained and the "
                            "input scaling (--mean/--std), or use --criterion l1")
        logger.info("LDA on '%s': %d neurons, %d dead/duplicate, S_w off-diagonal energy %.3f",
                    evidence.feature, len(result.utility), result.dropped, result.offdiag_ratio)
        return result

    def _trace(self, module, input_name, evidence, values, weights, batch, device, axes):
        w = None if weights is None else torch.as_tensor(weights, dtype=torch.float32,
                                                          device=device)
        sums: dict[str, torch.Tensor] = {}
        n_batches = -(-len(evidence.data.y) // batch)
        for x, y in track(_batches(evidence.data, batch), "tracing", n_batches, logger):
            out = module.run(feeds(tensors(x, device), input_name),
                             [evidence.feature, *values])
            h = out[evidence.feature]
            # values no gradient reaches (a Dropout's boolean mask, integer outputs) score 0
            differentiable = [v for v in values if out[v].requires_grad]
            targets = [out[v] for v in differentiable]
            if not targets:
                continue
            if self.objective == "lda-nll":
                label = torch.as_tensor(np.searchsorted(self.lda.classes, y), device=device)
                loss = torch.nn.functional.cross_entropy(self.lda.logits(_pool(h)), label,
                                                         reduction="sum")
                grads = torch.autograd.grad(loss, targets, allow_unused=True)
            else:
                seed = (h * w.view(1, -1, *([1] * (h.dim() - 2)))).detach()
                grads = torch.autograd.grad(h, targets, grad_outputs=seed, allow_unused=True)
            for v, g in zip(differentiable, grads):
                if g is None:
                    continue
                g = g * out[v].detach() if self.contribution else g
                if self.aggregate == "image":  # per image: sum over space, then |.|
                    g = g.detach().movedim(axes[v], 1)
                    part = g.reshape(g.shape[0], g.shape[1], -1).sum(dim=2).abs().sum(dim=0)
                else:
                    part = g.detach().sum(dim=0)
                sums[v] = part if v not in sums else sums[v] + part
        n = len(evidence.data.y)
        return {v: (sums[v] / n).cpu().numpy().astype(np.float64) if v in sums else None
                for v in values}


def _channel_utility(mean_signal: np.ndarray | None, axis: int) -> np.ndarray | None:
    """u_c = max over the non-channel axes of the image-averaged signal, floored at 0."""
    if mean_signal is None:
        return None
    moved = np.moveaxis(mean_signal, axis - 1, 0)  # batch axis already summed away
    return np.maximum(moved.reshape(moved.shape[0], -1).max(axis=1), 0.0)


def _group_utility(group, utilities: dict) -> np.ndarray:
    total = np.zeros(group.width)
    for m in group.members:
        u = utilities.get(m.value)
        if u is None:
            continue
        per_channel = u[m.elements].sum(axis=1)
        peak = per_channel.max()
        if peak > 0:
            total += per_channel / peak
    return total
