"""Output kinds beyond (N, K) logits (a Softmax over positions, a Sigmoid map), BatchNorm
while distilling, models with a fixed batch, and the generated unlabelled images of
tools/nolabel_images.py: each checked against an independent numpy / torch computation."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from conftest import run_model
from gpp_onnx import PruneConfig, prune
from gpp_onnx.analysis import analyze_model
from gpp_onnx.config import DataOptions, TrainOptions
from gpp_onnx.data import DataSpec, iter_batches, load_dataset
from gpp_onnx.finetune import fixed_batch, train_model
from gpp_onnx.importance import Evidence, get_criterion
from gpp_onnx.samples import GraphBuilder, digits_cnn
from gpp_onnx.teacher import (BINARY, CLASS, REGRESSION, OutputKind, Teacher, fidelity,
                               output_kinds, target_key)
from gpp_onnx.train import Distill
from test_nolabel import digits_x, log_softmax

Image = pytest.importorskip("PIL.Image")


def sequence_cnn(opset: int = 17, axis: int = -1, classes: int = 5) -> onnx.ModelProto:
    """A CTC-style recognizer head: (N, 1, 8, 8) -> conv -> mean over the rows -> (N, 8
    positions, 8 features) -> MatMul -> Softmax over `axis` of (N, 8, classes)."""
    b = GraphBuilder((1, 1, 8, 8), seed=0, opset=opset)
    x = b.act(b.conv("input", 8), "Relu")
    if opset < 18:
        x = b.op("ReduceMean", [x], (1, 8, 1, 8), axes=[2], keepdims=1)
    else:
        x = b.op("ReduceMean", [x, b.const(np.array([2], dtype=np.int64))], (1, 8, 1, 8))
    x = b.op("Reshape", [x, b.const(np.array([0, 8, 8], dtype=np.int64))], (1, 8, 8))
    x = b.op("Transpose", [x], (1, 8, 8), perm=[0, 2, 1])
    return b.build(b.op("Softmax", [b.matmul(x, classes)], (1, 8, classes), axis=axis))


def test_a_softmax_over_positions_is_a_class_output():
    (k,) = output_kinds(analyze_model(sequence_cnn()))
    model = sequence_cnn()
    assert (k.kind, k.form, k.axis, k.logits) == (CLASS, "probs", 2, model.graph.node[-1].input[0])
    (k,) = output_kinds(analyze_model(sequence_cnn(opset=12, axis=2)))
    assert (k.kind, k.axis) == (CLASS, 2)
    # before opset 13 a Softmax over axis 1 of (N, T, K) normalises T*K values together
    (k,) = output_kinds(analyze_model(sequence_cnn(opset=12, axis=1)))
    assert k.kind == REGRESSION


def sigmoid_map_cnn() -> onnx.ModelProto:
    """A text-detector-like head: conv features -> 1x1 conv -> Sigmoid, a (N, 1, 8, 8) map."""
    b = GraphBuilder((1, 1, 8, 8), seed=0)
    x = b.act(b.conv("input", 8), "Relu")
    return b.build(b.act(b.conv(x, 1, k=1), "Sigmoid"))


def test_a_sigmoid_output_is_binary_and_distilled_on_its_logits(tmp_path):
    model = sigmoid_map_cnn()
    (k,) = output_kinds(analyze_model(model))
    assert (k.kind, k.logits) == (BINARY, model.graph.node[-1].input[0])
    rng = np.random.default_rng(2)
    s, z = rng.standard_normal((3, 1, 4, 4)) * 3, rng.standard_normal((3, 1, 4, 4)) * 3
    for temp in (1.0, 2.0):
        p, q = 1 / (1 + np.exp(-z / temp)), 1 / (1 + np.exp(-s / temp))
        kl = (p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))).mean() * temp ** 2
        got, _ = Distill([k], temperature=temp)(
            None, {target_key(k.name): torch.from_numpy(1 / (1 + np.exp(-z)))},
            {k.logits: torch.from_numpy(s)})
        assert float(got) == pytest.approx(kl, rel=1e-5)
    # where the student's sigmoid saturates at 0 and the teacher says 1, the gradient on
    # the logit stays near -1 / elements (the squared error of probabilities gives ~0)
    s_sat = torch.full((1, 1, 1, 2), -30.0, dtype=torch.float64, requires_grad=True)
    loss, _ = Distill([k])(None, {target_key(k.name): torch.ones(1, 1, 1, 2, dtype=torch.float64)},
                           {k.logits: s_sat})
    loss.backward()
    np.testing.assert_allclose(s_sat.grad.numpy(), -0.5, rtol=1e-6)
    ds = load_dataset(DataSpec(str(digits_x(tmp_path, 32)), 1, 8, 8))
    (scores,) = get_criterion("fisher").score(analyze_model(model),
                                              Evidence(ds, batch_size=16)).values()
    assert scores.shape == (8,) and np.all(scores >= 0) and scores.max() > 0


def test_distill_loss_along_the_class_axis_matches_numpy():
    rng = np.random.default_rng(1)
    s, t = rng.standard_normal((3, 4, 6)), rng.standard_normal((3, 4, 6)) * 2
    lt, ls = log_softmax(t, 2), log_softmax(s, 2)
    kl = (np.exp(lt) * (lt - ls)).sum(2).mean()  # mean over images and positions
    kinds = [OutputKind("a", CLASS, "a_logits", "probs", axis=2)]
    got, _ = Distill(kinds)(None, {target_key("a"): torch.from_numpy(np.exp(lt))},
                            {"a_logits": torch.from_numpy(s)})
    assert float(got) == pytest.approx(kl, rel=1e-6)


def test_fidelity_of_a_sequence_output_matches_numpy(tmp_path):
    model, other = sequence_cnn(), sequence_cnn()
    w = other.graph.initializer[0]
    w.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(w) * 1.5, w.name))
    ds = load_dataset(DataSpec(str(digits_x(tmp_path, 40)), 1, 8, 8))
    teacher = Teacher(model, output_kinds(analyze_model(model)))
    (row,) = fidelity(teacher, other, (x for x, _ in iter_batches(ds, 16))).values()
    (a,), (b,) = run_model(model, {"input": ds.x[:]}), run_model(other, {"input": ds.x[:]})
    agree = np.mean(a.argmax(2) == b.argmax(2))  # over images and positions
    assert 0 < agree < 1
    assert row["top1_agreement"] == pytest.approx(agree)
    assert row["relative_error"] == pytest.approx(
        np.linalg.norm(b.astype(np.float64) - a) / np.linalg.norm(a.astype(np.float64)), rel=1e-5)
    (scores,) = get_criterion("fisher").score(analyze_model(model),
                                              Evidence(ds, batch_size=16)).values()
    assert scores.shape == (8,) and np.all(scores >= 0) and scores.max() > 0


def test_generated_unlabelled_images_fit_and_are_read_without_labels(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "nolabel_images.py"
    spec = importlib.util.spec_from_file_location("nolabel_images", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for kind in tool.KINDS:
        folder = tool.make_images(kind, 3, 48, 64, tmp_path / kind, seed=0)
        files = sorted(folder.glob("*.png"))
        assert len(files) == 3 and not list(folder.glob("*/"))
        pixels = np.stack([np.asarray(Image.open(f)) for f in files])
        assert pixels.shape == (3, 48, 64, 3) and pixels.std() > 5  # not flat
        ds = load_dataset(DataSpec(str(folder), 3, 48, 64, resize=False))
        assert ds.y is None and len(ds) == 3
        np.testing.assert_allclose(ds.x[:][0], pixels[0].transpose(2, 0, 1) / 255, atol=1e-6)


def bn_cnn() -> onnx.ModelProto:
    b = GraphBuilder((1, 1, 8, 8), seed=0)
    x = b.act(b.bn(b.conv("input", 8)), "Relu")
    return b.build(b.gemm(b.flatten(b.gap(x)), 10))


def _bn_stats(model):
    node = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    init = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    return init[node.input[3]], init[node.input[4]], init[model.graph.node[0].input[1]]


@pytest.mark.parametrize("labels, batchnorm, frozen", [
    (False, "auto", True), (True, "auto", False), (False, "train", False),
    (True, "frozen", True)])
def test_batchnorm_statistics_when_fine_tuning(tmp_path, labels, batchnorm, frozen):
    model = bn_cnn()
    mean0, var0, w0 = _bn_stats(model)
    ds = load_dataset(DataSpec(str(digits_x(tmp_path, 64, labels)), 1, 8, 8))
    teacher = Teacher(model, output_kinds(analyze_model(model)))
    opts = TrainOptions(epochs=1, lr=0.05, batch_size=16, batchnorm=batchnorm)
    mean1, var1, w1 = _bn_stats(train_model(model, ds, opts, teacher=teacher))
    assert not np.allclose(w1, w0)  # the weights trained either way
    assert np.array_equal(mean1, mean0) == frozen and np.array_equal(var1, var0) == frozen


def test_frozen_batchnorm_trains_on_the_running_statistics():
    from gpp_onnx.torch_backend import OnnxModule

    module = OnnxModule(bn_cnn())
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32))
    name = module.output_names[0]
    with torch.no_grad():
        want = module.eval().run([x], [name])[name]
        module.train().freeze_batchnorm()
        frozen = module.run([x], [name])[name]
        again = module.eval().run([x], [name])[name]  # the running statistics stayed
        batch_stats = module.train().run([x], [name])[name]
    torch.testing.assert_close(frozen, want)
    torch.testing.assert_close(again, want)
    assert not torch.allclose(batch_stats, want, atol=1e-4)


def test_unknown_batchnorm_mode_is_refused(tmp_path):
    with pytest.raises(Exception, match="--batchnorm"):
        PruneConfig(train=TrainOptions(batchnorm="fast")).checked()


@pytest.mark.parametrize("repair", ["bias", "lsq"])
def test_a_model_with_a_fixed_batch_of_one_is_repaired_and_distilled(tmp_path, repair):
    b = GraphBuilder((1, 1, 8, 8), seed=0, dynamic_batch=False)
    x = b.act(b.conv(b.act(b.conv("input", 8), "Relu"), 8), "Relu")
    model = b.build(b.gemm(b.flatten(b.gap(x)), 10))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    cfg = PruneConfig(ratio=0.5, round_to=1, latency=False, repair=repair,
                      data=DataOptions(str(digits_x(tmp_path, 120)), batch_size=16),
                      train=TrainOptions(epochs=0.5, batch_size=16))
    prune(src, tmp_path / "o.onnx", cfg)
    fid = json.loads((tmp_path / "o.report.json").read_text())["fidelity"]
    first = next(iter(fid["after_repair"]))
    assert fid["after_repair"][first]["relative_error"] < fid["after_cut"][first]["relative_error"]


def _baked_batch_net(seed):
    b = GraphBuilder((1, 1, 8, 8), seed=seed, dynamic_batch=False)
    x = b.act(b.conv("input", 8), "Relu")  # (1, 8, 8, 8) -> Reshape to (1, 512): batch 1 fixed
    flat = b.op("Reshape", [x, b.const(np.array([1, 512], dtype=np.int64))], (1, 512))
    return b.build(b.gemm(flat, 10))


def test_a_batch_baked_into_a_reshape_trains_in_batches_of_that_size(tmp_path, caplog):
    """It runs in batches of 1; each step sums the gradients of --batch-size of them."""
    model = _baked_batch_net(0)
    assert fixed_batch(model) == 1 and fixed_batch(digits_cnn(0)) is None
    other = _baked_batch_net(1)  # a teacher that differs: the distillation gradient is not 0
    teacher = Teacher(other, output_kinds(analyze_model(other)))
    ds = load_dataset(DataSpec(str(digits_x(tmp_path, 24)), 1, 8, 8))
    with caplog.at_level("INFO", logger="gpp_onnx"):
        trained = train_model(model, ds, TrainOptions(epochs=1, batch_size=8, lr=0.01),
                              teacher=teacher)
    assert "sums the gradients of 8 batches of 1" in caplog.text
    assert "3 steps" in caplog.text                       # 24 images, 8 per step
    assert np.abs(_weights(trained)[0] - _weights(model)[0]).max() > 1e-4


def _weights(model):
    return [onnx.numpy_helper.to_array(t) for t in model.graph.initializer]
