"""Training an ONNX model through the torch backend: fine-tuning after a cut.

The losses: cross-entropy with labels, plus ``options.distill`` times the distillation
loss (``train.Distill``) when a teacher is given; without labels the distillation loss
alone, the teacher's outputs computed per batch (``teacher.Teacher.with_targets``).

BatchNorm (``options.batchnorm``): batch statistics with labels; without labels it keeps
the running statistics (``auto``), those the original was trained with and the repair fitted
to: on a few hundred unlabelled images in batches of 8, batch statistics made distillation
lower the fidelity it was meant to raise (docs/nolabel.md, third-party models). The
BatchNorm put back on folded convs (``options.renorm``, ``train.renorm``) is on with or
without labels (the trainer leaves it off for short runs and small batches,
``train.renorm.MIN_STEPS`` / ``MIN_BATCH``); only an explicit
``frozen`` turns it off. Without labels it raised the held-out agreement with the original
on every seed of the Fashion-MNIST nets (docs/nolabel.md).

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
from dataclasses import replace

import onnx

from . import distributed
from .batch import fixed as fixed_batch  # the batch a model's inputs fix (None: free)
from .config import TrainOptions
from .data import Dataset, iter_batches
from .errors import DataError

logger = logging.getLogger(__name__)


def _batches(ds: Dataset, batch_size: int, seed: int):
    """Endless epochs of shuffled batches (seed + epoch); in a distributed run this
    process's share of each global batch."""
    part = distributed.part()
    if len(ds) < part[1]:
        raise DataError(f"{len(ds)} training images cannot be shared by {part[1]} "
                        "processes - give more data or start fewer processes")
    epoch = 0
    while True:
        yield from iter_batches(ds, batch_size, shuffle=True, seed=seed + epoch, part=part)
        epoch += 1


def train_model(model: onnx.ModelProto, data: Dataset, options: TrainOptions, seed: int = 0,
                desc: str = "fine-tune", losses: list | None = None,
                teacher=None) -> onnx.ModelProto:
    """Return a copy of `model` trained on `data` with the one trainer (gpp_onnx.train):
    `losses`, else those of :func:`default_losses`; with a `teacher`
    (``teacher.Teacher``), every batch carries its outputs as targets."""
    import torch

    from .torch_backend import OnnxModule, resolve_device, write_back
    from .train import Trainer

    if options.batchnorm == "frozen":       # asked for: no batch statistics anywhere
        options = replace(options, renorm=False)
    elif options.batchnorm == "auto":
        options = replace(options, batchnorm="train" if data.labelled else "frozen")
    fixed, accumulate = fixed_batch(model), 1
    if fixed is not None and fixed != options.batch_size:
        accumulate = max(1, options.batch_size // fixed)
        if accumulate > 1:
            logger.info("%s: the model's input fixes the batch at %d, so each step sums the "
                        "gradients of %d batches of %d (--batch-size %d)", desc, fixed,
                        accumulate, fixed, options.batch_size)
        else:
            logger.info("%s: the model's input fixes the batch at %d, so it trains in "
                        "batches of %d (not %d)", desc, fixed, fixed, options.batch_size)
        options = replace(options, batch_size=fixed)
    steps = max(1, round(options.epochs * math.ceil(len(data) / (options.batch_size
                                                                  * accumulate))))
    torch.manual_seed(seed + distributed.rank())  # dropout masks differ between ranks
    module = OnnxModule(model, device=resolve_device(options.device))
    trainer = Trainer(module, losses or default_losses(data, options, teacher), options, steps,
                      accumulate=accumulate)
    batches = _batches(data, options.batch_size, seed)
    trainer.fit(batches if teacher is None else teacher.with_targets(batches), desc)
    return write_back(module, model)


def default_losses(data: Dataset, options: TrainOptions, teacher=None) -> list:
    """Cross-entropy (+ ``options.distill`` x distillation) with labels; distillation alone
    without."""
    from .train import CrossEntropy, Distill

    if not data.labelled:
        if teacher is None:
            raise ValueError("training without labels needs a teacher")
        return [Distill(teacher.kinds, 1.0, options.temperature)]
    if teacher is not None and options.distill_weight > 0:
        return [CrossEntropy(), Distill(teacher.kinds, options.distill, options.temperature)]
    return [CrossEntropy()]
