"""BatchNorm put back, for training, on the convs an exporter folded it into.

Exporters fold an inference-mode BatchNorm into the preceding conv, so an exported CNN
fine-tunes without normalisation. On the Fashion-MNIST VGG net the same Torch-Pruning cut
reached 0.9125 test accuracy fine-tuned in torch with BatchNorm training and 0.9039 with
BatchNorm folded first (docs/fashion-mnist.md). :func:`attach` gives each folded conv
(:func:`folded_convs`) a BatchNorm on its output for the length of a training run:

    y = conv(x);   y' = gamma (y - mu_B) / sqrt(var_B + eps) + beta

with batch statistics (mu_B, var_B) in training mode and running statistics (m, v) updated
as torch's BatchNorm does (momentum 0.1). Until :meth:`Renorm.start` it passes y through
untouched. ``start`` measures each channel's mean and variance of y over the first batch
(every rank's share) and sets m, v to them, gamma = sqrt(v + eps), beta = m: on that batch
the training-mode output equals y exactly, and the inference-mode function is y. At the end
:meth:`Renorm.fold` writes the inference-mode function into the conv,

    W <- W s,   b <- (b - m) s + beta,   s = gamma / sqrt(v + eps)

and takes the BatchNorms away: the written graph is the graph that came in, with new
weights.

The trainer attaches it for runs of at least :data:`MIN_STEPS` steps with at least
:data:`MIN_BATCH` images per process in each forward (``finetune`` leaves it off for
``--batchnorm frozen``). Which convs (:func:`folded_convs`): a ``Conv`` whose weight and
bias are trained weights read by no other node, in a model without any
``BatchNormalization`` node (one that kept its BatchNorms folded none), and whose output
does not reach a graph output through parameter-free ops only (moves, pools,
activations, softmax: a classifier head, whose outputs the exporter did not normalise).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import distributed
from ..batching import module_inputs
from ..ops.elementwise import UNARY
from .scale import MOVES

EPS = 1e-5
MOMENTUM = 0.1
# A BatchNorm is put back only for runs of at least MIN_STEPS steps of at least MIN_BATCH
# images per process and forward. Measured: on Fashion-MNIST, 1720 steps of 64 gained on
# every seed; on the demo's digits, 78 steps of 64 took held-out accuracy after the cut
# from 0.9389 to 0.9611 (0.9389 without, one thread); on NudeNet, 16 steps of 16 (128
# unlabelled images) it made distillation lower the fidelity it raises without (held-out
# relative error 0.0477 after the repair, 0.0476 distilled without, 0.0483 with;
# docs/nolabel.md). The statistics of a few images are noise, and the running statistics
# that the fold uses lag the weights over a short run. Between the two, not measured:
# the limits lean to leaving it off.
MIN_BATCH = 32
MIN_STEPS = 50
_HEAD_OPS = MOVES | set(UNARY) | {"Softmax", "LogSoftmax"}   # parameter-free, to the outputs


class _Norm(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))  # checkpointed
        self.on = False                     # the same, read without a device sync

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.on = bool(self.started)

    def forward(self, y: torch.Tensor, training: bool) -> torch.Tensor:
        if not self.on:
            return y
        return nn.functional.batch_norm(y, self.running_mean, self.running_var, self.weight,
                                        self.bias, training, MOMENTUM, EPS)


def folded_convs(module) -> list:
    """The Conv nodes of `module` (an OnnxModule) that get a BatchNorm (module docstring)."""
    nodes = module.nodes
    if any(node.op_type == "BatchNormalization" for node in nodes):
        return []
    params = {name for name, _ in module.named_onnx_parameters()}
    reads: dict[str, int] = {}
    for node in nodes:
        for name in node.inputs:
            reads[name] = reads.get(name, 0) + 1
    return [node for node in nodes
            if node.op_type == "Conv" and len(node.inputs) > 2
            and all(node.inputs[i] in params and reads[node.inputs[i]] == 1 for i in (1, 2))
            and not _reaches_output(module, node.outputs[0])]


def _reaches_output(module, value: str) -> bool:
    """Whether `value` reaches a graph output through parameter-free ops only."""
    outputs, seen, todo = set(module.output_names), set(), [value]
    while todo:
        name = todo.pop()
        if name in outputs:
            return True
        if name in seen:
            continue
        seen.add(name)
        for node in module.nodes:
            if name in node.inputs and node.op_type in _HEAD_OPS:
                todo.extend(out for out in node.outputs if out)
    return False


class Renorm(nn.Module):
    """The BatchNorms of one training run, keyed by conv (module docstring)."""

    def __init__(self, module, nodes: list):
        super().__init__()
        self.nodes = {f"c{i}": node for i, node in enumerate(nodes)}
        self.norms = nn.ModuleDict()
        named = dict(module.named_onnx_parameters())
        for key, node in self.nodes.items():
            norm = _Norm(named[node.inputs[1]].shape[0])
            self.norms[key] = norm.to(module.device)
            _wrap(node, norm)

    @property
    def started(self) -> bool:
        return all(norm.on for norm in self.norms.values())

    @torch.no_grad()
    def start(self, module, xs: list[torch.Tensor]) -> None:
        """Set each BatchNorm to the identity on the channel statistics of its conv's output
        over `xs` (this rank's first batches; every rank's together)."""
        sums = {key: 0.0 for key in self.nodes}       # per channel: [sum y, sum y^2]
        counts = dict.fromkeys(self.nodes, 0)
        values = [node.outputs[0] for node in self.nodes.values()]
        for x in xs:
            got = module.run(module_inputs(x), values)
            for key, node in self.nodes.items():
                y = got[node.outputs[0]].double()
                dims = [0, *range(2, y.dim())]
                sums[key] = sums[key] + torch.stack([y.sum(dims), (y * y).sum(dims)])
                counts[key] += y.numel() // y.shape[1]
        for key, norm in self.norms.items():
            total = (distributed.sum_tensor(torch.as_tensor(sums[key]))
                     / max(distributed.all_sum(counts[key]), 1))
            mean, var = total[0], (total[1] - total[0] ** 2).clamp(min=0)
            norm.running_mean.copy_(mean)
            norm.running_var.copy_(var)
            norm.weight.copy_(torch.sqrt(var + EPS))
            norm.bias.copy_(mean)
            norm.started.fill_(True)
            norm.on = True

    @torch.no_grad()
    def fold(self, module) -> None:
        """Write each BatchNorm's inference-mode function into its conv and unwrap it."""
        named = dict(module.named_onnx_parameters())
        for key, node in self.nodes.items():
            norm = self.norms[key]
            node.fn = node.plain_fn
            del node.plain_fn
            if not norm.on:
                continue
            s = norm.weight / torch.sqrt(norm.running_var + EPS)
            weight, bias = named[node.inputs[1]], named[node.inputs[2]]
            weight.mul_(s.to(weight.dtype).view(-1, *[1] * (weight.dim() - 1)))
            bias.copy_((bias - norm.running_mean) * s + norm.bias)


def attach(module) -> Renorm | None:
    """Wrap each folded conv of `module` in a BatchNorm (a submodule ``module.renorm``, so
    that DistributedDataParallel and ``.to`` see it); None where there is none."""
    nodes = folded_convs(module)
    if not nodes:
        return None
    module.renorm = Renorm(module, nodes)
    return module.renorm


def detach(module) -> None:
    """Fold the BatchNorms of `module` into its convs and take them away."""
    renorm = getattr(module, "renorm", None)
    if renorm is not None:
        renorm.fold(module)
        del module.renorm


def _wrap(node, norm: _Norm) -> None:
    conv = node.fn

    def fn(n, *args):
        return norm(conv(n, *args), n.training)

    node.plain_fn = conv
    node.fn = fn
