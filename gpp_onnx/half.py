"""Weights a model stores in float16 or bfloat16 behind Cast nodes (a float16/bfloat16
initializer cast to float32 before its use). Normalising folds each such Cast into a
float32 weight; a written model gets them back where the values are still float16
(bfloat16) values, so its file keeps the input's precision and the function stays the
same bit for bit."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import verify

LOW = {onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16"}


def half_weights(original: onnx.ModelProto) -> dict[str, int]:
    """The values of `original` that are a float16 or bfloat16 initializer cast to float32,
    with that type: normalising folds each such Cast into a float32 weight of that name
    (a bfloat16 one was written in float32, twice its bytes, and nothing said so)."""
    inits = {t.name: t.data_type for t in original.graph.initializer}
    wide = onnx.TensorProto.FLOAT
    return {n.output[0]: inits[n.input[0]] for n in original.graph.node
            if n.op_type == "Cast" and n.input and inits.get(n.input[0]) in LOW
            and any(a.name == "to" and a.i == wide for a in n.attribute)}


def store_half(model: onnx.ModelProto, names: dict[str, int]
               ) -> tuple[onnx.ModelProto, int]:
    """`model` with each float32 weight in `names` whose every value its low type (float16
    or bfloat16) holds exactly stored in that type behind a Cast, as the input stored it:
    the same function, bit for bit. Returns the model (`model` itself where nothing
    changed) and how many of `names` stay float32 (values a repair or fine-tune moved off
    their low type)."""
    inputs = {v.name for v in model.graph.input}    # (an old IR lists weights as inputs)
    weights = {t.name: t for t in model.graph.initializer
               if t.name in names and t.name not in inputs
               and t.data_type == onnx.TensorProto.FLOAT}
    exact = {}
    for name, t in weights.items():
        low = _exactly(numpy_helper.to_array(t), names[name])
        if low is not None:
            exact[name] = low
    if not exact:
        return model, len(weights)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    taken = {t.name for t in out.graph.initializer} | {o for n in out.graph.node
                                                       for o in n.output}
    casts, kept = [], []
    for t in out.graph.initializer:
        if t.name not in exact:
            kept.append(t)
            continue
        stored = f"{t.name}.{LOW[names[t.name]]}"
        while stored in taken:
            stored += "_"
        taken.add(stored)
        exact[t.name].name = stored
        kept.append(exact[t.name])
        casts.append(helper.make_node("Cast", [stored], [t.name], name=stored + ".cast",
                                      to=onnx.TensorProto.FLOAT))
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    nodes = casts + list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out, len(weights) - len(exact)


def _exactly(array: np.ndarray, low: int) -> onnx.TensorProto | None:
    """`array` (float32) as a tensor of type `low` where that type holds every value
    exactly, else None. bfloat16 is the upper half of a float32's bits (no numpy type)."""
    if low == onnx.TensorProto.FLOAT16:
        half = array.astype(np.float16)
        return numpy_helper.from_array(half) if np.array_equal(half, array) else None
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    if (bits & 0xFFFF).any():
        return None
    return helper.make_tensor("", low, array.shape, (bits >> 16).astype("<u2").tobytes(),
                              raw=True)


def weights_back(original: onnx.ModelProto, view, result: onnx.ModelProto
                 ) -> tuple[onnx.ModelProto, str | None]:
    """`result` with the weights `original` stored in float16/bfloat16 behind Casts stored
    so again where their values are still such ones (``store_half``: the same function,
    checked on the check inputs of `view`), and a warning for those a repair or training
    moved off float16 (None where `original` has no such weights). Normalising had folded
    the Casts into float32."""
    names = half_weights(original)
    if not names:
        return result, None
    stored, widened = store_half(result, names)
    low = "/".join(sorted({LOW[t] for t in names.values()}))
    if stored is not result:
        feeds = view.check_feeds(0)
        verify.check_equivalent(verify.run(stored, feeds, f"model with {low} weights"),
                                verify.run(result, feeds), f"model with {low} weights",
                                "the verified model")
    warning = (f"{widened} of the weights the input stores in {low} (behind Cast nodes) "
               "are written in float32: the repair or training moved their values off "
               f"{low}" if widened else "")
    return stored, warning
