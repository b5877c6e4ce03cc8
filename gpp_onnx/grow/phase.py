"""The grow phase of ``gpp --grow N`` (schedule.grow_step runs it before round 1): the
modules of ``loop.grow_model`` with the run's data, each trained its share of the epoch
budget, and the phase's report row."""
from __future__ import annotations

import logging

import onnx

from ..graph import GraphView
from ..stats import count
from .loop import GrowConfig, check_memory, grow_model, plan_positions

logger = logging.getLogger(__name__)


def check_grow(view: GraphView, config: GrowConfig) -> None:
    """Before any work: InputError for an --at that cannot take a module, or a grow that
    needs more memory than there is."""
    check_memory(view, plan_positions(view, config), config)


def grow_phase(model: onnx.ModelProto, config: GrowConfig, splits
               ) -> tuple[onnx.ModelProto, dict]:
    """Grow `model` (kept modules only) and the row the gpp report shows: every module
    tried, the epochs spent, the grown model's cost and held-out accuracy."""
    view = GraphView(model, config.input_shape)
    grown = grow_model(model, plan_positions(view, config), config, splits)
    cost = count(GraphView(grown.model, config.input_shape))
    epochs = config.train.epochs * len(grown.rows)
    kept = sum(r.kept for r in grown.rows)
    logger.info("grow: kept %d of %d module(s) in %.2f epochs; params %d, MACs %d", kept,
                len(grown.rows), epochs, cost.params, cost.macs)
    return grown.model, {"modules": [r.to_dict() for r in grown.rows], "kept": kept,
                         "epochs": epochs, "epochs_per_module": config.train.epochs,
                         "params": cost.params, "macs": cost.macs,
                         "accuracy_before": grown.base_accuracy, "accuracy": grown.accuracy}
