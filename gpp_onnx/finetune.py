"""Training an ONNX model through the torch backend: cross-entropy fine-tuning after a cut.

SGD with momentum and weight decay, a cosine learning-rate schedule over
``epochs * ceil(N / batch)`` steps (fractional epochs allowed), the gradient's global norm
clipped to ``clip_grad`` (a repaired cut can leave large weights, and a sharp loss that
plain SGD overshoots), BatchNorm in training mode; the trained weights are written back to
the ONNX initializers by name.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import onnx

from .config import TrainOptions
from .data import Dataset, iter_batches
from .errors import DataError
from .progress import track

logger = logging.getLogger(__name__)


def _batches(ds: Dataset, batch_size: int, seed: int):
    epoch = 0
    while True:
        yield from iter_batches(ds, batch_size, shuffle=True, seed=seed + epoch)
        epoch += 1


def train_model(model: onnx.ModelProto, data: Dataset, options: TrainOptions, seed: int = 0,
                desc: str = "fine-tune") -> onnx.ModelProto:
    """Return a copy of `model` trained on `data` with cross-entropy."""
    import torch
    import torch.nn.functional as F

    from .torch_backend import OnnxModule, resolve_device, write_back

    steps = max(1, round(options.epochs * math.ceil(len(data.y) / options.batch_size)))
    torch.manual_seed(seed)
    device = resolve_device(options.device)
    module = OnnxModule(model, device=device).train()
    params = [p for _, p in module.named_onnx_parameters()]
    opt = torch.optim.SGD(params, lr=options.lr, momentum=options.momentum,
                          weight_decay=options.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses = []
    batches = _batches(data, options.batch_size, seed)
    for _ in track(range(steps), desc, steps, logger):
        x, y = next(batches)
        logits = module(torch.from_numpy(x).to(device))
        loss = F.cross_entropy(logits, torch.from_numpy(y).to(device))
        if not torch.isfinite(loss):
            raise DataError(f"{desc} diverged (loss {float(loss.detach())} at step {len(losses) + 1} "
                            f"of {steps}) - lower --lr (now {options.lr:g})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if options.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, options.clip_grad)
        opt.step()
        schedule.step()
        losses.append(float(loss.detach()))
    module.eval()
    logger.info("%s: %d steps on %s, loss %.3f -> %.3f", desc, steps, device,
                float(np.mean(losses[:10])), float(np.mean(losses[-10:])))
    return write_back(module, model)
