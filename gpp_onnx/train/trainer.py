"""The one training loop: fine-tuning, push and the tools all run through it.

``Trainer(module, losses, options, steps)``: SGD with momentum and weight decay, a cosine
learning-rate schedule over ``steps``, the gradient's global norm clipped to
``options.clip_grad``, optional mixed precision on CUDA (``options.amp``), BatchNorm in training
mode (``options.batchnorm == "frozen"``: on its running statistics); with
``options.renorm``, a BatchNorm (batch statistics) on each conv an exporter folded one
into, from the first step until the last, then folded back (``gpp_onnx.train.renorm``;
partial ``fit`` calls keep it, in the checkpoint state). The layers that read
an input of raw scale (pixels in 0..255) step as they would on a unit-scale input
(``gpp_onnx.train.scale``). A step runs the torch backend through ``forward`` of
:class:`Tapped`, which returns the logits and every value a loss ``needs`` (e.g. the final hidden layer for the
push loss); the step's loss is the sum of the loss objects'. A batch is ``(x, targets)``:
``targets`` a dict of arrays (``"y"`` the labels, teacher outputs under
``teacher.target_key(output)``), or the
labels array alone (``{"y": y}``). When a process group is up (``gpp_onnx.distributed``,
started by torchrun) the net runs in DistributedDataParallel: each rank steps on its
share of the global batch, the gradients are averaged, and every rank ends with the same
weights (checked at the end of ``fit``). ``state_dict`` / ``load_state_dict`` hold what a
checkpoint needs (step, optimiser, schedule, loss statistics); the weights are the
module's.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from .. import distributed
from ..batching import module_inputs, rows, tensors
from ..config import TrainOptions
from ..errors import DataError
from ..progress import track
from . import renorm
from .scale import RMS_LIMIT, input_layers

logger = logging.getLogger(__name__)


_AMP_WARNED: list[bool] = []


def logits_value(module) -> str:
    """The value the losses read as the logits: the model's first output, or the input of
    the Softmax over the classes or the Sigmoid that produces it, behind Identities and
    Casts (tf2onnx's output Identity) (cross-entropy on probabilities would apply a softmax
    twice and barely train; on a Sigmoid's it lowered held-out accuracy)."""
    out = module.output_names[0]
    producer = {o: node for node in module.nodes for o in node.outputs}
    value = out
    while (node := producer.get(value)) is not None and node.op_type in ("Identity", "Cast"):
        value = node.inputs[0]
    if node is not None:
        axis = node.attr("axis", 1 if node.opset < 13 else -1)
        if (node.op_type == "Softmax" and axis in (1, -1)) or node.op_type == "Sigmoid":
            return node.inputs[0]
    return out


class Tapped(nn.Module):
    """An OnnxModule whose forward returns its logits (``logits_value``) and the named
    intermediate values."""

    def __init__(self, module, names: tuple[str, ...] = ()):
        super().__init__()
        self.module = module
        self.names = tuple(dict.fromkeys(names))
        self.logits = logits_value(module)

    def forward(self, x) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`x`: the input's tensor, or ``{input name: tensor}`` (``gpp_onnx.batching``)."""
        out = self.logits
        values = self.module.run(module_inputs(x), [out, *[n for n in self.names if n != out]])
        return values[out], values


@contextlib.contextmanager
def _inference(module):
    """Every node of `module` in inference mode (BatchNorm on its running statistics, left
    as they are; Dropout off: no random numbers drawn) until the block ends, then each as
    it was."""
    modes = [(node, node.training) for node in module.nodes]
    for node, _ in modes:
        node.training = False
    try:
        yield
    finally:
        for node, mode in modes:
            node.training = mode


def _parallel(net: Tapped) -> nn.Module:
    """`net` in DistributedDataParallel when a process group is up (it then starts from
    rank 0's weights and buffers, and averages the gradients), else `net` itself. The
    buffers are broadcast again before each forward only where they change in training
    (BatchNormalization running statistics: rank 0's are kept; each rank normalises by
    its own share's batch statistics, as DDP without SyncBatchNorm does)."""
    if distributed.world_size() == 1:
        return net
    from torch.nn.parallel import DistributedDataParallel

    device = net.module.device
    sync = bool(net.module.stat_names)
    sync_arg = ("forward_sync_buffers" if "forward_sync_buffers" in
                inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers")
    return DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None,
                                   **{sync_arg: sync})


class Trainer:
    """`accumulate`: batches whose gradients are summed into each step (a model whose
    input fixes the batch below ``--batch-size`` still steps on that many images)."""

    def __init__(self, module, losses: list, options: TrainOptions, steps: int,
                 accumulate: int = 1):
        self.module, self.losses, self.options = module, losses, options
        self.steps = max(1, int(steps))
        self.accumulate = max(1, int(accumulate))
        per_forward = options.batch_size // distributed.world_size()
        self.renorm = (renorm.attach(module) if options.renorm and per_forward >= renorm.MIN_BATCH
                       and self.steps >= renorm.MIN_STEPS else None)
        self.net = _parallel(Tapped(module, tuple(n for loss in losses for n in loss.needs)))
        self.params = [p for _, p in module.named_onnx_parameters()]
        if self.renorm is not None:
            self.params += list(self.renorm.parameters())
        self.lr = (options.renorm_lr if self.renorm is not None and options.renorm_lr is not None
                   else options.lr)
        self.opt = torch.optim.SGD(self.params, lr=self.lr, momentum=options.momentum,
                                   weight_decay=options.weight_decay)
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, self.steps)
        self.amp = options.amp and module.device.type == "cuda"
        if options.amp and not self.amp and not _AMP_WARNED:
            _AMP_WARNED.append(True)         # once per run, not once per round
            logger.warning("--amp applies on CUDA only: training in float32 on %s",
                           module.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp else None
        self.step_no = 0
        self.input_layers = input_layers(module)
        # weight name -> the RMS of the raw-scale input it reads, set on the first step
        self.input_scales: dict[str, float] | None = None

    def fit(self, batches: Iterator[tuple[np.ndarray, np.ndarray | dict]], desc: str = "train",
            steps: int | None = None) -> list[dict]:
        """Run `steps` (default: all that are left) steps on `batches` of (x, targets)."""
        todo = self.steps - self.step_no if steps is None else steps
        device = self.module.device
        self.module.train()
        if self.options.batchnorm == "frozen":
            self.module.freeze_batchnorm()
        logs = []
        for _ in track(range(todo), desc, todo, logger):
            parts = []
            for _ in range(self.accumulate):
                x, targets = next(batches)
                targets = targets if isinstance(targets, dict) else {"y": targets}
                parts.append((tensors(x, device),
                              {k: torch.from_numpy(np.asarray(v)).to(device)
                               for k, v in targets.items()}))
            logs.append(self.step_on(parts, desc))
        self.module.eval()
        # each rank updated BatchNorm running stats on its own share last: keep rank 0's
        distributed.broadcast_tensors([t for _, t in self.module.named_onnx_tensors()
                                       if not isinstance(t, nn.Parameter)]
                                      + list(self.renorm.buffers() if self.renorm else []))
        if self.renorm is not None and self.step_no >= self.steps:
            renorm.detach(self.module)      # the last step is done: fold into the convs
            logger.info("%s: the BatchNorms on %d folded conv(s) are folded back", desc,
                        len(self.renorm.nodes))
            self.renorm = None
        distributed.same_tensors(self.module.named_onnx_tensors(), "weights")
        if logs:
            k = min(10, max(1, len(logs) // 2))   # first and last steps, not overlapping
            first, last = logs[:k], logs[-k:]
            logger.info("%s: %d steps on %s, loss %.3f -> %.3f", desc, len(logs), device,
                        np.mean([r["loss"] for r in first]), np.mean([r["loss"] for r in last]))
        return logs

    def step(self, x: torch.Tensor, targets: dict | torch.Tensor, desc: str = "train") -> dict:
        return self.step_on([(x, targets if isinstance(targets, dict) else {"y": targets})],
                            desc)

    def step_on(self, batches: list[tuple[torch.Tensor, dict]], desc: str = "train") -> dict:
        """One optimiser step on the summed gradients of `batches` (x, targets), each
        batch's loss weighted by its share of the images (the mean over all of them)."""
        images = sum(rows(x) for x, _ in batches)
        if self.input_scales is None:
            self.input_scales = self._input_scales([x for x, _ in batches])
        if self.renorm is not None and not self.renorm.started:
            with _inference(self.module):
                self.renorm.start(self.module, [x for x, _ in batches])
            logger.info("%s: BatchNorm put back on %d folded conv(s) for training (lr %g)",
                        desc, len(self.renorm.nodes), self.lr)
        self.opt.zero_grad(set_to_none=True)
        total_loss, log = 0.0, {}
        for i, (x, targets) in enumerate(batches):
            # under DDP the gradients are averaged across ranks on the last batch only
            sync = (self.net.no_sync() if i < len(batches) - 1 and hasattr(self.net, "no_sync")
                    else contextlib.nullcontext())
            with sync:
                with torch.autocast("cuda", enabled=self.amp):
                    logits, values = self.net(x)
                total = 0.0
                for loss in self.losses:
                    value, parts = loss(logits.float(), targets,
                                        {k: v.float() for k, v in values.items()})
                    total = total + value
                    log.update(parts)
                if not torch.isfinite(total):
                    raise DataError(f"{desc} diverged (loss {float(total.detach())} at step "
                                    f"{self.step_no + 1} of {self.steps}) - lower --lr "
                                    f"(now {self.lr:g})")
                share = total * (rows(x) / images)
                (self.scaler.scale(share) if self.scaler else share).backward()
            total_loss += float(share.detach())
        if self.scaler:
            self.scaler.unscale_(self.opt)
        for name, rms in self.input_scales.items():
            grad = self.module.params[self.module.param_key(name)].grad
            if grad is not None:
                grad.div_(rms * rms)
        if self.options.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.options.clip_grad)
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.schedule.step()
        self.step_no += 1
        log["loss"] = total_loss
        return log

    def _input_scales(self, xs: list[torch.Tensor]) -> dict[str, float]:
        """Weight name -> the RMS of its layer's data input over every rank's first batch,
        for the layers reading the input (``gpp_onnx.train.scale``) where it is above
        RMS_LIMIT."""
        if not self.input_layers:
            return {}
        values = sorted({value for _, value in self.input_layers})
        squares, counts = dict.fromkeys(values, 0.0), dict.fromkeys(values, 0)
        with torch.no_grad(), _inference(self.module):
            for x in xs:
                got = self.module.run(module_inputs(x), values)
                for value in values:
                    squares[value] += float(got[value].double().pow(2).sum())
                    counts[value] += got[value].numel()
        rms = {value: (distributed.all_sum(squares[value])
                       / max(distributed.all_sum(counts[value]), 1)) ** 0.5
               for value in values}
        scales = {weight: rms[value] for weight, value in self.input_layers
                  if rms[value] > RMS_LIMIT}
        if scales:
            logger.info("%d layer(s) read the input at RMS %s: they step as on a unit-scale "
                        "input (their gradients divided by its square)", len(scales),
                        ", ".join(sorted({f"{r:.3g}" for r in scales.values()})))
        return scales

    def state_dict(self) -> dict:
        return {"step": self.step_no, "input_scales": self.input_scales,
                "renorm": self.renorm.state_dict() if self.renorm is not None else None,
                "optimizer": self.opt.state_dict(),
                "schedule": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "losses": [loss.state_dict() if hasattr(loss, "state_dict") else None
                           for loss in self.losses]}

    def load_state_dict(self, state: dict) -> None:
        self.step_no = state["step"]
        self.input_scales = state.get("input_scales")
        if self.renorm is not None and state.get("renorm") is not None:
            self.renorm.load_state_dict(state["renorm"])
        self.opt.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        for loss, s in zip(self.losses, state["losses"]):
            if s is not None:
                loss.load_state_dict(s)
