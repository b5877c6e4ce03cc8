"""Models whose input fixes the batch size.

An exporter that traces one example (``torch.onnx.export`` without dynamic axes or
shapes) writes the example's batch, usually 1, into the input's shape, and the dynamo
exporter also into Reshape targets (``[1, 576]`` for a flatten). onnxruntime runs such a
model on batches of exactly that size only, so scoring and training would step on one
image at a time: slow, and without batch statistics.

``free`` makes the batch symbolic where that changes nothing: the inputs' and outputs'
dim 0 become the symbol ``batch``, and every constant Reshape target of a value computed
from the inputs whose first entry is the fixed size b gets -1 there (inferred from the
other entries), or 0 (copy the input's dim 0) where another entry is -1. ``normalize``
(``model.py``) keeps the freed model only when it computes, on a batch of 2b random
inputs, what the original computes on each half (``same_function``); otherwise the model
keeps its fixed batch and is run in batches of that size. ``declare`` gives a written
model the input's declared sizes back, so the result is a drop-in replacement (its
Reshape targets read the batch from the input, which is b there too).
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper

logger = logging.getLogger(__name__)

SYMBOL = "batch"
SAME = 1e-4   # relative error between the batched and the per-chunk outputs (float noise)


def within(model: onnx.ModelProto, size: int, per_image: int, budget: int) -> int:
    """Images per pass: `size`, or fewer where `per_image` bytes each would pass `budget`
    (large maps); a batch the model's input fixes stays as it is."""
    if fixed(model) is not None:
        return size
    return max(1, min(size, budget // max(per_image, 1)))


def fixed(model: onnx.ModelProto) -> int | None:
    """The batch size b every input of `model` fixes (dim 0 of each non-initializer input,
    all equal), or None where one leaves it free or they differ."""
    inits = {t.name for t in model.graph.initializer}
    sizes = set()
    for value in model.graph.input:
        if value.name in inits:
            continue
        dims = value.type.tensor_type.shape.dim
        if not dims or not dims[0].HasField("dim_value") or dims[0].dim_value < 1:
            return None
        sizes.add(dims[0].dim_value)
    return sizes.pop() if len(sizes) == 1 else None


def free(model: onnx.ModelProto, b: int) -> onnx.ModelProto:
    """A copy of `model` with dim 0 of its inputs and outputs symbolic where it is b, no
    stale value_info, and constant Reshape targets [b, ...] of values computed from the
    inputs written [-1, ...] or [0, ...] (unchecked: see ``same_function``)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    for value in [*graph.input, *graph.output]:
        if value.name in inits:
            continue
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == b:
            dims[0].dim_param = SYMBOL
    del graph.value_info[:]
    constants = {n.output[0]: n for n in graph.node
                 if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and n.output}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    batched = _from_inputs(graph, inits)
    for node in graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or (
                node.input[0] not in batched):  # a weight's reshape has no batch
            continue
        tensor = _shape_tensor(node.input[1], inits, constants)
        if tensor is None:
            continue
        target = numpy_helper.to_array(tensor)
        if target.ndim != 1 or len(target) < 1 or target[0] != b:
            continue
        target = _batch_free(target, node)
        if target is None:
            continue
        name = node.input[1]
        if users.get(name, 0) > 1 or name in {o.name for o in graph.output}:
            name = _fresh(name + ".batch", graph)
            node.input[1] = name
            graph.initializer.append(numpy_helper.from_array(target, name))
            inits[name] = graph.initializer[-1]
        else:
            tensor.CopyFrom(numpy_helper.from_array(target, tensor.name))
    return out


def _batch_free(target: np.ndarray, node) -> np.ndarray | None:
    """The Reshape target [b, ...] with its first entry inferred: -1 where no other entry
    is, else 0 (copy the input's dim 0) where the node reads 0 that way (``allowzero``
    0, or no other 0 to read otherwise: then set to 0); None where neither holds."""
    target = target.copy()
    if not np.any(target[1:] == -1):
        target[0] = -1
        return target
    allowzero = next((a for a in node.attribute if a.name == "allowzero"), None)
    if allowzero is not None and allowzero.i:
        if np.any(target[1:] == 0):
            return None
        allowzero.i = 0
    target[0] = 0
    return target


def _from_inputs(graph, inits: dict) -> set[str]:
    """The values computed from a graph input (nodes in topological order)."""
    reached = {v.name for v in graph.input if v.name not in inits}
    for node in graph.node:
        if any(name in reached for name in node.input):
            reached.update(node.output)
    return reached


def _shape_tensor(name: str, inits: dict, constants: dict) -> onnx.TensorProto | None:
    if name in inits:
        return inits[name] if inits[name].data_type == onnx.TensorProto.INT64 else None
    node = constants.get(name)
    if node is None or len(node.attribute) != 1 or node.attribute[0].name != "value":
        return None
    tensor = node.attribute[0].t
    return tensor if tensor.data_type == onnx.TensorProto.INT64 else None


def _fresh(base: str, graph) -> str:
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    name = base
    while name in taken:
        name += "_"
    return name


def same_function(original: onnx.ModelProto, freed: onnx.ModelProto, b: int) -> bool:
    """True when `freed` computes, on 2b random inputs in one batch, what `original` (whose
    inputs fix the batch at b) computes on each half: same shapes, relative error below
    ``SAME`` for every output. Says why where it is not (an original that does not run at
    all is left to the checks that follow to report)."""
    from .graph import GraphView, random_feeds
    from .verify import make_session, outputs, relative_error, run

    try:
        specs = GraphView(original).inputs
        halves = [random_feeds(specs, seed=seed) for seed in (0, 1)]
        reference = [run(original, feeds, "input model") for feeds in halves]
    except Exception as err:  # noqa: BLE001 - reported where the model is probed
        logger.debug("the batch stays fixed at %d: %s", b, err)
        return False
    try:
        joined = {name: np.concatenate([h[name] for h in halves]) for name in halves[0]}
        where = "model with a free batch"
        got = outputs(make_session(freed, where, optimize=False, quiet=True), joined, where)
        err = relative_error(got, [np.concatenate(parts) for parts in zip(*reference)])
    except Exception as failure:  # noqa: BLE001 - any failure keeps the input's batch
        err, why = float("inf"), f"a batch of {2 * b} fails to run ({failure})"
    else:
        why = (f"a batch of {2 * b} gives outputs of other shapes" if err == float("inf") else
               f"a batch of {2 * b} differs from its halves (relative error {err:.1e})")
    if not err < SAME:
        logger.info("the input fixes the batch at %d and the graph depends on it (%s): it "
                    "is run in batches of %d", b, why[:200], b)
        return False
    return True


def declare(original: onnx.ModelProto, model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with dim 0 of each input and output sized as `original` declares it, where
    `original` fixes it and `model` has it symbolic - for a model whose batch normalising
    freed (an input's dim 0); `model` itself otherwise. A model kept at its fixed batch
    keeps the output shapes inference gives it: an output's declared dim 0 need not be
    the batch (a time-major (T, 1, K) output declared (1, T)). The inputs `original`
    declares with a default value are declared again too (``_defaults_back``)."""
    sizes = {}
    for value in [*original.graph.input, *original.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            sizes[value.name] = dims[0].dim_value
    todo = [v for v in [*model.graph.input, *model.graph.output]
            if v.name in sizes and v.type.tensor_type.shape.dim
            and not v.type.tensor_type.shape.dim[0].HasField("dim_value")]
    inputs = {v.name for v in model.graph.input}
    if not any(v.name in inputs for v in todo):
        return _defaults_back(original, model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for value in [*out.graph.input, *out.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if value.name in sizes and dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = sizes[value.name]
    return _defaults_back(original, out)


def _defaults_back(original: onnx.ModelProto, model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with the inputs `original` declares with a default value (an input that is
    also an initializer, which a caller may feed instead: a temperature, say) declared
    again where `model` holds that initializer unchanged; normalising made them
    constants, and a caller feeding one got 'invalid input name'. Weights (what a layer
    reads after its input) are not: old exporters listed every weight as an input, which
    keeps onnxruntime from folding them, and a cut one is no longer what it was."""
    inits = {t.name: t for t in original.graph.initializer}
    weights = {name for node in original.graph.node if node.op_type in _WEIGHTED
               for name in node.input[1:]}
    held = {t.name: t for t in model.graph.initializer}
    have = {v.name for v in model.graph.input}
    todo = [v.name for v in original.graph.input
            if v.name in inits and v.name in held and v.name not in have | weights
            and _same_tensor(inits[v.name], held[v.name])]
    if not todo:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for name in todo:
        t = held[name]
        out.graph.input.append(onnx.helper.make_tensor_value_info(name, t.data_type, t.dims))
    return out


_WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "PRelu",
             "InstanceNormalization", "LayerNormalization", "GroupNormalization", "LSTM",
             "GRU", "RNN"}


def _same_tensor(a: onnx.TensorProto, b: onnx.TensorProto) -> bool:
    return (a.data_type == b.data_type and list(a.dims) == list(b.dims)
            and np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b)))


def run_in_chunks(run, feeds: dict, b: int | None) -> list[np.ndarray]:
    """`run(feeds)` for a model whose inputs fix the batch at `b`, on chunks of b rows,
    outputs joined along dim 0 (for the file a freed model came from: its outputs have a
    row per input row). A last chunk short of b rows is filled with copies of its first
    row, whose outputs are dropped."""
    rows = {len(v) for v in feeds.values() if np.ndim(v) > 0}
    if b is None or len(rows) != 1 or (n := rows.pop()) == b:
        return run(feeds)
    parts = []
    for i in range(0, n, b):
        chunk = {k: v[i:i + b] for k, v in feeds.items()}
        short = b - len(next(iter(chunk.values())))
        if short:
            chunk = {k: np.concatenate([v, np.repeat(v[:1], short, axis=0)])
                     for k, v in chunk.items()}
        parts.append([o[:b - short] for o in run(chunk)])
    return [np.concatenate(p) for p in zip(*parts)]
