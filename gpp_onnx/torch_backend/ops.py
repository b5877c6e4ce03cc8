"""Op registry of the torch backend: one small function per ONNX ``op_type``.

An op function is called as ``fn(node, *inputs)``: ``node`` is the :class:`Node` (parsed
attributes, opset, training flag) and ``inputs`` are the node's input tensors in ONNX
order, ``None`` for an omitted optional input (trailing omitted inputs are simply not
passed, so give them defaults). It returns one tensor or a tuple with one tensor per
node output. Implementations live in ``ops_nn`` (conv, norm, gemm, pooling),
``ops_norm`` (group, Lp and mean-variance normalization), ``ops_rnn`` (LSTM, GRU, RNN), ``ops_math`` (element-wise, activations, reductions) and
``ops_tensor`` (layout, shape, indexing, resize); they register themselves with
:func:`register`.

An op may also register a ``check(node)`` that raises :class:`UnsupportedModelError`
(via :meth:`Node.fail`) at construction time for attribute values it does not handle.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import onnx
import torch
from onnx import helper, numpy_helper

from gpp_onnx.errors import UnsupportedModelError

OpFn = Callable[..., Any]
CheckFn = Callable[["Node"], None]

_OPS: dict[str, OpFn] = {}
_CHECKS: dict[str, CheckFn] = {}

ONNX_TO_TORCH_DTYPE = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.BOOL: torch.bool,
}


def register(*op_types: str, check: CheckFn | None = None) -> Callable[[OpFn], OpFn]:
    """Decorator: make ``fn`` the implementation of each of ``op_types``."""

    def decorate(fn: OpFn) -> OpFn:
        for op_type in op_types:
            if op_type in _OPS:
                raise ValueError(f"op {op_type} registered twice")
            _OPS[op_type] = fn
            if check is not None:
                _CHECKS[op_type] = check
        return fn

    return decorate


def registry() -> dict[str, OpFn]:
    """All registered ops by op_type (imports the op modules on first use)."""
    from . import (ops_math, ops_nn, ops_norm, ops_resize, ops_rnn,  # noqa: F401
                   ops_tensor)  # (registration)

    return _OPS


def check_for(op_type: str) -> CheckFn | None:
    registry()
    return _CHECKS.get(op_type)


@dataclasses.dataclass(eq=False)
class Node:
    """One ONNX node prepared for execution; ``training`` follows the owning module."""

    name: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any]
    opset: int
    fn: OpFn | None = None
    training: bool = False

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def fail(self, what: str) -> UnsupportedModelError:
        """An UnsupportedModelError naming this node; ``what`` says what and what to do."""
        return UnsupportedModelError(f"node '{self.name}' ({self.op_type}): {what}")

    def wants_output(self, index: int) -> bool:
        return len(self.outputs) > index and bool(self.outputs[index])


def parse_attrs(node: onnx.NodeProto) -> dict[str, Any]:
    """Attributes as python values: str for strings, torch tensors for tensors."""
    attrs: dict[str, Any] = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        elif isinstance(value, onnx.TensorProto):
            value = tensor_from_proto(value)
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode("utf-8") for v in value]
        attrs[attr.name] = value
    return attrs


def tensor_from_proto(proto: onnx.TensorProto) -> torch.Tensor:
    """A TensorProto (data already loaded, external data included) as a torch tensor."""
    if proto.data_type not in ONNX_TO_TORCH_DTYPE:
        kind = onnx.TensorProto.DataType.Name(proto.data_type)
        raise UnsupportedModelError(f"tensor '{proto.name}' has element type {kind}; "
                                    "the torch backend handles float, int and bool tensors only")
    array = numpy_helper.to_array(proto)
    return torch.from_numpy(array.copy()).to(ONNX_TO_TORCH_DTYPE[proto.data_type])


def ints(t: torch.Tensor | None) -> list[int] | None:
    """A shape-like tensor input as a python int list (None stays None)."""
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]
