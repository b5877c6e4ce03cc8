"""Writing a trained OnnxModule's tensors back into the ONNX model it was built from."""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from ..errors import InputError
from .module import OnnxModule


def _as_array(module: OnnxModule, name: str, value: torch.Tensor) -> np.ndarray:
    dtype = module.onnx_dtypes.get(name, value.dtype)
    return np.ascontiguousarray(value.detach().to("cpu", dtype).numpy())


def _replace_tensor(proto: onnx.TensorProto, array: np.ndarray) -> None:
    if tuple(proto.dims) != array.shape:
        raise InputError(f"tensor '{proto.name}' has shape {tuple(proto.dims)} in the model but "
                         f"{array.shape} in the module; write back into the model it was built from")
    proto.CopyFrom(numpy_helper.from_array(array, proto.name))


def _write_constant(node: onnx.NodeProto, array: np.ndarray) -> None:
    for attr in node.attribute:
        if attr.name == "value":
            _replace_tensor(attr.t, array)
            return
    del node.attribute[:]
    node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(array)))


def _materialize(graph: onnx.GraphProto, node: onnx.NodeProto, array: np.ndarray) -> None:
    """Replace an Identity-of-constant node by an initializer named as its output."""
    source = next((i for i in graph.initializer if i.name == node.input[0]), None)
    if source is not None and tuple(source.dims) != array.shape:
        raise InputError(f"tensor '{node.output[0]}' has shape {tuple(source.dims)} in the model "
                         f"but {array.shape} in the module; write back into the model it was built from")
    graph.node.remove(node)
    graph.initializer.append(numpy_helper.from_array(array, node.output[0]))


def _drop_unused(graph: onnx.GraphProto, candidates: set[str]) -> None:
    used = {name for node in graph.node for name in node.input} | {v.name for v in graph.output}
    for init in [i for i in graph.initializer if i.name in candidates and i.name not in used]:
        graph.initializer.remove(init)


def write_back(module: OnnxModule, model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose weights and BN running stats hold the module's values.

    Each tensor goes to the initializer (or Constant node) of the same ONNX name, keeping
    its shape and element type; an untied Identity-of-constant becomes an initializer of
    its output name (a source initializer left unused is dropped). A name missing from
    ``model`` raises InputError; so does a module still carrying the BatchNorms a trainer
    put back (``train.renorm``: they are folded after its last step)."""
    if getattr(module, "renorm", None) is not None:
        raise InputError("the module still carries BatchNorms put back for training - write "
                         "it back after the trainer's last step, which folds them")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    initializers = {init.name: init for init in graph.initializer}
    producers = {n.output[0]: n for n in graph.node if n.op_type in ("Constant", "Identity")}
    sources: set[str] = set()
    copies = {copy: key for key, copy in getattr(module, "stat_copies", {}).items()}
    for name, value in module.named_onnx_tensors():
        array = _as_array(module, name, value)
        node = producers.get(name)
        if name in copies:   # a running statistic the module read from a shared tensor
            index, slot = copies[name]
            graph.initializer.append(numpy_helper.from_array(array, name))
            sources.add(graph.node[index].input[slot])   # dropped if nothing else reads it
            graph.node[index].input[slot] = name
        elif name in initializers:
            _replace_tensor(initializers[name], array)
        elif node is not None and node.op_type == "Constant":
            _write_constant(node, array)
        elif node is not None and name in module.identity_copies:
            _materialize(graph, node, array)
            sources.add(node.input[0])
        else:
            raise InputError(f"module tensor '{name}' has no initializer of that name in the "
                             "model; write back into the model the module was built from")
    _drop_unused(graph, sources)
    return out
