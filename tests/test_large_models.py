"""Models too large for one protobuf (2 GB): protobuf's limit is simulated at a few
hundred kB (``SerializeToString`` raises ``EncodeError`` above it, as upb does at 2 GB),
so the paths of such models run on the embedded sample."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from google.protobuf.message import EncodeError

from conftest import feeds_for, rel_err, run_model
from gpp_onnx import files
from gpp_onnx.cli import main
from gpp_onnx.samples import sample_cnn


@pytest.fixture
def protobuf_limit(monkeypatch):
    """`limit(n)`: models of n bytes or more no longer serialise (nor fit files.serialize)."""
    def limit(n: int) -> None:
        serialize = onnx.ModelProto.SerializeToString

        def limited(self, **kwargs):
            if self.ByteSize() >= n:
                raise EncodeError("Failed to serialize proto")
            return serialize(self, **kwargs)

        monkeypatch.setattr(onnx.ModelProto, "SerializeToString", limited)
        monkeypatch.setattr(files, "_TWO_GB", n)
    return limit


def two_branch(width: int = 600) -> onnx.ModelProto:
    """A prunable conv branch on `x` and a wide Gemm on a second input `z` that no cut
    touches: its weight (256 x width floats) keeps a pruned copy as large as the input."""
    rng = np.random.default_rng(0)

    def w(name, *shape):
        return numpy_helper.from_array(
            (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "c1w", "c1b"], ["c1"], pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "c2w", "c2b"], ["c2"], pads=[1] * 4),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], transB=1),
             helper.make_node("Gemm", ["z", "zw", "zb"], ["y2"], transB=1)]
    inits = [w("c1w", 64, 3, 3, 3), w("c1b", 64), w("c2w", 64, 64, 3, 3), w("c2b", 64),
             w("fw", 10, 64), w("fb", 10), w("zw", width, 256), w("zb", width)]
    graph = helper.make_graph(
        nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4]),
                       helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10]),
         helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["N", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _external(tmp_path, model=None):
    src = tmp_path / "in" / "model.onnx"
    src.parent.mkdir()
    model = model or sample_cnn(0)
    size = model.ByteSize()
    onnx.save(model, src, save_as_external_data=True, location="model.onnx.data")
    return src, size


def test_a_model_over_the_limit_is_analysed(tmp_path, protobuf_limit, capsys):
    """analyze/prune/compare of a model with external data over 2 GB ended in 'internal
    error: EncodeError' (files.serialize caught only ValueError)."""
    src, size = _external(tmp_path)
    protobuf_limit(size * 9 // 10)
    assert main(["analyze", str(src)]) == 0
    assert "channel groups" in capsys.readouterr().out


def test_a_save_over_the_limit_keeps_the_model_and_replaces_its_weights(tmp_path, monkeypatch):
    """A model over 2 GB saved twice to one path (gpp's best.onnx after every round): the
    .data file held both copies (onnx.save appends), and the saved ModelProto had lost its
    weights (result.model of the Python API, gpp's best model kept in memory)."""
    monkeypatch.setattr(files, "serialize", lambda model: None)
    dest = tmp_path / "best.onnx"
    first, second = sample_cnn(0), sample_cnn(1)
    files.save(first, dest)
    size = (tmp_path / "best.onnx.data").stat().st_size
    files.save(second, dest)
    assert (tmp_path / "best.onnx.data").stat().st_size == size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.onnx", "best.onnx.data"]
    assert not any(onnx.external_data_helper.uses_external_data(t)
                   for m in (first, second) for t in m.graph.initializer)
    feeds = feeds_for(second)
    assert rel_err(run_model(dest, feeds), run_model(second, feeds)) == 0


@pytest.mark.parametrize("mask_only", [False, True])
def test_a_pruned_model_over_the_limit_is_checked_and_written_with_its_weights(
        tmp_path, protobuf_limit, mask_only):
    """A cut that leaves the model over 2 GB ended in 'internal error: EncodeError'
    (rounds: verify.serialized(pruned)); it is checked from a file and written as the
    output and its .data, which run from any folder."""
    src, size = _external(tmp_path, two_branch(width=1200))   # (onnx.save empties it)
    model = two_branch(width=1200)
    feeds = feeds_for(model)
    want = run_model(model, feeds)
    protobuf_limit(size * 3 // 4)   # below the cut's size too
    out = tmp_path / "out" / "small.onnx"
    args = ["prune", str(src), "--ratio", "0.5", "--no-latency", "-o", str(out)]
    assert main(args + (["--mask-only"] if mask_only else [])) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "small.onnx", "small.onnx.data", "small.report.json"]
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("small.onnx", "small.onnx.data"):
        (out.parent / name).rename(moved / name)
    onnx.checker.check_model(str(moved / "small.onnx"), full_check=True)
    got = run_model(moved / "small.onnx", feeds)
    assert rel_err(got[1:], want[1:]) == 0       # the untouched branch
    assert sorted(p.name for p in src.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
