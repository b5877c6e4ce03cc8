"""The models gpp-onnx refuses before any work, whatever the command: control flow
(If, Loop, Scan: the channels a branch reads cannot be followed), and quantized models in
any of the forms tools write them (the standard ops, onnxruntime's contrib ops, integer
weights cast to floats): prune the float model, then quantize. Weights holding NaN or
infinities are refused too: the model computes NaN, and the criteria, the data checks and
the equivalence check each failed on it in their own words (or not at all)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import UnsupportedModelError

CONTROL_FLOW = {"If", "Loop", "Scan"}
QUANTIZED = {"QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul",
             "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QGemm",
             # onnxruntime's contrib ops: ORT_ENABLE_EXTENDED fuses a dynamically quantized
             # MatMul into DynamicQuantizeMatMul / MatMulIntegerToFloat, leaving none of the above
             "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits", "QAttention",
             "DynamicQuantizeLSTM", "QLinearAdd", "QLinearMul", "QLinearConcat",
             "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearSigmoid",
             "QLinearLeakyRelu", "QLinearSoftmax", "QLinearWhere", "QEmbedLayerNormalization"}


def check(model: onnx.ModelProto, where: str = "model") -> None:
    """UnsupportedModelError (one line, naming the ops and the fix) for control flow and
    for quantized models."""
    ops = {n.op_type for n in model.graph.node}
    if ops & CONTROL_FLOW:
        raise UnsupportedModelError(
            f"{where} contains control flow ({', '.join(sorted(ops & CONTROL_FLOW))}) - "
            "export the classifier without data-dependent branches or loops")
    if ops & QUANTIZED:
        raise UnsupportedModelError(
            f"{where} is quantized ({', '.join(sorted(ops & QUANTIZED))}) - "
            "prune the float model first, then quantize the pruned model")
    cast = _integer_weight(model)
    if cast is not None:
        raise UnsupportedModelError(
            f"{where} is quantized (weights stored as integers and cast to float, e.g. "
            f"'{cast}') - prune the float model first, then quantize the pruned model")
    broken = _nonfinite_weight(model)
    if broken is not None:
        raise UnsupportedModelError(
            f"{where}: weight '{broken}' holds NaN or infinite values, so the model computes "
            "NaN - fix the weights (re-export from a finite checkpoint) before pruning")


# INT4/UINT4 (22, 21) came with onnx 1.16: by number, so that importing works on onnx 1.15
INTEGER_WEIGHTS = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8,
                   getattr(onnx.TensorProto, "INT4", 22), getattr(onnx.TensorProto, "UINT4", 21)}


def _integer_weight(model: onnx.ModelProto) -> str | None:
    """The first int8/uint8/int4 tensor of more than one element that a Cast turns into
    floats and that (through scaling and reshaping) is the weight of a Conv, ConvTranspose,
    Gemm or MatMul: weight-only quantization written as Cast and Mul. Normalising folds it
    into a float32 weight, so the written model was silently four times its bytes per
    weight. (An integer mask or table cast to floats elsewhere is no weight.)"""
    wide = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
            onnx.TensorProto.DOUBLE}
    small = {t.name for t in model.graph.initializer
             if t.data_type in INTEGER_WEIGHTS and np.prod(t.dims) > 1}
    small |= {n.output[0] for n in model.graph.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"
              and n.attribute[0].t.data_type in INTEGER_WEIGHTS
              and np.prod(n.attribute[0].t.dims) > 1}
    users: dict[str, list] = {}
    for n in model.graph.node:
        for name in n.input:
            users.setdefault(name, []).append(n)
    for cast in model.graph.node:
        if not (cast.op_type == "Cast" and cast.input and cast.input[0] in small
                and any(a.name == "to" and a.i in wide for a in cast.attribute)):
            continue
        values, seen = [cast.output[0]], set()
        while values:
            value = values.pop()
            seen.add(value)
            for user in users.get(value, ()):
                if user.op_type in _WEIGHT_READERS and user.input[1:2] == [value]:
                    return cast.input[0]
                if user.op_type in _DEQUANTIZING:
                    values += [o for o in user.output if o not in seen]
    return None


_WEIGHT_READERS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
_DEQUANTIZING = {"Mul", "Sub", "Add", "Div", "Reshape", "Transpose", "Identity", "Cast",
                 "Unsqueeze", "Squeeze"}


# ops whose inputs after the first are trained weights (a bias, a BatchNorm's statistics)
_WEIGHTED = _WEIGHT_READERS | {"BatchNormalization", "InstanceNormalization",
                               "LayerNormalization", "GroupNormalization", "PRelu"}
_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}


def _nonfinite_weight(model: onnx.ModelProto) -> str | None:
    """The first float initializer read as a weight by a Conv, Gemm, MatMul or
    normalisation that holds a NaN or an infinity (constants elsewhere, such as an
    attention mask's -inf, are left alone)."""
    inits = {t.name: t for t in model.graph.initializer if t.data_type in _FLOATS}
    seen: set[str] = set()
    for node in model.graph.node:
        if node.op_type not in _WEIGHTED:
            continue
        for name in node.input[1:]:
            if name in inits and name not in seen:
                seen.add(name)
                if not np.isfinite(numpy_helper.to_array(inits[name])).all():
                    return name
    return None
