"""A float16 or bfloat16 model checked in float32 as well: the same graph computing in
float32 (``upcast``), pruned against masked there (``check_in_float32``), where the low
precision's own rounding no longer hides a wrong cut."""
from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import VerificationError
from .logits import exposing, saturated_inputs
from .verify import (LOW_PRECISION, check_equivalent, measure_tolerance, run,
                     session_source)

logger = logging.getLogger(__name__)


def upcast(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph computing in float32 where it holds float16/bfloat16 (weights
    converted exactly, Casts and dtype attributes pointed at float32)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph, f32 = out.graph, onnx.TensorProto.FLOAT

    def widened(t: onnx.TensorProto) -> onnx.TensorProto:
        return numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name)

    for t in graph.initializer:
        if t.data_type in LOW_PRECISION:
            t.CopyFrom(widened(t))
    for v in [*graph.input, *graph.output]:
        if v.type.tensor_type.elem_type in LOW_PRECISION:
            v.type.tensor_type.elem_type = f32
    del graph.value_info[:]
    for node in graph.node:
        for a in node.attribute:
            if a.name in ("to", "dtype") and a.type == onnx.AttributeProto.INT \
                    and a.i in LOW_PRECISION:
                a.i = f32
            elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type in LOW_PRECISION:
                a.t.CopyFrom(widened(a.t))
    return out


def check_in_float32(pruned: onnx.ModelProto, masked: onnx.ModelProto, feeds: dict
                     ) -> float | None:
    """Pruned vs masked of a low-precision model, both computed in float32, within the
    float32 tolerance of the masked copy (the 1e-5 floor unless its own noise is larger);
    None (and a warning) when the float32 copies do not run."""
    wide = {k: v.astype(np.float32) if v.dtype.kind == "f" and v.dtype.itemsize < 4 else v
            for k, v in ((k, np.asarray(v)) for k, v in feeds.items())}
    try:
        reference32 = upcast(masked)
        extra = saturated_inputs(reference32)
        source = session_source(reference32)
        reference = run(exposing(source, extra), wide, "masked model in float32")
        tol = measure_tolerance(reference32, wide, "masked model in float32", source, reference)
        got = run(exposing(session_source(upcast(pruned)), extra), wide,
                  "pruned model in float32")
    except VerificationError as err:
        logger.warning("float32 check of the low-precision model skipped: %s", err)
        return None
    err = check_equivalent(got, reference, "pruned model (computed in float32)",
                           "the masked original (computed in float32)", tol)
    logger.info("verified in float32: pruned == masked original (relative error %.1e < %.1e)",
                err, tol.value)
    return err
