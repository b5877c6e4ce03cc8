"""Structural passes on a model's skeleton: its large float weights keep their name, type
and dims but not their values.

Shape inference and constant folding read the values of shape-like integer tensors only,
never a convolution's weights, yet onnx and onnx-graphsurgeon serialise, parse or copy
every tensor they are given. On the skeleton they handle a few kilobytes; the values go
back in afterwards (``restore``), each copied once. A weight that a pass would have to
read (a node computing on weights alone, other than Identity) makes the caller take the
long way instead.
"""
from __future__ import annotations

import numpy as np
import onnx

from .compat import sort_nodes
from .verify import without_initializers

FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
          onnx.TensorProto.BFLOAT16}
MIN_ELEMENTS = 4096   # smaller tensors stay whole


def strip(model: onnx.ModelProto, dtypes=frozenset(FLOATS)
          ) -> tuple[onnx.ModelProto, dict[str, onnx.TensorProto]]:
    """A copy of `model` whose large initializers of `dtypes` holding raw data are headers
    (name, type, dims), and name -> the original tensor of each of those."""
    out = without_initializers(model)
    stripped = {}
    for t in model.graph.initializer:
        if (t.data_type in dtypes and t.HasField("raw_data")
                and np.prod(t.dims, dtype=np.int64) >= MIN_ELEMENTS):
            header(out.graph.initializer.add(), t.name, t)
            stripped[t.name] = t
        else:
            out.graph.initializer.add().CopyFrom(t)
    return out, stripped


def header(tensor: onnx.TensorProto, name: str, like: onnx.TensorProto) -> None:
    tensor.name, tensor.data_type = name, like.data_type
    tensor.dims.extend(like.dims)


def restore(model: onnx.ModelProto, stripped: dict[str, onnx.TensorProto],
            aliases: dict[str, str] | None = None) -> None:
    """Give `model`'s header tensors their values back: ``stripped[name]`` as it was, or
    for ``aliases[name]`` (an Identity of that weight folded into a constant) its values
    under the new name, as onnx-graphsurgeon writes a folded constant (dims, type, name,
    raw data)."""
    aliases = aliases or {}
    for t in model.graph.initializer:
        if t.name in aliases:
            source = stripped[aliases[t.name]]
            t.raw_data = source.raw_data
        elif t.name in stripped:
            t.CopyFrom(stripped[t.name])


def normalized(model: onnx.ModelProto, normalize) -> onnx.ModelProto | None:
    """`normalize` (``model._normalize``) run on the skeleton and the weights restored, or
    None where a pass would read a large weight: symbolic shape inference (Shape ops),
    weights that are graph inputs, or a node other than Identity that computes on
    constants alone with a weight among them."""
    if any(n.op_type == "Shape" for n in model.graph.node):
        return None
    skel, stripped = strip(model)
    if not stripped or stripped.keys() & {v.name for v in model.graph.input}:
        return None
    sort_nodes(skel.graph)
    aliases = _fold_weight_identities(skel, stripped)
    if aliases is None:
        return None
    folded = normalize(skel)
    restore(folded, stripped, aliases)
    return folded


def _fold_weight_identities(model: onnx.ModelProto, stripped) -> dict[str, str] | None:
    """Identity nodes of stripped float32 weights become header initializers named by their
    output (what constant folding makes of them); returns output -> weight, or None when
    another node computes on constants alone with a stripped weight among them."""
    graph, outputs = model.graph, {o.name for o in model.graph.output}
    aliases: dict[str, str] = {}
    const = {t.name for t in graph.initializer}
    keep = []
    for node in graph.node:
        source = aliases.get(node.input[0], node.input[0]) if node.input else None
        if (node.op_type == "Identity" and node.domain in ("", "ai.onnx")
                and source in stripped and node.output[0] not in outputs
                and stripped[source].data_type == onnx.TensorProto.FLOAT):
            aliases[node.output[0]] = source
            header(graph.initializer.add(), node.output[0], stripped[source])
            const.add(node.output[0])
            continue
        reads = [name for name in node.input if name]
        if all(name in const for name in reads):
            if any(name in stripped or name in aliases for name in reads):
                return None
            const.update(node.output)
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    return aliases
