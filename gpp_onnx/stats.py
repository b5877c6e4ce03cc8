"""Parameter and MAC counts, exact for a model and estimated for a plan.

MACs per sample (batch 1 shapes):
* Conv ``Y (M, H', W')``, ``W (M, C/g, k...)``: ``M*H'*W' * (C/g)*prod(k)``;
* ConvTranspose ``X (C, H, W)``, ``W (C, M/g, k...)``: ``C*H*W * (M/g)*prod(k)``;
* Gemm / MatMul with constant ``B (K, N)``: ``rows * K * N``.
Other ops are not counted (the usual convention for CNN MACs).
Params: elements of all floating-point initializers.

A plan cuts each weight along some axes; the estimate multiplies every count by the
kept fraction along each cut axis, which is exact for the ops above.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx

from .graph import GraphView

FLOAT = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
         onnx.TensorProto.BFLOAT16}


@dataclass(frozen=True)
class ModelStats:
    params: int
    macs: int


def node_macs(view: GraphView) -> dict[str, int]:
    """MACs of every weighted node, keyed by node name."""
    macs = {}
    for node in view.nodes:
        if len(node.input) < 2 or not view.is_const(node.input[1]):
            continue
        w = view.shape(node.input[1])
        if node.op_type == "Conv":
            macs[node.name] = int(np.prod(view.shape(node.output[0])[1:])) * int(np.prod(w[1:]))
        elif node.op_type == "ConvTranspose":
            macs[node.name] = int(np.prod(view.shape(node.input[0])[1:])) * int(np.prod(w[1:]))
        elif node.op_type in ("Gemm", "MatMul") and len(w) == 2:
            rows = int(np.prod(view.shape(node.output[0])[:-1]))
            macs[node.name] = rows * int(np.prod(w))
    return macs


def param_sizes(model: onnx.ModelProto) -> dict[str, int]:
    return {t.name: int(np.prod(t.dims)) for t in model.graph.initializer
            if t.data_type in FLOAT}


def count(view: GraphView) -> ModelStats:
    return ModelStats(sum(param_sizes(view.model).values()), sum(node_macs(view).values()))


class Estimator:
    """Params and MACs of the pruned model for a kept-element map, without surgery."""

    def __init__(self, analysis):
        view = analysis.view
        self.macs = node_macs(view)
        self.sizes = param_sizes(view.model)
        self.cuts: dict[tuple[str, int], list] = defaultdict(list)  # (param, axis) -> slices
        self.node_cuts: dict[str, set] = defaultdict(set)
        for p in analysis.params:
            self.cuts[(p.param, p.axis)].append(p)
            if p.input_index == 1:
                self.node_cuts[p.node].add((p.param, p.axis))
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
        for node, m in self.macs.items():
            f = 1.0
            for key in self.node_cuts.get(node, ()):
                f *= frac.get(key, 1.0)
            macs += m * f
        return ModelStats(int(round(params)), int(round(macs)))
