"""Models whose input fixes the batch (an export traced with one example): normalising frees
the batch where that changes nothing, pruning and training then step on whole batches, and
the written model declares the input's batch again."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from gpp_onnx import PruneConfig, prune
from gpp_onnx import model as model_io
from gpp_onnx.config import DataOptions, TrainOptions
from gpp_onnx.samples import GraphBuilder
from test_nolabel import digits_x


def _baked(target, allowzero=0, as_constant=False, slice_batch=False, b=1):
    """input (1, 1, 8, 8) -> conv 8 -> Relu -> conv 8 -> Relu -> Reshape(target) -> Gemm 10,
    the batch written into the Reshape target as the dynamo exporter writes it;
    `slice_batch`: the second conv reads x[:1] along the batch (a graph that depends on the
    batch, which must stay fixed)."""
    n, b = b, GraphBuilder((b, 1, 8, 8), seed=0, dynamic_batch=False)
    x = b.act(b.conv("input", 8), "Relu")
    if slice_batch:
        x = b.op("Slice", [x, b.const(np.array([0])), b.const(np.array([1])),
                           b.const(np.array([0]))], (1, 8, 8, 8))
        n = 1
    x = b.act(b.conv(x, 8), "Relu")
    target = np.array(target, dtype=np.int64)
    if as_constant:
        shape = "target_const"
        b.nodes.append(helper.make_node("Constant", [], [shape],
                                        value=numpy_helper.from_array(target, "t")))
    else:
        shape = b.const(target)
    flat = b.op("Reshape", [x, shape], (n, 512), allowzero=allowzero)
    return b.build(b.gemm(flat, 10))


def _per_image(model, x):
    """The model's outputs image by image in onnxruntime (its input takes one only)."""
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])


def _batch_dims(model):
    return [v.type.tensor_type.shape.dim[0] for v in [*model.graph.input, *model.graph.output]]


@pytest.mark.parametrize("target, allowzero, as_constant", [
    ([1, 512], 1, False),          # dynamo: allowzero 1, an initializer
    ([1, -1], 0, True),            # a Constant node, another entry inferred
    ([1, -1], 1, False),           # allowzero 1 and -1: the first entry copies dim 0
])
def test_a_batch_baked_into_a_reshape_is_freed_and_computes_the_same(target, allowzero,
                                                                     as_constant):
    model = _baked(target, allowzero, as_constant)
    freed = model_io.normalize(model)
    assert [d.dim_param for d in _batch_dims(freed)] == ["batch", "batch"]
    x = np.random.default_rng(1).standard_normal((5, 1, 8, 8)).astype(np.float32)
    s = ort.InferenceSession(freed.SerializeToString(), providers=["CPUExecutionProvider"])
    got = s.run(None, {s.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(got, _per_image(model, x), rtol=1e-5, atol=1e-6)


def test_a_graph_that_depends_on_the_batch_keeps_it_fixed():
    model = _baked([1, 512], slice_batch=True)
    kept = model_io.normalize(model)
    assert [d.dim_value for d in _batch_dims(kept)] == [1, 1]


def test_a_freed_model_prunes_trains_in_batches_and_declares_its_batch_again(tmp_path,
                                                                            caplog):
    model = _baked([1, 512], allowzero=1)
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    cfg = PruneConfig(ratio=0.5, round_to=1, latency=False, criterion="gpp",
                      data=DataOptions(str(digits_x(tmp_path, 200, labels=True)), batch_size=16),
                      train=TrainOptions(epochs=0.5, batch_size=16))
    with caplog.at_level("INFO", logger="gpp_onnx"):
        prune(src, tmp_path / "o.onnx", cfg, plan_out=tmp_path / "plan.json")
    assert "batches of 1" not in caplog.text
    assert "6 steps" in caplog.text     # whole batches: 180 training images / 16, half an epoch
    out = onnx.load(tmp_path / "o.onnx")
    assert [d.dim_value for d in _batch_dims(out)] == [1, 1]  # as the input declared
    x = np.random.default_rng(2).standard_normal((1, 1, 8, 8)).astype(np.float32)
    assert _per_image(out, x).shape == (1, 10)
    removed = json.loads((tmp_path / "plan.json").read_text())["removed"]
    assert sum(map(len, removed.values())) > 0


def test_a_model_that_keeps_its_fixed_batch_is_scored_one_image_at_a_time(tmp_path):
    """The discriminant criterion traced whole batches through a graph that takes one."""
    src = tmp_path / "m.onnx"
    onnx.save(_baked([1, 512], slice_batch=True), src)
    cfg = PruneConfig(ratio=0.5, round_to=1, latency=False, criterion="gpp",
                      data=DataOptions(str(digits_x(tmp_path, 100, labels=True))))
    prune(src, tmp_path / "o.onnx", cfg, plan_out=tmp_path / "plan.json")
    removed = json.loads((tmp_path / "plan.json").read_text())["removed"]
    assert sum(map(len, removed.values())) > 0


def test_a_fixed_batch_is_the_batch_latency_is_timed_on(tmp_path, capsys):
    from gpp_onnx.cli import main

    src = tmp_path / "m.onnx"
    onnx.save(_baked([1, 512], allowzero=1), src)
    assert main(["-q", "profile", str(src), "--batch", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fixes the batch at 1" in err[0]
    assert main(["-q", "prune", str(src), "--latency-batch", "4", "-o",
                 str(tmp_path / "o.onnx")]) == 2
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("b", [1, 4])
def test_a_cut_without_data_declares_the_input_batch_and_runs_at_it(b, tmp_path):
    """Batch 4: the checks feed 2 images, which the file as read takes in a padded chunk."""
    src = tmp_path / "m.onnx"
    onnx.save(_baked([b, 512], allowzero=1, b=b), src)
    prune(src, tmp_path / "o.onnx", PruneConfig(ratio=0.5, round_to=1, latency=False))
    out = onnx.load(tmp_path / "o.onnx")
    assert [d.dim_value for d in _batch_dims(out)] == [b, b]
    x = np.random.default_rng(3).standard_normal((b, 1, 8, 8)).astype(np.float32)
    s = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    assert s.run(None, {s.get_inputs()[0].name: x})[0].shape == (b, 10)


def test_labelled_data_for_a_model_that_mixes_its_batch_is_refused(tmp_path, capsys):
    """input (2, 1, 8, 8) -> 2 convs -> Reshape [1, -1] -> Gemm: one row of classes for two
    images (kept fixed: freeing would change it)."""
    from gpp_onnx.cli import main

    g = GraphBuilder((2, 1, 8, 8), seed=0, dynamic_batch=False)
    x = g.act(g.conv(g.act(g.conv("input", 8), "Relu"), 8), "Relu")
    flat = g.op("Reshape", [x, g.const(np.array([1, -1], dtype=np.int64))], (1, 1024))
    src = tmp_path / "m.onnx"
    onnx.save(g.build(g.gemm(flat, 10)), src)
    data = str(digits_x(tmp_path, 100, labels=True))
    assert main(["-q", "prune", str(src), "--data", data, "-o", str(tmp_path / "o.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 rows for a batch of 2 images" in err[0]
    assert not (tmp_path / "o.onnx").exists()


def _io(name, dims):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def test_only_a_freed_batch_is_declared_again():
    """ddddocr's recognizer declares its (T, 1, K) output as (1, T) and keeps its fixed
    batch: the written model keeps the output shape inference gave it (dim 0 T), where it
    had been set to the stale 1. A freed model gets its declared batch back."""
    from gpp_onnx.batch import declare

    def model(in_dims, out_dims):
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                                  [_io("x", in_dims)], [_io("y", out_dims)])
        return helper.make_model(graph)

    original = model([1, 3, 8], [1, "seqlen"])
    kept = model([1, 3, 8], ["T", 1, 5])
    assert declare(original, kept) is kept
    freed = model(["N", 3, 8], ["N", 5])
    dims = [[d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
            for v in (*declare(original, freed).graph.input,
                      *declare(original, freed).graph.output)]
    assert dims == [[1, 3, 8], [1, 5]]
