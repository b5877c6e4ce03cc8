"""Parameter and MAC counts, exact for a model and estimated for a plan.

MACs per sample (batch 1 shapes) come from each op's rule (``OpRule.macs``, the formula
is in the rule's module): Conv, ConvTranspose, Gemm / MatMul with a constant weight,
LSTM / GRU / RNN. Other ops are not counted (the usual convention for CNN MACs).
Params: elements of all floating-point initializers.

A rule splits a node's MACs by the weight input they scale with; a plan cuts each weight
along some axes, and the estimate multiplies each part by the kept fraction along each
cut axis of its weight, which is exact for the ops above.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx

from .graph import GraphView
from .model import opset_version
from .ops import lookup

FLOAT = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
         onnx.TensorProto.BFLOAT16}


@dataclass(frozen=True)
class ModelStats:
    params: int
    macs: int


def slot_macs(view: GraphView) -> dict[tuple[str, int], int]:
    """MACs of every weighted node, keyed by (node name, weight input they scale with)."""
    opset = opset_version(view.model)
    macs = {}
    for node in view.nodes:
        for slot, m in lookup(node, opset).macs(node, view).items():
            macs[(node.name, slot)] = m
    return macs


def node_macs(view: GraphView) -> dict[str, int]:
    """MACs of every weighted node, keyed by node name."""
    macs: dict[str, int] = defaultdict(int)
    for (node, _slot), m in slot_macs(view).items():
        macs[node] += m
    return dict(macs)


def param_sizes(model: onnx.ModelProto) -> dict[str, int]:
    return {t.name: int(np.prod(t.dims)) for t in model.graph.initializer
            if t.data_type in FLOAT}


def count(view: GraphView) -> ModelStats:
    return ModelStats(sum(param_sizes(view.model).values()), sum(node_macs(view).values()))


class Estimator:
    """Params and MACs of the pruned model for a kept-element map, without surgery."""

    def __init__(self, analysis):
        view = analysis.view
        self.macs = slot_macs(view)
        self.sizes = param_sizes(view.model)
        self.cuts: dict[tuple[str, int], list] = defaultdict(list)  # (param, axis) -> slices
        self.slot_cuts: dict[tuple[str, int], set] = defaultdict(set)
        for p in analysis.params:
            self.cuts[(p.param, p.axis)].append(p)
            self.slot_cuts[(p.node, p.input_index)].add((p.param, p.axis))
        self.dims = {name: view.shape(name) for name, _ in self.cuts}

    def _fractions(self, kept: dict[str, np.ndarray]) -> dict[tuple[str, int], float]:
        frac = {}
        for (param, axis), slices in self.cuts.items():
            size = self.dims[param][axis]
            for p in slices:
                if p.value in kept:
                    frac[(param, axis)] = len(p.positions(kept[p.value])) / size
                    break
        return frac

    def estimate(self, kept: dict[str, np.ndarray]) -> ModelStats:
        frac = self._fractions(kept)
        params = 0.0
        per_param: dict[str, float] = defaultdict(lambda: 1.0)
        for (param, _axis), f in frac.items():
            per_param[param] *= f
        for name, size in self.sizes.items():
            params += size * per_param[name]
        macs = 0.0
        for slot, m in self.macs.items():
            f = 1.0
            for key in self.slot_cuts.get(slot, ()):
                f *= frac.get(key, 1.0)
            macs += m * f
        return ModelStats(int(round(params)), int(round(macs)))
