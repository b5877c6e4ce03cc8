"""Repair after the cut: fold the removed channels' mean contribution into biases.

Exported graphs usually have BatchNorm folded into the convs, so nothing re-centres a
layer whose inputs lost channels. A consumer's output o receives ``sum_c W[o, c] * x_c``;
replacing a removed ``x_c`` by its mean ``m_c`` over the data keeps that term on average:

    Conv:           b[o] += mean over output positions of conv(x_m)[o], x_m holding m_c
                    on the removed channels and 0 elsewhere (exact at padded borders;
                    away from them ``sum_{c removed in o's group} m_c sum_k W[o, c mod C/g, k]``)
    ConvTranspose:  b[o] += sum_{c removed} m_c * sum_k W[c, o, k]            (group 1)
    Gemm:           C[o] += alpha / beta * sum_{c removed} m_c * W'[c, o]

``m_c`` is the mean of the consumer's input over images and all non-channel axes (for a
Gemm after Flatten, per feature). Border effects of ConvTranspose are ignored. MatMul
consumers have no bias and are left as they are.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx

from .ops import ROLE_IN
from .verify import make_session, outputs

logger = logging.getLogger(__name__)


def channel_means(model: onnx.ModelProto, values: dict[str, int], batches) -> dict[str, np.ndarray]:
    """Mean of each value along its channel axis (`values`: name -> axis) over `batches`."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    known = {o.name for o in exposed.graph.output}
    exposed.graph.output.extend(onnx.ValueInfoProto(name=v) for v in values if v not in known)
    session = make_session(exposed, "mean probe")
    names = list(values)
    input_name = session.get_inputs()[0].name
    sums: dict[str, np.ndarray] = {}
    count = 0
    for x in batches:
        got = outputs(session, {input_name: x}, "mean probe")
        by_name = dict(zip([o.name for o in session.get_outputs()], got))
        for name in names:
            v = np.moveaxis(by_name[name].astype(np.float64), values[name], 0)
            sums[name] = sums.get(name, 0) + v.reshape(v.shape[0], -1).mean(axis=1) * len(x)
        count += len(x)
    return {name: sums[name] / max(count, 1) for name in names}


def values_to_measure(analysis, kept) -> dict[str, int]:
    return {p.value: analysis.axes[p.value] for p in analysis.params
            if p.role == ROLE_IN and p.value in kept}


def bias_deltas(analysis, kept: dict[str, np.ndarray],
                means: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Bias change of every consumer (original output indexing) for the removed inputs."""
    nodes = {n.name: n for n in analysis.view.nodes}
    deltas: dict[str, np.ndarray] = {}
    for p in analysis.params:
        if p.role != ROLE_IN or p.value not in kept or p.value not in means:
            continue
        width = len(means[p.value])
        removed = np.setdiff1d(np.arange(width), kept[p.value])
        node = nodes[p.node]
        delta = _delta(node, analysis.view.const(p.param), removed, means[p.value][removed], p,
                       analysis.view.shape(p.value))
        if delta is None:
            logger.debug("no bias repair for %s (%s)", node.name, node.op_type)
            continue
        deltas[node.name] = deltas.get(node.name, 0) + delta
    return deltas


def _attr(node, name, default):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name),
                default)


def _conv_response(node, w: np.ndarray, removed, m, in_shape) -> np.ndarray | None:
    """Mean over output positions of the conv applied to the removed channels' means."""
    import torch
    import torch.nn.functional as F

    spatial = len(in_shape) - 2
    if _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or spatial not in (1, 2, 3):
        return None
    x = torch.zeros((1, *in_shape[1:]), dtype=torch.float64)
    x[0, torch.as_tensor(removed)] = torch.as_tensor(m, dtype=torch.float64).view(
        -1, *([1] * spatial))
    pads = list(_attr(node, "pads", [0] * 2 * spatial))
    torch_pads = [v for i in reversed(range(spatial)) for v in (pads[i], pads[i + spatial])]
    conv = (F.conv1d, F.conv2d, F.conv3d)[spatial - 1]
    y = conv(F.pad(x, torch_pads), torch.as_tensor(w), stride=_attr(node, "strides", 1),
             dilation=_attr(node, "dilations", 1), groups=_attr(node, "group", 1))
    return y[0].flatten(1).mean(dim=1).numpy()


def _delta(node, w: np.ndarray, removed: np.ndarray, m: np.ndarray, p,
           in_shape=None) -> np.ndarray | None:
    if len(removed) == 0:
        return None
    w = w.astype(np.float64)
    if node.op_type == "Conv" and in_shape is not None:
        exact = _conv_response(node, w, removed, m, in_shape)
        if exact is not None:
            return exact
    if node.op_type == "Conv":
        wsum = w.reshape(w.shape[0], w.shape[1], -1).sum(axis=2)   # (M, C/g)
        groups, cg = _attr(node, "group", 1), w.shape[1]
        mg = w.shape[0] // groups
        delta = np.zeros(w.shape[0])
        cols = removed if p.index is None else p.index[removed]
        for c, j, mean in zip(removed, cols, m):
            gi = c // cg if groups > 1 else 0
            delta[gi * mg:(gi + 1) * mg] += mean * wsum[gi * mg:(gi + 1) * mg, j]
        return delta
    if node.op_type == "ConvTranspose" and _attr(node, "group", 1) == 1:
        wsum = w.reshape(w.shape[0], w.shape[1], -1).sum(axis=2)   # (C, M)
        return m @ wsum[removed]
    if node.op_type == "Gemm":
        rows = w.T if _attr(node, "transB", 0) else w              # (K, N)
        return _attr(node, "alpha", 1.0) * (m @ rows[removed])
    return None
