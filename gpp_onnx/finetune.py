"""Training an ONNX model through the torch backend: cross-entropy fine-tuning after a cut.

``epochs * ceil(N / batch)`` steps (fractional epochs allowed) of the one trainer
(``gpp_onnx.train.Trainer``: SGD, cosine schedule, the gradient's global norm clipped to
``clip_grad`` - a repaired cut can leave large weights, and a sharp loss that plain SGD
overshoots); the trained weights are written back to the ONNX initializers by name.
Under torchrun each process trains on its share of every global batch
(``gpp_onnx.distributed``); the steps and the result are the same on every rank.
"""
from __future__ import annotations

import logging
import math

import onnx

from . import distributed
from .config import TrainOptions
from .data import Dataset, iter_batches
from .errors import DataError

logger = logging.getLogger(__name__)


def _batches(ds: Dataset, batch_size: int, seed: int):
    """Endless epochs of shuffled batches (seed + epoch); in a distributed run this
    process's share of each global batch."""
    part = distributed.part()
    if len(ds.y) < part[1]:
        raise DataError(f"{len(ds.y)} training images cannot be shared by {part[1]} "
                        "processes - give more data or start fewer processes")
    epoch = 0
    while True:
        yield from iter_batches(ds, batch_size, shuffle=True, seed=seed + epoch, part=part)
        epoch += 1


def train_model(model: onnx.ModelProto, data: Dataset, options: TrainOptions, seed: int = 0,
                desc: str = "fine-tune", losses: list | None = None) -> onnx.ModelProto:
    """Return a copy of `model` trained on `data` (cross-entropy unless `losses` are given)
    with the one trainer (gpp_onnx.train)."""
    import torch

    from .torch_backend import OnnxModule, resolve_device, write_back
    from .train import CrossEntropy, Trainer

    steps = max(1, round(options.epochs * math.ceil(len(data.y) / options.batch_size)))
    torch.manual_seed(seed + distributed.rank())  # dropout masks differ between ranks
    module = OnnxModule(model, device=resolve_device(options.device))
    trainer = Trainer(module, losses or [CrossEntropy()], options, steps)
    trainer.fit(_batches(data, options.batch_size, seed), desc)
    return write_back(module, model)
