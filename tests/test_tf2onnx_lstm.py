"""tf2onnx's bidirectional LSTM stack (openWakeWord's hey_mycroft): zero initial states
built at run time as Concat(Unsqueeze(Expand(0, [batch, H]))) per direction, and the
batch of the next layer read from a permuted shape, Slice(Gather(Shape(y), [1, 0, 2]),
0:1). Neither touches the hidden units, so both LSTMs stay prunable."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from conftest import assert_pruned_equals_masked
from gpp_onnx.analysis import analyze_model
from gpp_onnx.model import normalize
from gpp_onnx.samples import GraphBuilder

SEQ, FEATURES, H1, H2 = 5, 8, 8, 4


def _i64(*v):
    return np.array(v, dtype=np.int64)


def _zero_state(b, shape_vec, hidden):
    """Concat over directions of Unsqueeze(Expand(0.0, [batch, hidden])), batch taken
    from `shape_vec` (a shape whose first entry is the batch)."""
    batch = b.op("Slice", [shape_vec, b.const(_i64(0)), b.const(_i64(1)), b.const(_i64(0))], (1,))
    target = b.op("Concat", [batch, b.const(_i64(hidden))], (2,), axis=0)
    zero = b.const(np.array(0.0, np.float32), "zero")
    b.shapes[zero] = ()
    one = b.op("Unsqueeze", [b.op("Expand", [zero, target], (1, hidden)), b.const(_i64(0))],
               (1, 1, hidden))
    return b.op("Concat", [one, one], (2, 1, hidden), axis=0)


def stacked_lstm(permuted_shape_only: bool = True) -> onnx.ModelProto:
    b = GraphBuilder((1, SEQ, FEATURES), seed=4)
    seq = b.op("Transpose", ["input"], (SEQ, 1, FEATURES), perm=[1, 0, 2])
    state = _zero_state(b, b.op("Shape", ["input"], (3,)), H1)
    y = b.recurrent(seq, "LSTM", hidden=H1, direction="bidirectional",
                    initial=[state, state])[0]
    merged = b.merge_directions(y)                                 # (SEQ, N, 2 * H1)
    # tf2onnx: the batch-major shape, then its first entry (the batch) for the state
    shape = b.op("Gather", [b.op("Shape", [merged], (3,)), b.const(_i64(1, 0, 2))], (3,),
                 axis=0)
    state2 = _zero_state(b, shape, H2)
    out = b.recurrent(merged, "LSTM", hidden=H2, direction="bidirectional",
                      initial=[state2, state2])[1]                   # Y_h (2, N, H2)
    flat = b.op("Reshape", [b.op("Transpose", [out], (1, 2, H2), perm=[1, 0, 2]),
                            b.const(_i64(0, -1))], (1, 2 * H2))
    last = b.gemm(flat, 3)
    if not permuted_shape_only:  # the whole permuted shape, width included, as a number
        total = b.op("ReduceSum", [b.op("Cast", [shape], (3,), to=TensorProto.FLOAT)], (),
                     keepdims=0)
        last = b.op("Mul", [last, total], (1, 3))
    graph = helper.make_graph(
        b.nodes, "stacked_lstm",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", SEQ, FEATURES])],
        [helper.make_tensor_value_info(last, TensorProto.FLOAT, ["N", 3])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _lstm_groups(model):
    analysis = analyze_model(normalize(model))
    lstms = [n for n in model.graph.node if n.op_type == "LSTM"]
    return [next(g for g in analysis.groups if n.output[0] in g.values) for n in lstms]


def test_both_lstms_prunable_and_pruned_equals_masked(tmp_path):
    model = stacked_lstm()
    assert all(g.prunable for g in _lstm_groups(model))
    result = assert_pruned_equals_masked(model, tmp_path, ratio=0.5, round_to=1,
                                         latency=False)
    lstms = [n for n in model.graph.node if n.op_type == "LSTM"]
    assert [len(result.plan.removed[n.output[0]]) for n in lstms] == [H1 // 2, H2 // 2]


def test_width_read_from_the_shape_still_blocks():
    first, _ = _lstm_groups(stacked_lstm(permuted_shape_only=False))
    assert not first.prunable and "read by Shape" in first.reason
