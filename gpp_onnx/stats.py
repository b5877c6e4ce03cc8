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

import functools
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

        self.keys_of: dict[str, list] = defaultdict(list)   # value -> cut keys it slices
        for key, slices in self.cuts.items():
            for value in dict.fromkeys(p.value for p in slices):
                self.keys_of[value].append(key)

    def _positions(self, kept: dict[str, np.ndarray]) -> dict[tuple[str, int, int], np.ndarray]:
        pos = {}
        for key in {k for v in kept for k in self.keys_of.get(v, ())}:
            for p in self.cuts[key]:
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

    def _param(self, name: str, size: int, pos) -> float:
        slots = self.users.get(name, ())
        if len(slots) <= 1:
            return size * (self._slot_fraction(slots[0], pos) if slots else 1.0)
        copies = {}
        for slot in slots:
            cut = tuple((axis, pos[(*slot, axis)].tobytes())
                        for axis in self.slot_axes.get(slot, ()) if (*slot, axis) in pos)
            copies.setdefault(cut, self._slot_fraction(slot, pos) if cut else 1.0)
        return size * sum(copies.values())

    def estimate(self, kept: dict[str, np.ndarray]) -> ModelStats:
        pos = self._positions(kept)
        params = sum(self._param(name, size, pos) for name, size in self.sizes.items())
        macs = 0.0
        for slot, m in self.macs.items():
            macs += m * self._slot_fraction(slot, pos)
        return ModelStats(int(round(params)), int(round(macs)))

    def removed(self, kept: dict[str, np.ndarray]) -> tuple[float, float]:
        """Params and MACs that cutting to `kept` removes: ``estimate({}) - estimate(kept)``
        before rounding, summed over the slots the cut touches alone (a group's share in
        a graph of thousands of nodes cost a walk over all of them per group)."""
        pos = self._positions(kept)
        slots = {key[:2] for key in pos}
        names = {self.slot_param[s] for s in slots if s in self.slot_param}
        params = sum(self._param(n, self.sizes[n], {}) - self._param(n, self.sizes[n], pos)
                     for n in names)
        macs = sum(self.macs[s] * (1 - self._slot_fraction(s, pos))
                   for s in slots if s in self.macs)
        return params, macs

    @functools.cached_property
    def slot_param(self) -> dict[tuple[str, int], str]:
        return {slot: name for name, slots in self.users.items() for slot in slots}
