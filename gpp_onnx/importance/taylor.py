"""First-order Taylor importance (Molchanov et al., CVPR 2019, "Importance Estimation for
Neural Network Pruning"), data-driven.

For a mini-batch b with mean cross-entropy loss ``L_b`` (model in eval mode: BatchNorm
uses its running statistics, Dropout is off; gradients on), the first-order estimate of
the loss change when channel c goes is the gate derivative

    s_b(c) = sum_{slices P of c} sum_{w in P} w * dL_b/dw

over the group's weight slices that *produce* the channel (roles ``out`` and ``chan``: a
conv filter ``W[m]`` with its bias ``B[m]``, BatchNorm scale/shift, PRelu slopes,
per-channel Mul/Add constants; only tensors the torch backend trains, so BatchNorm
running mean / var do not count). For a linear producer ``y = W x + B`` the sum is
exactly ``dL/d alpha`` at ``alpha = 1`` for a gate ``y_c -> alpha * y_c``; when several
layers produce the channel (the branches of a residual Add, or a conv and its BN) their
gate derivatives add. A group channel owns the k elements of each member value
(``Member.elements``), and its slices' positions (``ParamSlice.index``) are counted once
each, even where grouped layers map several elements to one weight slice. The
importance is the squared batch sum averaged over the B mini-batches:

    I(c) = (1/B) sum_b s_b(c)^2

Mini-batches of ``Evidence.batch_size`` are drawn in a seeded shuffle
(``data.iter_batches(shuffle=True, seed=Evidence.seed)``). The loss reads the logits: the
model's first output, or the input of a final Softmax / LogSoftmax.

``roles=("in",)`` gives the consumer-side variant: the gate derivative of scaling the
weights that read channel c (exactly what ``--mask-only`` zeroes).

``fisher`` (``objective="fisher"``) needs no labels: the loss is the negative
log-likelihood of targets *sampled from the model's own outputs* (every output of the
model, summed over an image's positions): a label ``y ~ softmax(logits)`` per image (per
position along a class output's class axis) for a class output, ``y ~
Bernoulli(sigmoid(logit))`` per element for a binary output, ``t = f + sigma e`` (e
standard normal, sigma^2 the batch's mean square of f) for any other output f. Its
expected squared gate derivative is the diagonal of the Fisher information in the gate,
the second-order estimate of the KL divergence between the original's outputs and the
outputs without channel c: ``E KL ~ 1/2 F_cc`` (the first-order term vanishes at the
original, so plain Taylor on a distillation loss would score every channel 0). With the
squared batch sum above, the per-image cross terms have mean zero, so ``I(c)`` estimates
``sum_i F_cc(x_i)``; a regression output adds ``||J_c||^2 / sigma^2``, the output's squared
first-order change, relative to its scale.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from ..batching import feeds, rows, tensors
from ..batching import part as batch_part
from ..data import iter_batches
from ..errors import DataError, InputError
from ..evaluation import class_scores
from ..ops import ROLE_CHAN, ROLE_OUT
from ..progress import track
from ..teacher import behind_copies

logger = logging.getLogger(__name__)


class TaylorCriterion:
    name = "taylor"

    def __init__(self, roles: tuple[str, ...] = (ROLE_OUT, ROLE_CHAN), objective: str = "ce"):
        self.roles, self.objective = tuple(roles), objective
        self.name = "fisher" if objective == "fisher" else "taylor"

    def score(self, analysis, evidence=None) -> dict[str, np.ndarray]:
        if evidence is None or evidence.data is None:
            what = "data" if self.objective == "fisher" else "labelled data"
            raise InputError(f"the {self.name} criterion needs {what} - pass --data")
        data = evidence.data
        if len(data) == 0:
            raise DataError(f"the {self.name} criterion got no images to score with")
        if self.objective != "fisher" and not data.labelled:
            raise InputError("the taylor criterion needs labels and the data has none - use "
                             "--criterion fisher")
        from ..torch_backend import OnnxModule, resolve_device

        device = resolve_device(evidence.device)
        module = OnnxModule(analysis.view.model, device=device).eval()
        params = dict(module.named_onnx_parameters())
        plan = _plan(analysis, params, self.roles, device)
        names = sorted({name for slices in plan.values() for name, _, _ in slices})
        wanted = [params[n] for n in names]
        input_name = analysis.view.input_names[0]
        loss_of = (_FisherLoss(analysis, evidence.seed, device) if self.objective == "fisher"
                   else _CrossEntropyLoss(analysis))
        sums = {g.key: torch.zeros(g.width, dtype=torch.float64, device=device)
                for g in analysis.prunable}
        n_batches = -(-len(data) // evidence.batch_size)
        batches = iter_batches(data, evidence.batch_size, shuffle=True, seed=evidence.seed)
        chunk = _chunk_size(analysis.view, evidence.batch_size)
        for x, y in track(batches, self.name, n_batches, logger):
            wg: dict[str, torch.Tensor] = {}
            n = rows(x)
            for start in range(0, n, chunk):  # the batch's gradient, a chunk at a time
                part = slice(start, start + chunk)
                outs = module.run(feeds(tensors(batch_part(x, part), device), input_name),
                                  loss_of.names)
                loss = loss_of(outs, None if y is None else y[part]) * (min(chunk, n - start) / n)
                grads = torch.autograd.grad(loss, wanted, allow_unused=True) if wanted else ()
                for name, p, g in zip(names, wanted, grads):
                    if g is not None:
                        wg[name] = wg.get(name, 0) + p.detach().double() * g.detach().double()
            for key, slices in plan.items():
                s = torch.zeros(sums[key].shape[0], dtype=torch.float64, device=device)
                for name, axis, incidence in slices:
                    if name in wg:
                        prod = wg[name]
                        per_pos = prod.movedim(axis, 0).reshape(prod.shape[axis], -1).sum(dim=1)
                        s += incidence @ per_pos
                sums[key] += s * s
        return {key: (total / n_batches).cpu().numpy() for key, total in sums.items()}


GRAD_BYTES = 1 << 30   # the activations one backward pass may hold, about


def _chunk_size(view, batch_size: int) -> int:
    """Images per forward and backward pass: the batch, or fewer where autograd would hold
    more than GRAD_BYTES of activations (every value kept, twice with its gradient: a
    320-px U-Net held 4.6 GB for a batch of 12)."""
    from .. import batch

    per_image = 0
    for node in view.nodes:
        for out in node.output:
            shape = view.shape(out) if out else None
            per_image += 8 * int(np.prod(shape[1:])) if shape else 0
    return batch.within(view.model, batch_size, per_image, GRAD_BYTES)


def _plan(analysis, params: dict, roles, device) -> dict[str, list]:
    """Per prunable group: (parameter name, axis, incidence (width, positions)) with each
    position of each parameter counted once per group channel."""
    plan = {}
    for group in analysis.prunable:
        members = {m.value: m for m in group.members}
        incidence: dict[tuple[str, int], np.ndarray] = {}
        for p in group.params:
            if p.role not in roles or p.param not in params:
                continue
            n_pos = params[p.param].shape[p.axis]
            pos = p.element_positions(members[p.value].elements)
            mat = incidence.setdefault((p.param, p.axis), np.zeros((group.width, n_pos)))
            mat[np.repeat(np.arange(group.width), pos.shape[1]), pos.ravel()] = 1.0
        plan[group.key] = [(name, axis, torch.as_tensor(mat, dtype=torch.float64, device=device))
                           for (name, axis), mat in incidence.items()]
        if not plan[group.key]:
            logger.debug("taylor: group %s has no trainable %s weights; it scores 0",
                         group.key, "/".join(roles))
    return plan


class _CrossEntropyLoss:
    """Mean cross-entropy of the logits against the labels."""

    def __init__(self, analysis):
        self.logits = _logits_name(analysis)
        self.names = [self.logits]

    def __call__(self, outs: dict, y: np.ndarray) -> torch.Tensor:
        logits = outs[self.logits]
        target = torch.from_numpy(y).to(logits.device)
        _check_logits(logits, target, self.logits)
        return F.cross_entropy(class_scores(logits), target)


class _FisherLoss:
    """Negative log-likelihood of targets sampled from the model's own outputs, summed over
    its outputs (module docstring)."""

    def __init__(self, analysis, seed: int, device):
        from ..teacher import output_kinds, trainable

        self.kinds = trainable(output_kinds(analysis))
        self.names = list(dict.fromkeys(k.logits for k in self.kinds))
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, outs: dict, y) -> torch.Tensor:
        total = 0.0
        for k in self.kinds:
            f = outs[k.logits]
            if not torch.isfinite(f).all():
                raise DataError(f"the model produced NaN/inf values in '{k.logits}' on the "
                                "data - check the input scaling (--mean/--std)")
            n = len(f)
            if k.kind == "class":  # one class sampled per position along the class axis
                f = f.movedim(k.axis, -1).reshape(-1, f.shape[k.axis])
                probs = F.softmax(f.detach().double(), 1)
                target = torch.multinomial(probs, 1, generator=self.gen)[:, 0]
                total = total + F.cross_entropy(f, target, reduction="sum") / n
            elif k.kind == "binary":  # a Bernoulli sample of each probability
                target = torch.bernoulli(torch.sigmoid(f.detach()), generator=self.gen)
                total = total + F.binary_cross_entropy_with_logits(
                    f, target, reduction="sum") / n
            else:
                sigma = f.detach().pow(2).mean().clamp(min=1e-12).sqrt()
                e = torch.randn(f.shape, generator=self.gen, device=f.device, dtype=f.dtype)
                total = total - (e * f).sum() / (sigma * len(f))
        return total


def _logits_name(analysis) -> str:
    """The first output, or the logits in front of the Softmax / LogSoftmax / Sigmoid that
    makes it, behind Identities and Casts (cross-entropy on probabilities scores channels
    by the wrong loss)."""
    view = analysis.view
    out = view.output_names[0]
    node = behind_copies(view, view.producer.get(out))
    if node is not None and node.op_type == "Sigmoid":
        return node.input[0]
    logits = None if node is None else analysis.rules[node.name].logits_input(node)
    return out if logits is None else logits


def _check_logits(logits: torch.Tensor, target: torch.Tensor, name: str) -> None:
    if logits.dim() < 2 or logits.flatten(1).shape[1] <= int(target.max()):
        raise DataError(f"output '{name}' has shape {tuple(logits.shape)}; the taylor criterion "
                        f"needs (N, classes) logits with more than {int(target.max())} classes")
    if not torch.isfinite(logits).all():
        raise DataError(f"the model produced NaN/inf logits in '{name}' on the data - check the "
                        "input scaling (--mean/--std)")
