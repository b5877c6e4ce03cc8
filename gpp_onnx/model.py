"""Load, validate and normalise ONNX models.

Loading accepts what onnxruntime runs: external data beside the file, weights held in
Constant nodes, initializers shared between nodes (directly or behind Identity), nodes
out of topological order (sorted), opsets below 11 (upgraded, see ``compat``), float16
and mixed float16/float32 weights, symbolic batch/spatial dims and models without shape
information. ``read`` says what it changed (``Loaded``).

`normalize` rewrites the graph once, without changing what it computes:

* local functions are inlined (one holding control flow stays whole) and sparse
  initializers become the dense weights they stand for;
* Constant nodes holding tensors become initializers;
* constant sub-graphs are folded (onnx-graphsurgeon, evaluated by onnxruntime), which
  also removes Identity nodes in front of initializers and folds shape arithmetic on
  static dims (symbolic shape inference first, so only the batch size stays dynamic);
* channel shuffles ``Reshape(N,g,C/g,H,W) -> Transpose(0,2,1,3,4) -> Reshape(N,C,H,W)``
  become one ``Gather(axis=1)`` (``shuffle``: the same permutation as one op whose
  channels can be followed one by one);
* a dense layer written as ``MatMul(x, W) -> Add(b)`` (Paddle, tf2onnx) becomes
  ``Gemm(x, W, b)``, which the repairs refit (``dense``);
* nodes are sorted topologically.

Writing (atomic, all outputs or none) is ``files.py``'s.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from . import batch, refused, skeleton
from .files import serialize
from .edit import name_nodes
from .dense import dense_to_gemm
from .shuffle import shuffles_to_gather
from .compat import (MIN_OPSET, Loaded, explicit_default_axes, free_negative_dims,
                     opset_version, sort_nodes, upgrade_opset)
from .errors import InputError, UnsupportedModelError

logger = logging.getLogger(__name__)

def load(path: str | os.PathLike) -> onnx.ModelProto:
    """Read and validate an ONNX file (external data included); raise InputError on bad input."""
    return read(path).model


def read(path: str | os.PathLike) -> Loaded:
    """`load`, saying what it changed: nodes sorted, opset upgraded."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"model file not found: {p} - pass the path of an existing .onnx file")
    if not p.is_file():
        raise InputError(f"{p} is not a file - pass the path of an .onnx model file")
    try:
        # the bytes are read once: the parser and (protobuf files) the checker take them
        fmt = onnx.serialization.registry.get_format_from_file_extension(p.suffix)
        data = p.read_bytes()
        model = onnx.load_model_from_string(data, format=fmt)
        data = data if fmt in (None, "protobuf") else None
    except (DecodeError, ValueError, RuntimeError) as err:
        raise InputError(f"{p} is not a readable ONNX model ({_short(err)}) - "
                         "check the file is complete or export it again") from None
    if model.ir_version == 0 or not model.graph.node:
        raise InputError(f"{p} is not an ONNX model (no graph found) - "
                         "pass a model exported to .onnx")
    # the checker takes a self-contained file's bytes as read (no serialising); one with
    # external data is checked as loaded
    external = any(onnx.external_data_helper.uses_external_data(t)
                   for t in model.graph.initializer)
    if external:
        data = None
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(p.parent))
    except (OSError, ValueError) as err:
        raise InputError(f"{p}: external data could not be read ({_short(err)}) - "
                         "keep the model's data files beside it") from None
    return _prepare(model, str(p), data)


def accept(model: onnx.ModelProto, where: str = "model") -> Loaded:
    """`read` for a model handed over in memory; `model` itself is never modified."""
    if not isinstance(model, onnx.ModelProto):
        raise InputError(f"{where}: expected an onnx.ModelProto or a path, got "
                         f"{type(model).__name__}")
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise InputError(f"{where}: its weights are in an external data file that was not "
                         "loaded - pass the model's path, or onnx.load it with its data")
    return _prepare(_copy(model), where)


def open_model(model, where: str = "model") -> Loaded:
    """`read` for a path, `accept` for an onnx.ModelProto; InputError for anything else."""
    if isinstance(model, onnx.ModelProto):
        return accept(model, where)
    return read(model_path(model, where))


def model_path(model, where: str = "model") -> Path:
    """`model` as a Path (a str or os.PathLike), InputError for anything else."""
    if isinstance(model, (str, os.PathLike)):
        return Path(model)
    raise InputError(f"{where}: expected a path or an onnx.ModelProto, got "
                     f"{type(model).__name__} - e.g. 'model.onnx' or onnx.load('model.onnx')")


def _prepare(model: onnx.ModelProto, where: str, data: bytes | None = None) -> Loaded:
    """Nodes sorted, validated, old opsets upgraded. `data`: the bytes `model` was parsed
    from, which the checker reads while they hold the model as is (nodes not sorted)."""
    resorted = sort_nodes(model.graph)
    if resorted:
        logger.info("%s: nodes were not in topological order; sorted them", where)
        data = None
    validate(model, where, data)
    explicit_default_axes(model)
    freed = free_negative_dims(model)
    if freed:
        logger.info("%s: sizes declared as -1 (%s) are free sizes for this run and in the "
                    "written model", where, ", ".join(freed[:4]))
    opset = opset_version(model)
    upgraded = upgrade_opset(model, where) if opset < MIN_OPSET else model
    return Loaded(upgraded, model, opset, resorted)


def validate(model: onnx.ModelProto, where: str = "model", data: bytes | None = None) -> None:
    """Checker, a default-domain opset, and what gpp-onnx refuses (``refused``: quantized,
    control flow).
    `data`: `model` serialised, when the caller holds those bytes (else it is serialised
    here)."""
    try:
        data = serialize(model) if data is None else data
        if data is not None:
            onnx.checker.check_model(data)
    except (onnx.checker.ValidationError, ValueError) as err:
        raise InputError(f"{where} fails the ONNX checker ({_short(err)}) - "
                         "fix or re-export the model") from None
    if opset_version(model) == 0:
        raise UnsupportedModelError(f"{where} imports no standard ONNX opset - export it "
                                    "with the standard ONNX operators")
    refused.check(model, where)


def normalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return an equivalent model with constants as initializers, folded, sorted, and a
    batch the input fixed made symbolic where that changes nothing (``batch``). Where
    folding reads no large weight, the passes run on the model's skeleton (``skeleton``)
    and the weights are copied in once at the end: the same model, byte for byte."""
    b = batch.fixed(model)
    if b is not None:
        freed = _normalize_any(batch.free(model, b))
        if batch.same_function(model, freed, b):
            logger.info("the input fixes the batch at %d: it is made free for this run "
                        "(checked: a batch of %d computes what its halves do)", b, 2 * b)
            return freed
    return _normalize_any(model)


def _normalize_any(model: onnx.ModelProto) -> onnx.ModelProto:
    quick = skeleton.normalized(model, _normalize)
    return quick if quick is not None else _normalize(model)


def _normalize(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnx_graphsurgeon as gs

    model = _constants_to_initializers(_inline_functions(_dense_initializers(model)))
    sort_nodes(model.graph)
    name_nodes(model)  # onnx-graphsurgeon prints every node of a name it sees twice
    declared = {o.name: o.type for o in model.graph.output}
    model = _infer_shapes(model)
    graph = gs.import_onnx(model)
    graph.fold_constants(error_ok=True).cleanup(remove_unused_graph_inputs=False)
    folded = gs.export_onnx(graph, do_type_check=False)
    _copy_model_fields(model, folded)
    del folded.graph.value_info[:]
    for out in folded.graph.output:   # symbolic inference renames free dims ('T' became
        kept = declared.get(out.name)  # 'floor(W/2 - 1/2) + 1'): the file's names stay
        if kept is not None and kept.tensor_type.HasField("shape"):
            out.type.CopyFrom(kept)
    shuffles_to_gather(folded)
    dense_to_gemm(folded)
    sort_nodes(folded.graph)
    name_nodes(folded)
    return folded


def _dense_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with each sparse initializer (values at linear or coordinate indices) as the
    dense initializer it stands for: a weight stored so read as computed (not counted,
    its layer not pruned). The written model stores it dense."""
    if not model.graph.sparse_initializer:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for sparse in out.graph.sparse_initializer:
        values = numpy_helper.to_array(sparse.values)
        index = numpy_helper.to_array(sparse.indices).astype(np.int64)
        dims = tuple(sparse.dims)
        dense = np.zeros(int(np.prod(dims)), values.dtype)
        dense[index if index.ndim == 1 else np.ravel_multi_index(index.T, dims)] = values
        out.graph.initializer.append(numpy_helper.from_array(dense.reshape(dims),
                                                             sparse.values.name))
    del out.graph.sparse_initializer[:]
    return out


def _inline_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with its local functions inlined (the same computation), so the layers in
    them are counted, pruned and trained like any other: a function node was opaque (its
    MACs and params went uncounted, its channels kept, and the torch backend refused it).
    A function holding control flow stays a function: the If/Loop/Scan inside would be
    refused at the top level, and as an opaque node it only keeps its channels."""
    if not model.functions or any(n.op_type in refused.CONTROL_FLOW
                                  for f in model.functions for n in f.node):
        return model
    try:
        from onnx.inliner import inline_local_functions
    except ImportError:   # onnx before 1.16: the functions stay opaque
        return model
    return inline_local_functions(model)


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Symbolic shape inference (onnxruntime's: it follows Shape arithmetic, so the shape
    computations of dynamic-batch exports fold to constants except the batch size);
    onnx's own inference where that fails. Only a help for folding, never required: a graph
    without Shape ops has no shape arithmetic to fold and skips it."""
    if not any(n.op_type == "Shape" for n in model.graph.node):
        return model
    try:
        return _symbolic_shapes(model)
    except Exception as err:
        logger.debug("symbolic shape inference failed: %s", err)
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as err:
        logger.debug("shape inference failed before folding: %s", err)
        return model


def _symbolic_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's ``SymbolicShapeInference.infer_shapes(model, auto_merge=True)``
    without its last step, which saves an incomplete result as sym_shape_infer_temp.onnx
    into the current folder (the user's) before it raises."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    infer = SymbolicShapeInference(2**31 - 1, True, False, 0)
    infer._preprocess(model)
    done = False
    while infer.run_:
        done = infer._infer_impl()
    infer._update_output_from_vi()
    if not done:
        raise ValueError("incomplete symbolic shape inference")
    return infer.out_mp_


def _constants_to_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    model = _copy(model)
    keep = []
    for node in model.graph.node:
        tensor = _constant_value(node)
        if tensor is None:
            keep.append(node)
            continue
        tensor.name = node.output[0]
        model.graph.initializer.append(tensor)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    attr = node.attribute[0] if len(node.attribute) == 1 else None
    if attr is None:
        return None
    if attr.name == "value":
        tensor = onnx.TensorProto()
        tensor.CopyFrom(attr.t)
        return tensor
    scalars = {"value_float": (np.float32, attr.f), "value_int": (np.int64, attr.i),
               "value_floats": (np.float32, list(attr.floats)),
               "value_ints": (np.int64, list(attr.ints))}
    if attr.name in scalars:
        dtype, value = scalars[attr.name]
        return numpy_helper.from_array(np.array(value, dtype=dtype))
    return None


def _copy_model_fields(src: onnx.ModelProto, dst: onnx.ModelProto) -> None:
    """Keep the input model's identity (producer, metadata, opsets, docs) on a rebuilt one."""
    dst.ir_version = src.ir_version
    dst.producer_name, dst.producer_version = src.producer_name, src.producer_version
    dst.domain, dst.model_version, dst.doc_string = src.domain, src.model_version, src.doc_string
    del dst.metadata_props[:]
    dst.metadata_props.extend(src.metadata_props)
    del dst.opset_import[:]
    dst.opset_import.extend(src.opset_import)
    dst.graph.name = src.graph.name


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def dedupe_initializers(model: onnx.ModelProto) -> int:
    """Share byte-identical initializers again (slicing may have split shared ones)."""
    seen: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    graph_io = {v.name for v in model.graph.input} | {v.name for v in model.graph.output}
    # only tensors of one type and shape can be identical: read bytes for those alone
    kinds: dict[tuple, int] = {}
    for init in model.graph.initializer:
        kind = (init.data_type, tuple(init.dims))
        kinds[kind] = kinds.get(kind, 0) + 1
    drop = []
    for i, init in enumerate(model.graph.initializer):
        kind = (init.data_type, tuple(init.dims))
        key = kind + ((numpy_helper.to_array(init).tobytes(),) if kinds[kind] > 1 else ())
        if key in seen and init.name not in graph_io:
            rename[init.name] = seen[key]
            drop.append(i)
        else:
            seen.setdefault(key, init.name)
    if not rename:
        return 0
    for i in reversed(drop):  # in place: re-adding the kept ones would copy every weight
        del model.graph.initializer[i]
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    return len(rename)


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:200] + ("..." if len(text) > 200 else "") if text else type(err).__name__

