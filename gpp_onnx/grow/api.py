"""``grow``: the public entry of the grow step (load -> positions -> grow loop -> save)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx

from .. import model as model_io
from .. import batch, distributed, files, preflight, report, verify
from ..config import PruneConfig
from ..errors import UnsupportedModelError
from ..evaluation import data_input_shape
from ..graph import GraphView
from ..stats import ModelStats, count
from .loop import GrowConfig, ModuleRow, check_memory, grow_model, plan_positions

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GrowResult:
    output: Path | None                  # None: nothing was written
    report_path: Path | None
    modules: tuple[ModuleRow, ...]       # every module tried, the dropped one included
    before: ModelStats
    after: ModelStats
    accuracy_before: float | None
    accuracy_after: float | None
    report: dict = field(repr=False)
    model: onnx.ModelProto | None = field(default=None, repr=False)

    @property
    def kept(self) -> tuple[ModuleRow, ...]:
        return tuple(r for r in self.modules if r.kept)


def grow(model, output=None, config: GrowConfig | None = None, **options) -> GrowResult:
    """Insert Inception modules into `model` (a path or an onnx.ModelProto, never
    modified); with data, train each and keep it while held-out accuracy gains more than
    ``min_gain`` points. `options` are GrowConfig fields: ``grow(m, max_modules=1,
    train=TrainOptions(epochs=0))``. With `output` the grown model is written there,
    atomically, with a JSON report beside it."""
    from ..splits import load_data

    config = replace(config or GrowConfig(), **options).checked()
    src = None if isinstance(model, onnx.ModelProto) else model_io.model_path(model)
    dst = None if output is None else Path(output)
    if dst is not None:  # output writable with room, data readable: before any work
        preflight.check_output(src, dst, model.ByteSize() if src is None else 0)
    preflight.check_data(config.data.source if config.data is not None else None, dst)
    if config.data is not None:
        config = replace(config, input_shape=data_input_shape(
            model, config.input_shape, config.data.source, config.data.feeds))
    t0 = time.perf_counter()
    loaded = model_io.accept(model) if src is None else model_io.read(src)
    if verify.low_precision(loaded.model) is not None:
        raise UnsupportedModelError("grow adds float32 weights - grow the float32 version of "
                                    "the model")
    normalized = model_io.normalize(loaded.model)
    view = GraphView(normalized, config.input_shape)
    positions = plan_positions(view, config)
    need = check_memory(view, positions, config)
    _check_normalized(loaded, normalized, view)
    data = None if config.data is None else replace(config.data, labels=True)
    splits = load_data(view, PruneConfig(data=data, seed=config.seed,
                                         input_shape=config.input_shape))
    before = count(view)
    state = grow_model(normalized, positions, config, splits)
    state = replace(state, model=batch.declare(loaded.model, state.model))
    verify.check(state.model, "grown model")
    after = count(GraphView(state.model, config.input_shape))
    acc_before = state.base_accuracy
    data = _report(src, dst, config, state, before, after, acc_before, need,
                   time.perf_counter() - t0)
    report_path = None
    if dst is not None and distributed.is_writer():  # several processes: rank 0 writes
        with files.Outputs() as out:   # the model and its report: both or neither
            out.save(state.model, dst)
            report_path = out.text(dst.with_suffix(".report.json"), report.to_json(data))
    return GrowResult(dst, report_path, tuple(state.rows), before, after, acc_before,
                      state.accuracy, data, state.model)


def _check_normalized(loaded, normalized, view: GraphView) -> None:
    """Normalisation (folding, sorting) must not change what the file computes."""
    feeds = view.check_feeds()
    plain = view.plain_outputs(feeds, "input model")
    tol = verify.measure_tolerance(normalized, feeds, source=view.detached, plain=plain)
    loaded.check_unchanged(normalized, feeds, tol, plain)


def _report(src, dst, config: GrowConfig, state, before, after, acc_before, need,
            seconds) -> dict:
    return {
        "input": str(src or "<in-memory model>"), "output": None if dst is None else str(dst),
        "config": {"max_modules": config.max_modules, "at": list(config.at),
                   "widths": vars(config.widths), "min_gain_points": config.min_gain,
                   "data": None if config.data is None else vars(config.data),
                   "train": vars(config.train), "seed": config.seed},
        "seconds": round(seconds, 3), "memory_estimate_bytes": need,
        "before": {"params": before.params, "macs": before.macs, "accuracy": acc_before},
        "after": {"params": after.params, "macs": after.macs, "accuracy": state.accuracy},
        "modules": [r.to_dict() for r in state.rows],
    }
