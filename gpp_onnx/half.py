"""Weights a model stores in float16 behind Cast nodes (a float16 initializer cast to
float32 before its use). Normalising folds each such Cast into a float32 weight; a
written model gets them back where the values are still float16 values, so its file
keeps the input's precision and the function stays the same bit for bit."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import verify


def half_weights(original: onnx.ModelProto) -> set[str]:
    """The values of `original` that are a float16 initializer cast to float32: normalising
    folds each such Cast into a float32 weight of that name."""
    inits = {t.name: t.data_type for t in original.graph.initializer}
    low, wide = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    return {n.output[0] for n in original.graph.node
            if n.op_type == "Cast" and n.input and inits.get(n.input[0]) == low
            and any(a.name == "to" and a.i == wide for a in n.attribute)}


def store_half(model: onnx.ModelProto, names: set[str]) -> tuple[onnx.ModelProto, int]:
    """`model` with each float32 weight in `names` whose every value float16 holds exactly
    stored in float16 behind a Cast, as the input stored it: the same function, bit for
    bit. Returns the model (`model` itself where nothing changed) and how many of `names`
    stay float32 (values a repair or fine-tune moved off float16)."""
    inputs = {v.name for v in model.graph.input}    # (an old IR lists weights as inputs)
    weights = {t.name: t for t in model.graph.initializer
               if t.name in names and t.name not in inputs
               and t.data_type == onnx.TensorProto.FLOAT}
    exact = {}
    for name, t in weights.items():
        array = numpy_helper.to_array(t)
        low = array.astype(np.float16)
        if np.array_equal(low.astype(np.float32), array):
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
        stored = t.name + ".float16"
        while stored in taken:
            stored += "_"
        taken.add(stored)
        kept.append(numpy_helper.from_array(exact[t.name], stored))
        casts.append(helper.make_node("Cast", [stored], [t.name], name=stored + ".cast",
                                      to=onnx.TensorProto.FLOAT))
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    nodes = casts + list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out, len(weights) - len(exact)


def weights_back(original: onnx.ModelProto, view, result: onnx.ModelProto
                 ) -> tuple[onnx.ModelProto, str | None]:
    """`result` with the weights `original` stored in float16 behind Casts stored so again
    where their values are still float16 ones (``store_half``: the same function,
    checked on the check inputs of `view`), and a warning for those a repair or training
    moved off float16 (None where `original` has no such weights). Normalising had folded
    the Casts into float32."""
    names = half_weights(original)
    if not names:
        return result, None
    stored, widened = store_half(result, names)
    if stored is not result:
        feeds = view.check_feeds(0)
        verify.check_equivalent(verify.run(stored, feeds, "model with float16 weights"),
                                verify.run(result, feeds), "model with float16 weights",
                                "the verified model")
    warning = (f"{widened} of the weights the input stores in float16 (behind Cast nodes) "
               "are written in float32: the repair or training moved their values off "
               "float16" if widened else "")
    return stored, warning
