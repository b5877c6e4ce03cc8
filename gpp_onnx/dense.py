"""A dense layer written as MatMul + Add of a constant becomes one Gemm.

Paddle and tf2onnx (Keras) export a fully connected layer as ``MatMul(x, W)`` followed by
``Add(., b)``; torch writes ``Gemm(x, W, b, transB=1)``. Both compute ``x W + b``. As a
Gemm the layer gets what every Gemm gets: the mean repair folds removed inputs into its
bias, and the least-squares repair refits its weight and bias (a MatMul has no bias to
fold into, so a Paddle or Keras classifier head was left as the cut made it).

Rewritten only where the result is the same function: ``x`` of rank 2 (Gemm's A), ``W`` a
2-D float32 initializer, the MatMul's output read by that Add alone (and not a graph
output), ``b`` a float32 initializer of shape (M,) or (1, M), which Gemm's C broadcasts
as Add does. The Gemm takes the Add's output name, so nothing downstream changes.
"""
from __future__ import annotations

import logging

import onnx
from onnx import helper

from .edit import Editor

logger = logging.getLogger(__name__)

FLOAT = onnx.TensorProto.FLOAT
REPLACED = "MatMul + Add as one Gemm; the MatMul's output was "


def aliases(model: onnx.ModelProto) -> dict[str, str]:
    """The MatMul outputs the rewrite replaced -> the Gemm outputs that stand for them, so
    a name read off the user's file (``--ignore``, ``--group-ratio``, ``--feature-tensor``)
    still finds its layer; the two differ by the constant bias only."""
    return {n.doc_string[len(REPLACED):]: n.output[0] for n in model.graph.node
            if n.op_type == "Gemm" and n.doc_string.startswith(REPLACED)}


def dense_to_gemm(model: onnx.ModelProto) -> int:
    """Rewrite `model` in place (see the module docstring); returns the number of layers."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    if not any(n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits
               for n in graph.node):
        return 0
    ranks = _ranks(model)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in set(node.input):
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    editor, done = Editor(model), 0
    for mm in list(graph.node):
        pair = _dense_pair(mm, inits, ranks, readers, outputs)
        if pair is None:
            continue
        add, bias = pair
        gemm = helper.make_node("Gemm", [mm.input[0], mm.input[1], bias], [add.output[0]],
                                name=mm.name or add.name or "dense",
                                doc_string=f"{REPLACED}{mm.output[0]}")
        editor.replace([mm, add], [gemm])
        done += 1
    if done:
        logger.info("%d dense layer(s) written as MatMul + Add became Gemm", done)
    return done


def _dense_pair(mm, inits, ranks, readers, outputs):
    """(the Add, its bias input) where `mm` and its Add are one dense layer, else None."""
    if mm.op_type != "MatMul" or mm.domain not in ("", "ai.onnx") or len(mm.input) != 2:
        return None
    w = inits.get(mm.input[1])
    if w is None or w.data_type != FLOAT or len(w.dims) != 2 or ranks.get(mm.input[0]) != 2:
        return None
    out = mm.output[0]
    users = readers.get(out, [])
    if out in outputs or len(users) != 1 or users[0].op_type != "Add":
        return None
    add = users[0]
    if list(add.input).count(out) != 1:
        return None
    bias = add.input[1] if add.input[0] == out else add.input[0]
    b = inits.get(bias)
    if b is None or b.data_type != FLOAT or list(b.dims) not in ([w.dims[1]], [1, w.dims[1]]):
        return None
    return add, bias


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Rank of each value onnx's shape inference finds (run on the model's skeleton). A
    Reshape to a computed shape (tf2onnx's flatten: the batch read by Shape, Concat, Cast)
    has no inferred shape, yet its rank is the shape tensor's length: it is declared and
    inference runs again, so the layers after it get ranks too."""
    from .skeleton import strip

    skel, _ = strip(model)
    ranks = _inferred_ranks(skel)
    lengths = _inferred_lengths(skel)
    unknown = {n.output[0]: lengths[n.input[1]] for n in skel.graph.node
               if n.op_type == "Reshape" and n.output[0] not in ranks and n.input[1] in lengths}
    if unknown:
        skel.graph.value_info.extend(
            helper.make_tensor_value_info(name, 0, [None] * rank)
            for name, rank in unknown.items())
        ranks = _inferred_ranks(skel)
    return ranks


def _inferred(model: onnx.ModelProto) -> list:
    try:
        g = onnx.shape_inference.infer_shapes(model).graph
    except Exception as err:  # no ranks: nothing is rewritten
        logger.debug("shape inference failed: %s", err)
        return []
    return [v for v in [*g.input, *g.value_info, *g.output]
            if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")]


def _inferred_ranks(model: onnx.ModelProto) -> dict[str, int]:
    return {v.name: len(v.type.tensor_type.shape.dim) for v in _inferred(model)}


def _inferred_lengths(model: onnx.ModelProto) -> dict[str, int]:
    """Name -> length of each 1-D value of a known length."""
    out = {}
    for v in _inferred(model):
        dims = v.type.tensor_type.shape.dim
        if len(dims) == 1 and dims[0].HasField("dim_value"):
            out[v.name] = dims[0].dim_value
    for t in model.graph.initializer:
        if len(t.dims) == 1:
            out[t.name] = t.dims[0]
    return out
