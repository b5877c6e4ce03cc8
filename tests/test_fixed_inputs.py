"""A second input whose dim 0 the model fixes (a recurrent state (1, 1, H), a bias row)
keeps that size in the check feeds when the first input's batch is free."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from conftest import assert_pruned_equals_masked
from gpp_onnx.graph import GraphView
from gpp_onnx.samples import GraphBuilder


def _with_second_input(b: GraphBuilder, out: str, name: str, shape: list) -> onnx.ModelProto:
    """`b`'s nodes as a model of the image (N, 3, 8, 8) and a float input `name` of
    `shape`, with the (N, 5) output `out`."""
    graph = helper.make_graph(
        b.nodes, f"with_{name}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8]),
         helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", 5])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def two_inputs() -> onnx.ModelProto:
    """image (N, 3, 8, 8) -> conv -> + Reshape(row, (1, 8, 1, 1)) -> relu -> conv -> GAP
    -> Gemm, with `row` a second input of fixed shape (1, 8)."""
    b = GraphBuilder((1, 3, 8, 8), seed=2)
    b.shapes["row"] = (1, 8)
    shift = b.op("Reshape", ["row", b.const(np.array([1, 8, 1, 1], np.int64))], (1, 8, 1, 1))
    x = b.act(b.binary("Add", b.conv("input", 8), shift), "Relu")
    x = b.act(b.conv(x, 16), "Relu")
    out = b.gemm(b.flatten(b.gap(x)), 5)
    return _with_second_input(b, out, "row", [1, 8])


def test_check_feeds_keep_a_fixed_leading_dim():
    view = GraphView(two_inputs())
    feeds = view.check_feeds()
    assert feeds["input"].shape == (2, 3, 8, 8)   # free batch: two images
    assert feeds["row"].shape == (1, 8)           # fixed by the model: kept


def test_model_with_a_fixed_second_input_prunes(tmp_path):
    # before, the check fed `row` as (2, 8) and the input model failed to run
    assert_pruned_equals_masked(two_inputs(), tmp_path, ratio=0.5, round_to=1, latency=False)


def scalar_second_input() -> onnx.ModelProto:
    """image (N, 3, 8, 8) -> conv -> relu -> conv -> relu -> GAP -> Gemm, divided by `T`,
    a 0-D input (a temperature)."""
    b = GraphBuilder((1, 3, 8, 8), seed=3)
    x = b.act(b.conv("input", 8), "Relu")
    x = b.act(b.conv(x, 16), "Relu")
    logits = b.gemm(b.flatten(b.gap(x)), 5)
    out = b.op("Div", [logits, "T"], (1, 5))
    return _with_second_input(b, out, "T", [])


def test_check_feeds_keep_a_scalar_input_scalar():
    feeds = GraphView(scalar_second_input()).check_feeds()
    assert feeds["input"].shape == (2, 3, 8, 8)
    assert feeds["T"].shape == ()                 # no batch dim: was fed as (2,)


def test_model_with_a_scalar_second_input_prunes(tmp_path):
    # before, the check fed `T` as (2,) and the pruned model 'failed to run'
    assert_pruned_equals_masked(scalar_second_input(), tmp_path, ratio=0.5, round_to=1,
                                latency=False)
