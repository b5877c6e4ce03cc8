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
