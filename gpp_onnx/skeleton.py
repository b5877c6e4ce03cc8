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
