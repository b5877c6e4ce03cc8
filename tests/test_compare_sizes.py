"""compare runs and counts two models at one input size: a copy exported at a fixed size
beside one that leaves its sides free (the free one was probed at 224, which the fixed
one refused with an internal error; in the other order the free one's MACs were counted
at 224 while both ran at the fixed size)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from gpp_onnx.cli import main


def _net(sides) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(size=(10, 8)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["N", 3, *sides])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("free_first", [True, False])
def test_free_and_fixed_copies_compare_at_the_fixed_size(tmp_path, capsys, free_first):
    free, fixed = tmp_path / "free.onnx", tmp_path / "fixed.onnx"
    onnx.save(_net(["H", "W"]), free)
    onnx.save(_net([32, 32]), fixed)
    a, b = (free, fixed) if free_first else (fixed, free)
    assert main(["-q", "compare", str(a), str(b), "--repeats", "3"]) == 0
    macs = next(line for line in capsys.readouterr().out.splitlines()
                if line.startswith("MACs")).split()
    assert macs[1:] == ["221.26k", "221.26k", "1.000"]    # 8 * 27 * 32 * 32 + 80


@pytest.mark.parametrize("free_first", [True, False])
def test_free_and_fixed_batch_copies_compare(tmp_path, capsys, free_first):
    """A copy exported at batch 4 beside one with a free batch: the free one was probed at
    batch 1, which the fixed one refused with an internal error."""
    fixed_model = _net([32, 32])
    for value in (*fixed_model.graph.input, *fixed_model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 4
    free, fixed = tmp_path / "free.onnx", tmp_path / "fixed.onnx"
    onnx.save(_net([32, 32]), free)
    onnx.save(fixed_model, fixed)
    a, b = (free, fixed) if free_first else (fixed, free)
    assert main(["-q", "compare", str(a), str(b), "--repeats", "3"]) == 0
    macs = next(line for line in capsys.readouterr().out.splitlines()
                if line.startswith("MACs")).split()
    assert macs[1:] == ["221.26k", "221.26k", "1.000"]    # per sample, as above


def test_onnxruntime_optimised_copy_counts_its_fused_ops(tmp_path, capsys):
    """A copy saved by onnxruntime at ORT_ENABLE_EXTENDED (Conv + Relu as com.microsoft
    FusedConv, Gemm + Relu as FusedGemm) computes the same MACs; they were not counted
    (0 MACs, ratio 0.000)."""
    import onnxruntime as ort

    model = _net([32, 32])
    model.graph.node[-1].output[0] = "g"
    model.graph.node.append(helper.make_node("Relu", ["g"], ["y"]))
    src, opt = tmp_path / "float.onnx", tmp_path / "optimised.onnx"
    onnx.save(model, src)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(opt)
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    assert {"FusedConv", "FusedGemm"} <= {n.op_type for n in onnx.load(opt).graph.node}
    assert main(["-q", "compare", str(src), str(opt), "--repeats", "3"]) == 0
    macs = next(line for line in capsys.readouterr().out.splitlines()
                if line.startswith("MACs")).split()
    assert macs[1:] == ["221.26k", "221.26k", "1.000"]


def test_analyze_shares_of_a_model_without_counted_macs(tmp_path, capsys):
    """A model none of whose ops count MACs shows 0% MACs per group, not 100% (the share
    was 1 - 0 / max(0, 1))."""
    rng = np.random.default_rng(0)
    scale = numpy_helper.from_array(rng.normal(size=(1, 8, 1, 1)).astype(np.float32), "s")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "s"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 16, 16])], [scale])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    main(["-q", "analyze", str(path)])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith("x ")]
    assert [row[4:6] for row in rows] == [["100.0%", "0.0%"]]    # the scale is x's


def _with_temperature(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with its logits divided by `T`, a 0-D input (a temperature)."""
    model.graph.node[-1].output[0] = "logits"
    model.graph.node.append(helper.make_node("Div", ["logits", "T"], ["y"]))
    model.graph.input.append(helper.make_tensor_value_info("T", TensorProto.FLOAT, []))
    return model


@pytest.mark.parametrize("sides_b", [["H", "W"], [32, 32]])
def test_model_with_a_scalar_input_compares(tmp_path, capsys, sides_b):
    # the 0-D input's shape () went into the sizes both run at, which --input-shape's
    # check refused: '--input-shape T:() is not a shape', with no --input-shape given
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(_with_temperature(_net(["H", "W"])), a)
    onnx.save(_with_temperature(_net(sides_b)), b)
    assert main(["-q", "compare", str(a), str(b), "--repeats", "3"]) == 0
    assert any(line.startswith("MACs") for line in capsys.readouterr().out.splitlines())
