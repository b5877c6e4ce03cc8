"""Apply a PrunePlan to a normalised model.

``cut``: every ParamSlice whose value loses channels keeps ``W.take(positions, axis)``
(positions owned by the kept elements); then each node's rule rewrites its attributes
and shape constants (Conv ``group``, Reshape shape, Split sizes, Slice bounds, Gather
indices, Resize sizes). An initializer shared with another consumer is never shrunk in
place: the cutting node gets its own copy (identical copies are shared again at the end).

``mask``: the same architecture, with the removed channels' consumer weights (role
``in``) set to 0, and each node that reduces over a value's channels (a LayerNorm's
statistics) replaced by its rule's ``masked_nodes``: the same statistic over the kept
channels only. ``cut(model) == mask(model)`` numerically is the invariant verified
before anything is written.
"""
from __future__ import annotations

import logging
import sys
from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import skeleton, verify
from .errors import VerificationError
from .verify import without_initializers
from .edit import Editor, drop_dead_nodes, unique_name
from .model import dedupe_initializers
from .ops import ROLE_IN
from .ops.base import Reduced

logger = logging.getLogger(__name__)


class Edit:
    """What a rule's `rewrite` may read and change during surgery."""

    def __init__(self, analysis, model: onnx.ModelProto, kept: dict[str, np.ndarray]):
        self.view = analysis.view
        self.opset = analysis.opset
        self._axes = analysis.axes
        self._kept = kept
        self.model = model
        self.new_inits: dict[str, np.ndarray] = {}
        self._renamed: dict[str, str] = {}   # an input given its own copy -> the name it had
        self._taken = set(analysis.view.init_protos) | set(analysis.view.producer)

    def axis(self, value: str) -> int | None:
        return self._axes.get(value)

    def kept(self, value: str) -> np.ndarray | None:
        return self._kept.get(value)

    def kept_or_all(self, value: str) -> np.ndarray:
        kept = self._kept.get(value)
        return np.arange(self.view.shape(value)[self._axes[value]]) if kept is None else kept

    def const(self, name: str | None) -> np.ndarray | None:
        return None if name is None else self.view.const(name)

    def fresh_name(self, base: str) -> str:
        return unique_name(self._taken, base, "pruned")

    def set_input_const(self, node: onnx.NodeProto, index: int, array: np.ndarray) -> None:
        name = self.fresh_name(f"{node.name}.in{index}")
        self.new_inits[name] = np.asarray(array)
        while len(node.input) <= index:
            node.input.append("")
        if node.input[index]:
            self._renamed[name] = self._renamed.get(node.input[index], node.input[index])
        node.input[index] = name

    def original(self, name: str) -> str:
        """The input's name in the analysed model (an initializer shared with another node
        is given its own copy, under a new name, before the rules rewrite)."""
        return self._renamed.get(name, name)

    def set_attr(self, node: onnx.NodeProto, name: str, value) -> None:
        self.remove_attr(node, name)
        node.attribute.append(helper.make_attribute(name, value))

    def remove_attr(self, node: onnx.NodeProto, name: str) -> None:
        keep = [a for a in node.attribute if a.name != name]
        if len(keep) != len(node.attribute):
            del node.attribute[:]
            node.attribute.extend(keep)


def _cuts(analysis, kept) -> dict[tuple[str, int], dict[int, np.ndarray]]:
    """(node, input index) -> {axis: kept positions} for every weight that shrinks."""
    cuts: dict[tuple[str, int], dict[int, np.ndarray]] = defaultdict(dict)
    for p in analysis.params:
        if p.value not in kept:
            continue
        pos = p.positions(kept[p.value])
        slot = cuts[(p.node, p.input_index)]
        if p.axis in slot and not np.array_equal(slot[p.axis], pos):
            raise VerificationError(f"node {p.node}: conflicting cuts of {p.param} on axis "
                                    f"{p.axis}; nothing was written - please report this model")
        slot[p.axis] = pos
    return cuts


def _masks(analysis, kept) -> dict[tuple[str, int], dict[int, np.ndarray]]:
    """(node, input index) -> {axis: positions to zero} for removed channels' consumers."""
    masks: dict[tuple[str, int], dict[int, np.ndarray]] = defaultdict(dict)
    for p in analysis.params:
        if p.role != ROLE_IN or p.value not in kept:
            continue
        width = analysis.view.shape(p.value)[analysis.axes[p.value]]
        removed = np.setdiff1d(np.arange(width), kept[p.value])
        if len(removed):
            masks[(p.node, p.input_index)][p.axis] = p.positions(removed)
    return masks


def _bias_array(analysis, node, delta: np.ndarray, kept, cut: bool, edit) -> np.ndarray:
    """The consumer's bias plus `delta` (original output indexing), sliced when cutting.
    The bias is read under its analysed name (a shared one was given its own copy)."""
    index, scale = analysis.rules[node.name].output_bias(node)
    name = analysis.view.input(node, index)
    base = np.zeros_like(delta) if name is None else analysis.view.const(edit.original(name))
    bias = np.broadcast_to(base.reshape(-1) if base.size == delta.size else base,
                           delta.shape).astype(np.float32) + (delta / scale).astype(np.float32)
    out = node.output[0]
    if cut and out in kept:
        bias = bias[kept[out]]
    if base.ndim == 2:  # Gemm C of shape (1, N)
        bias = bias.reshape(1, -1)
    return np.ascontiguousarray(bias)


def _apply(analysis, kept, changes, transform, rewrite: bool,
           bias_deltas: dict[str, np.ndarray] | None = None,
           weights: dict[tuple[str, int], np.ndarray] | None = None,
           deferred: set[str] | None = None):
    """The edited model and ``values(name)``: the array each of its initializers was
    written from (None where not known), so sessions need not read the tensors back.
    With `deferred`, the new tensors that sessions take as arrays are left as headers
    (name, type, dims) and their names collected there (``Deferred``)."""
    model = without_initializers(analysis.view.model)  # _replace_initializers adds them
    edit = Edit(analysis, model, kept)
    uses = defaultdict(int)
    for node in model.graph.node:
        for name in node.input:
            uses[name] += 1
    nodes = {n.name: n for n in model.graph.node}
    weights = weights or {}
    for key in list(changes) + [k for k in weights if k not in changes]:
        node_name, index = key
        node = nodes[node_name]
        param = node.input[index]
        array = weights[key] if key in weights else analysis.view.const(param)
        array = transform(array, changes[key]) if key in changes else array
        if uses[param] > 1 or param in edit.new_inits:
            edit.set_input_const(node, index, array)
        else:
            edit.new_inits[param] = array
    for node_name, delta in (bias_deltas or {}).items():
        node = nodes[node_name]
        edit.set_input_const(node, analysis.rules[node.name].output_bias(node)[0],
                             _bias_array(analysis, node, delta, kept, cut=rewrite, edit=edit))
    if rewrite:
        for node in model.graph.node:
            analysis.rules[node.name].rewrite(node, edit)
    written = _replace_initializers(model, analysis.view.model, edit.new_inits, deferred)
    const = analysis.view.const
    copied = {t.name for t in model.graph.initializer} - set(written)

    def values(name: str) -> np.ndarray | None:
        return written[name] if name in written else const(name) if name in copied else None

    return model, values


def _take(array: np.ndarray, axes: dict[int, np.ndarray]) -> np.ndarray:
    # outer axes first: they copy the longest contiguous runs while the array is largest
    for axis, pos in sorted(axes.items(), key=lambda item: item[0]):
        array = np.take(array, pos, axis=axis)
    return np.ascontiguousarray(array)


def _zero(array: np.ndarray, axes: dict[int, np.ndarray]) -> np.ndarray:
    array = array.copy()
    for axis, pos in axes.items():
        index = [slice(None)] * array.ndim
        index[axis] = pos
        array[tuple(index)] = 0
    return array


def _replace_initializers(model: onnx.ModelProto, source: onnx.ModelProto,
                          arrays: dict[str, np.ndarray], deferred: set[str] | None = None
                          ) -> dict[str, np.ndarray]:
    """`model`'s initializers: those of `source` still used, each replaced by `arrays[name]`
    when given (in its old dtype), then the new ones of `arrays`. Each tensor is written
    once: copying all of `source`'s and then overwriting would copy the weights twice.
    Returns name -> the array each written tensor holds (plain dtypes)."""
    written: dict[str, np.ndarray] = {}
    used = {name for node in model.graph.node for name in node.input}
    used |= {o.name for o in model.graph.output}
    inits = model.graph.initializer
    old = {t.name for t in source.graph.initializer}
    for t in source.graph.initializer:
        if t.name not in used:
            continue
        if t.name in arrays:
            dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
            _fill(inits.add(), arrays[t.name].astype(dtype, copy=False), t.name, written,
                  deferred)
        else:
            inits.add().CopyFrom(t)
    for name, array in arrays.items():
        if name not in old and name in used:
            _fill(inits.add(), array, name, written, deferred)
    graph_inputs = [v for v in model.graph.input if v.name not in old or v.name in used]
    del model.graph.input[:]
    model.graph.input.extend(graph_inputs)
    del model.graph.value_info[:]
    return written


def _little_endian_bytes(array: np.ndarray) -> bytes:
    """``array``'s bytes in ONNX's little-endian order: what
    ``numpy_helper.tobytes_little_endian`` does, which came only with onnx 1.20."""
    if array.dtype.byteorder == ">" or (sys.byteorder == "big" and array.dtype.byteorder == "="):
        array = array.astype(array.dtype.newbyteorder("<"))
    return array.tobytes()


_PLAIN = {np.dtype(t) for t in (np.float32, np.float16, np.float64, np.int64, np.int32,
                                np.int16, np.int8, np.uint8, np.bool_)}


def _fill(tensor: onnx.TensorProto, array: np.ndarray, name: str, written: dict,
          deferred: set[str] | None = None) -> None:
    """``tensor := numpy_helper.from_array(array, name)``, built in place for the plain
    dtypes (the same fields, without copying the finished tensor once more); those are
    recorded in `written`. With `deferred`, a tensor sessions take as an array stays a
    header (no raw data) and its name goes there."""
    if array.dtype not in _PLAIN:
        tensor.CopyFrom(numpy_helper.from_array(array, name))
        return
    written[name] = np.ascontiguousarray(array)
    tensor.Clear()
    tensor.dims.extend(array.shape)
    tensor.name = name
    tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
    if deferred is not None and verify.detached_in_sessions(tensor):
        deferred.add(name)
        return
    tensor.raw_data = _little_endian_bytes(array)


def cut(analysis, kept: dict[str, np.ndarray],
        bias_deltas: dict[str, np.ndarray] | None = None,
        weights: dict[tuple[str, int], np.ndarray] | None = None) -> onnx.ModelProto:
    """The physically smaller model. ``bias_deltas`` (node -> change of its output bias)
    and ``weights`` ((node, input index) -> replacement, original shape) come from the
    repair; the replacements are cut like the weights they replace."""
    return cut_with_values(analysis, kept, bias_deltas, weights)[0]


def cut_with_values(analysis, kept, bias_deltas=None, weights=None):
    """``cut`` and ``values(name)``: the array each initializer of the result was written
    from (None where not known), for ``verify.detach`` without reading the tensors back."""
    model, values = _apply(analysis, kept, _cuts(analysis, kept), _take, True, bias_deltas,
                           weights)
    drop_dead_nodes(model)  # e.g. the shape arithmetic of a dropped zero initial state
    dedupe_initializers(model)
    try:
        _infer_shapes(model)
    except Exception as err:  # a model without inferable shapes is still a valid model
        logger.debug("shape inference after surgery failed: %s", err)
    return model, values


def _infer_shapes(model: onnx.ModelProto) -> None:
    """``onnx.shape_inference.infer_shapes(model)`` in place, run on the model's skeleton
    (``skeleton.strip``: inference reads values only of shape-like integer tensors), so
    the weights are neither serialised nor parsed; the inferred graph (nodes, inputs,
    outputs, value_info) replaces `model`'s."""
    inferred = onnx.shape_inference.infer_shapes(skeleton.strip(model)[0],
                                                 strict_mode=False).graph
    graph = model.graph
    for field in ("node", "input", "output", "value_info"):
        del getattr(graph, field)[:]
        getattr(graph, field).extend(getattr(inferred, field))


def mask(analysis, kept: dict[str, np.ndarray],
         bias_deltas: dict[str, np.ndarray] | None = None,
         weights: dict[tuple[str, int], np.ndarray] | None = None) -> onnx.ModelProto:
    """The original architecture with removed channels' consumer weights zeroed and
    reductions over channels restricted to the kept ones (after the repair's replacements
    and bias changes, as in ``cut``)."""
    return mask_with_values(analysis, kept, bias_deltas, weights)[0]


def mask_with_values(analysis, kept, bias_deltas=None, weights=None):
    """``mask`` and ``values(name)`` as in ``cut_with_values``."""
    model, values = _apply(analysis, kept, _masks(analysis, kept), _zero, False, bias_deltas,
                           weights)
    _mask_reductions(model, analysis, kept)
    return model, values


def mask_deferred(analysis, kept, bias_deltas=None, weights=None) -> "Deferred":
    """``mask``, with the zeroed weights kept as arrays until a ModelProto is asked for."""
    headers: set[str] = set()
    model, values = _apply(analysis, kept, _masks(analysis, kept), _zero, False, bias_deltas,
                           weights, headers)
    _mask_reductions(model, analysis, kept)
    return Deferred(model, values, frozenset(headers))


@dataclass(frozen=True, eq=False)
class Deferred:
    """A model whose large new tensors are headers and their values arrays (``values``):
    sessions run it detached (``session``), without the weights ever being serialised;
    ``model`` writes them into a ModelProto on first use (the same bytes ``mask`` gives)."""
    skeleton: onnx.ModelProto
    values: object
    headers: frozenset

    def session(self) -> verify.Detached:
        return verify.detach(self.skeleton, self.values)

    @cached_property
    def model(self) -> onnx.ModelProto:
        out = onnx.ModelProto()
        out.CopyFrom(self.skeleton)
        for t in out.graph.initializer:
            if t.name in self.headers:
                t.raw_data = _little_endian_bytes(self.values(t.name))
        return out


def _mask_reductions(model: onnx.ModelProto, analysis, kept) -> None:
    """Replace every node that reduces over channels some of which are removed by the
    nodes its rule gives for the masked model (the node keeps its place in the order)."""
    view = analysis.view
    todo = {}
    for name, values in analysis.reductions.items():
        reduced = []
        for value in values:
            axis, shape = analysis.axes[value], view.shape(value)
            if value not in kept or len(kept[value]) == shape[axis]:
                continue
            keep = np.zeros(shape[axis], dtype=view.dtype(value) or np.float32)
            keep[kept[value]] = 1
            reduced.append(Reduced(value, keep.reshape((-1,) + (1,) * (len(shape) - axis - 1)),
                                   tuple(shape), axis))
        if reduced:
            todo[name] = reduced
    if not todo:
        return
    editor = Editor(model)
    for node in [n for n in model.graph.node if n.name in todo]:
        editor.replace([node], analysis.rules[node.name].masked_nodes(node, todo[node.name],
                                                                      editor))
