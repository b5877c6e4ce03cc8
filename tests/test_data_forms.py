"""Data a model can and cannot take: integer inputs, empty and feature arrays, channel
counts other than 1, 3 or 4, loose images beside class folders, labels that a run ignores,
a free time axis, an output path onto the data."""
from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from gpp_onnx.cli import main
from gpp_onnx.data import DataSpec, load_dataset
from gpp_onnx.samples import GraphBuilder


def _cnn(channels=1, classes=3):
    b = GraphBuilder((1, channels, 8, 8), seed=0)
    x = b.act(b.conv("input", 6), "Relu")
    return b.build(b.gemm(b.flatten(b.gap(x)), classes))


def _run(tmp_path, capsys, model, data, extra=(), out_name="o.onnx"):
    src, out = tmp_path / "m.onnx", tmp_path / out_name
    onnx.save(model, src)
    code = main(["prune", str(src), "-o", str(out), "--data", str(data), "--no-latency",
                 "--ratio", "0.5", "--round-to", "1", *extra])
    return code, capsys.readouterr().err.strip().splitlines()


def _integer_input(model, dtype):
    raw = helper.make_tensor_value_info("raw", dtype, ["N", 1, 8, 8])
    model.graph.node.insert(0, helper.make_node("Cast", ["raw"], ["input"], to=TensorProto.FLOAT))
    model.graph.input[0].CopyFrom(raw)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_an_integer_input_other_than_uint8_images_is_refused_before_the_work(tmp_path, capsys):
    model = _integer_input(_cnn(), TensorProto.INT64)
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((20, 8, 8), np.uint8), y=np.arange(20) % 3)
    code, lines = _run(tmp_path, capsys, model, data)
    assert code == 2 and "takes int64" in lines[-1] and "float input" in lines[-1]
    assert not any("scores" in line or "Traceback" in line for line in lines)
    assert not (tmp_path / "o.onnx").exists()


def test_uint8_pixels_are_fed_as_stored_and_the_model_pruned(tmp_path, capsys):
    """A model that takes uint8 pixels and casts them itself was refused with --data. The
    stored pixels are its input now: with the labels its own top class on them (computed
    here in onnxruntime), evaluate reports accuracy 1."""
    b = GraphBuilder((1, 1, 8, 8), seed=4)   # its top class varies over these images
    model = b.build(b.gemm(b.flatten(b.gap(b.act(b.conv("input", 6), "Relu"))), 3))
    model = _integer_input(model, TensorProto.UINT8)
    x = np.random.default_rng(0).integers(0, 256, (40, 8, 8)).astype(np.uint8)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    top = session.run(None, {"raw": x[:, None]})[0].argmax(1)
    assert len(np.unique(top)) >= 2
    data = tmp_path / "d.npz"
    np.savez(data, x=x, y=top)
    onnx.save(model, tmp_path / "m.onnx")
    assert main(["evaluate", str(tmp_path / "m.onnx"), "--data", str(data)]) == 0
    assert "top-1 accuracy 1.0000" in capsys.readouterr().out
    code, lines = _run(tmp_path, capsys, model, data, ["--finetune-epochs", "1"])
    assert code == 0, lines[-1]
    written = onnx.load(tmp_path / "o.onnx").graph.input[0].type.tensor_type.elem_type
    assert written == TensorProto.UINT8
    code, lines = _run(tmp_path, capsys, model, data, ["--mean", "0.5"], out_name="m2.onnx")
    assert code == 2 and "--mean" in lines[-1] and not (tmp_path / "m2.onnx").exists()


def test_an_empty_float_array_is_named_empty(tmp_path, capsys):
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((0, 1, 8, 8), np.float32))
    code, lines = _run(tmp_path, capsys, _cnn(), data)
    assert code == 2 and "empty" in lines[-1] and "internal" not in lines[-1]


def test_whole_float_pixels_are_divided_by_255_and_features_taken_as_they_are(tmp_path,
                                                                            caplog):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (6, 1, 8, 8)).astype(np.float32)
    features = (rng.random((6, 1, 8, 8)) * 50).astype(np.float32)
    for name, x, want in (("p", pixels, pixels / 255), ("f", features, features)):
        np.savez(tmp_path / f"{name}.npz", x=x)
        with caplog.at_level(logging.WARNING, logger="gpp_onnx"):
            ds = load_dataset(DataSpec(str(tmp_path / f"{name}.npz"), 1, 8, 8))
        np.testing.assert_allclose(ds.x[:], want, rtol=1e-6)
    assert "taken as they are" in caplog.text


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_the_models_channel_count_tells_the_channel_axis(tmp_path, layout):
    x = np.random.default_rng(0).random((5, 2, 8, 8)).astype(np.float32)
    stored = x if layout == "NCHW" else x.transpose(0, 2, 3, 1)
    np.savez(tmp_path / "d.npz", x=stored)
    ds = load_dataset(DataSpec(str(tmp_path / "d.npz"), 2, 8, 8))
    np.testing.assert_allclose(ds.x[:], x)


def _png(path, value):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)


def test_loose_images_beside_a_folder(tmp_path, capsys):
    root = tmp_path / "frames"
    for i in range(6):
        _png(root / f"{i}.png", 10 * i)
    _png(root / "thumbs" / "t.png", 200)
    # without labels every image counts, in a sub-folder or not
    ds = load_dataset(DataSpec(str(root), 1, 8, 8, labels=False))
    assert len(ds) == 7
    assert sorted(np.round(ds.x[:].reshape(7, -1)[:, 0] * 255)) == [0, 10, 20, 30, 40, 50,
                                                                      200]
    # with labels the folder is the one class, and the loose images are named as left out
    code, lines = _run(tmp_path, capsys, _cnn(), root, ["--criterion", "gpp"])
    assert code == 2
    assert any("6 images beside the class folders are left out" in line for line in lines)


def test_labels_a_run_ignores_are_not_checked_for_a_non_image_input(tmp_path, capsys):
    model = _conv1d(time=16)
    data = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.random((40, 4, 16)).astype(np.float32),
             y=np.eye(3)[np.arange(40) % 3])                      # one-hot: not class indices
    code, _ = _run(tmp_path, capsys, model, data, ["--no-labels"])
    assert code == 0 and (tmp_path / "o.onnx").exists()


def _conv1d(time=None, classes=3):
    """(N, 4, T) features -> 1-D conv -> mean over time -> Gemm."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 4, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.zeros(8, np.float32), "b"),
             numpy_helper.from_array(rng.standard_normal((classes, 8)).astype(np.float32), "g"),
             numpy_helper.from_array(np.zeros(classes, np.float32), "gb")]
    nodes = [helper.make_node("Conv", ["feats", "w", "b"], ["c"], pads=[1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("ReduceMean", ["r"], ["m"], axes=[2], keepdims=0, name="mean"),
             helper.make_node("Gemm", ["m", "g", "gb"], ["logits"], transB=1, name="fc")]
    graph = helper.make_graph(
        nodes, "audio", [helper.make_tensor_value_info("feats", TensorProto.FLOAT,
                                                       ["N", 4, time or "T"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_a_free_time_axis_takes_the_datas_length(tmp_path, capsys):
    data = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.random((40, 4, 30)).astype(np.float32), y=np.arange(40) % 3)
    code, lines = _run(tmp_path, capsys, _conv1d(), data, ["--criterion", "l1"])
    assert code == 0, lines[-1]
    assert any("(4, 30)" in line for line in lines)


def test_an_output_onto_the_data_file_is_refused(tmp_path, capsys):
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((20, 8, 8), np.uint8), y=np.arange(20) % 3)
    before = data.read_bytes()
    code, lines = _run(tmp_path, capsys, _cnn(), data, out_name="d.npz")
    assert code == 2 and "would overwrite the data" in lines[-1]
    assert data.read_bytes() == before


def test_a_plan_out_onto_the_data_file_is_refused(tmp_path, capsys):
    """--plan-out naming the --data file replaced the data set with the plan (exit 0)."""
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((20, 8, 8), np.uint8), y=np.arange(20) % 3)
    before = data.read_bytes()
    code, lines = _run(tmp_path, capsys, _cnn(), data, ["--plan-out", str(data)])
    assert code == 2 and "--plan-out" in lines[-1] and "would overwrite" in lines[-1]
    assert data.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "m.onnx"]


def test_normalisation_values_must_be_finite_and_fit_the_channels(tmp_path):
    from gpp_onnx.errors import DataError

    np.savez(tmp_path / "d.npz", x=np.zeros((4, 1, 8, 8), np.uint8))
    with pytest.raises(DataError, match="must be finite"):
        load_dataset(DataSpec(str(tmp_path / "d.npz"), 1, 8, 8, mean=(float("nan"),)))
    with pytest.raises(DataError, match="give 1 value$"):
        load_dataset(DataSpec(str(tmp_path / "d.npz"), 1, 8, 8, mean=(0.5, 0.5)))


def test_distill_0_without_labels_is_named_as_ignored(tmp_path, capsys):
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).random((80, 1, 8, 8)))
    code, lines = _run(tmp_path, capsys, _cnn(), tmp_path / "d.npz",
                       ["--finetune-epochs", "0.1", "--distill", "0"])
    assert code == 0 and any("--distill 0 is ignored without labels" in x for x in lines)


def test_a_criterion_without_its_feature_is_refused_before_the_data_is_read(tmp_path, capsys):
    b = GraphBuilder((1, 1, 8, 8), seed=0)
    x = b.act(b.conv("input", 6), "Relu")
    model = b.build(b.flatten(b.gap(b.conv(x, 3, k=1))))      # a conv classifier, no Gemm
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((30, 8, 8), np.uint8), y=np.arange(30) % 3)
    code, lines = _run(tmp_path, capsys, model, data)
    assert code == 2 and "--feature-tensor" in lines[-1]
    assert not any("samples" in line for line in lines)


def _nhwc_free_sides():
    """(N, H, W, 3) -> Transpose -> conv -> relu -> GAP -> Gemm, H and W left free (as
    tf2onnx writes a TensorFlow image model)."""
    model = _cnn(channels=3)
    model.graph.node.insert(0, helper.make_node("Transpose", ["nhwc"], ["input"],
                                                perm=[0, 3, 1, 2]))
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info(
        "nhwc", TensorProto.FLOAT, ["N", "H", "W", 3]))
    onnx.checker.check_model(model, full_check=True)
    return model


def test_an_nhwc_input_with_free_sides_runs_at_224(tmp_path, capsys):
    from gpp_onnx.graph import GraphView

    # its H (axis 1) was refused ('symbolic dim at axis 1 - pass --input-shape ... e.g.
    # 1,3,224,224', a shape it then failed to run on), without data and with images over 224
    assert GraphView(_nhwc_free_sides()).inputs[0].shape == (1, 224, 224, 3)
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(_nhwc_free_sides(), src)
    assert main(["prune", str(src), "-o", str(out), "--no-latency", "--ratio", "0.5",
                 "--round-to", "1"]) == 0
    dims = onnx.load(out).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", "H", "W", 3]
