"""Step-wise pruning for users who own the training loop.

    pruner = StepPruner(model, steps=3, ratio=0.5)     # a path or an onnx.ModelProto
    module = pruner.module                             # torch.nn.Module (torch backend)
    for _ in range(pruner.steps):
        train(module)                                  # the user's loop, any optimiser
        module = pruner.step(module)                   # weights in, one verified cut, out
    small = pruner.to_onnx(module)                     # onnx.ModelProto, verified

Each ``step`` writes the module's weights back into the ONNX model (by initializer
name), runs one round of the pipeline on it (score -> plan -> cut -> repair -> verify,
``rounds.one_round``, without its own fine-tuning) and returns the torch module of the
smaller model. A target is reached over the steps as in ``--rounds``: ratio r removes
``1 - (1-r)^(1/K)`` of the current widths per step, a MACs/params fraction f gives
``f^(k/K)`` after step k.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import onnx

from . import batch, verify
from .analysis import analyze_model
from .config import PruneConfig
from .errors import InputError
from .start import start_run, with_label_mode
from .rounds import Round, one_round

logger = logging.getLogger(__name__)


class StepPruner:
    def __init__(self, model, steps: int = 3, config: PruneConfig | None = None, **options):
        base = replace(config or PruneConfig(), **options)
        self.config = with_label_mode(replace(base, rounds=steps, latency=False,
                                              mask_only=False,
                                              train=replace(base.train, epochs=0.0)),
                                      model).checked()
        self.start = start_run(model, self.config)
        self.model: onnx.ModelProto = self.start.normalized
        self.widths = {g.key: g.width for g in self.start.analysis.groups}  # the steps' goal
        self.rounds: list[Round] = []
        self._module = None

    @property
    def steps(self) -> int:
        return self.config.rounds

    @property
    def module(self):
        """The current model as a trainable torch module (built once per step)."""
        if self._module is None:
            from .torch_backend import OnnxModule, resolve_device

            self._module = OnnxModule(self.model, resolve_device(self.config.train.device))
        return self._module

    def step(self, module=None):
        """Take the trained `module`'s weights (default: the pruner's own module), cut one
        step and return the smaller model's module."""
        if len(self.rounds) >= self.steps:
            raise InputError(f"all {self.steps} steps are done - call to_onnx(), or make a "
                             "StepPruner with more steps")
        self.model = self._weights_from(module)
        analysis = analyze_model(self.model, self.config.input_shape).keeping(
            self.config.ignore)
        done = one_round(analysis, self.config, self.start.data, len(self.rounds) + 1, None,
                         self.start.before, self.start.tolerance, self.widths)
        self.rounds.append(done)
        self.model, self._module = done.model, None
        logger.info("step %d of %d: %d channels cut, %d params", len(self.rounds), self.steps,
                    done.plan.removed_channels, done.params)
        return self.module

    def to_onnx(self, module=None) -> onnx.ModelProto:
        """The current model with `module`'s weights, checked by onnx's checker and
        onnxruntime; an input that fixed the batch declares it again, as prune's output does."""
        model = batch.declare(self.start.loaded.model, self._weights_from(module))
        verify.check(model, "stepwise model")
        verify.make_session(model, "stepwise model")
        return model

    def _weights_from(self, module) -> onnx.ModelProto:
        module = module if module is not None else self._module
        if module is None:
            return self.model
        from .torch_backend import write_back

        return write_back(module, self.model)
