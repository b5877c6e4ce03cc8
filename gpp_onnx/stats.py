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
    """Params and MACs of the pruned model for a kept-element map, without surgery.

    Cuts are per weight slot (node, input): a parameter several nodes read (a block
    applied twice) is cut by each on its own, and surgery gives each distinct cut its
    own copy (identical ones are shared again)."""

    def __init__(self, analysis):
        view = analysis.view
        self.macs = slot_macs(view)
        self.sizes = param_sizes(view.model)
        self.cuts: dict[tuple[str, int, int], list] = defaultdict(list)  # (node, input, axis)
        self.slot_axes: dict[tuple[str, int], list[int]] = defaultdict(list)
        for p in analysis.params:
            key = (p.node, p.input_index, p.axis)
            if key not in self.cuts:
                self.slot_axes[(p.node, p.input_index)].append(p.axis)
            self.cuts[key].append(p)
        self.dims = {key: view.shape(slices[0].param)[key[2]] for key, slices in self.cuts.items()}
        self.users: dict[str, list[tuple[str, int]]] = defaultdict(list)  # param -> slots
        for node in view.nodes:
            for i, name in enumerate(node.input):
                if name in self.sizes:
                    self.users[name].append((node.name, i))

    def _positions(self, kept: dict[str, np.ndarray]) -> dict[tuple[str, int, int], np.ndarray]:
        pos = {}
        for key, slices in self.cuts.items():
            for p in slices:
                if p.value in kept:
                    pos[key] = p.positions(kept[p.value])
                    break
        return pos

    def _slot_fraction(self, slot, pos) -> float:
        f = 1.0
        for axis in self.slot_axes.get(slot, ()):
            key = (*slot, axis)
            if key in pos:
                f *= len(pos[key]) / self.dims[key]
        return f

    def estimate(self, kept: dict[str, np.ndarray]) -> ModelStats:
        pos = self._positions(kept)
        params = 0.0
        for name, size in self.sizes.items():
            slots = self.users.get(name, ())
            if len(slots) <= 1:
                params += size * (self._slot_fraction(slots[0], pos) if slots else 1.0)
                continue
            copies = {}
            for slot in slots:
                cut = tuple((axis, pos[(*slot, axis)].tobytes())
                            for axis in self.slot_axes.get(slot, ()) if (*slot, axis) in pos)
                copies.setdefault(cut, self._slot_fraction(slot, pos) if cut else 1.0)
            params += size * sum(copies.values())
        macs = 0.0
        for slot, m in self.macs.items():
            macs += m * self._slot_fraction(slot, pos)
        return ModelStats(int(round(params)), int(round(macs)))
