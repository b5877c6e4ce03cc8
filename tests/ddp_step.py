"""Run under torchrun (or in one process): two training steps of the digits CNN on one
fixed global batch, cross-entropy alone and cross-entropy + push; every rank saves the
weights it ends with to OUT/rank<R>.npz. tests/test_distributed.py compares them."""
from __future__ import annotations

import os
import sys

import numpy as np
import torch

from gpp_onnx import distributed
from gpp_onnx.config import TrainOptions
from gpp_onnx.data import DataSpec, iter_batches, load_dataset
from gpp_onnx.samples import digits_cnn
from gpp_onnx.torch_backend import OnnxModule
from gpp_onnx.train import CrossEntropy, PushLoss, Trainer, renorm

GLOBAL_BATCH = 23          # odd: the ranks' shares differ in size (11 and 12)
FEATURE = "relu21"         # the digits CNN's final hidden layer


def train(losses: list, renorm: bool = False) -> dict[str, np.ndarray]:
    data = load_dataset(DataSpec("digits", 1, 8, 8)).subset(np.arange(GLOBAL_BATCH))
    module = OnnxModule(digits_cnn(0))
    trainer = Trainer(module, losses, TrainOptions(lr=0.1, renorm=renorm), steps=2)
    batches = (b for _ in range(2) for b in iter_batches(data, GLOBAL_BATCH,
                                                         part=distributed.part()))
    trainer.fit(batches, "step")
    return {name: p.detach().numpy().copy() for name, p in module.named_onnx_parameters()}


def main(out: str) -> None:
    torch.set_num_threads(1)
    distributed.setup(os.environ, "cpu")
    try:
        ce = train([CrossEntropy()])
        push = train([CrossEntropy(), PushLoss(FEATURE, 10)])
        renorm.MIN_BATCH = renorm.MIN_STEPS = 1     # two steps of a few images
        normed = train([CrossEntropy()], renorm=True)
        np.savez(os.path.join(out, f"rank{distributed.rank()}.npz"),
                 **{f"ce/{k}": v for k, v in ce.items()},
                 **{f"renorm/{k}": v for k, v in normed.items()},
                 **{f"push/{k}": v for k, v in push.items()})
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main(sys.argv[1])
