"""The CUDA paths of the torch backend: forward parity, training, scoring and repair.

Skipped where torch sees no CUDA GPU (CI has none); run on a GPU machine with
``python -m pytest tests/test_cuda.py``. Parity is checked in strict fp32 (TF32 off),
the precision the CPU path and onnxruntime use.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import rel_err
from gpp_onnx.analysis import analyze_model
from gpp_onnx.analysis.features import final_hidden_layer
from gpp_onnx.config import DataOptions, PruneConfig, TrainOptions
from gpp_onnx.evaluation import accuracy
from gpp_onnx.finetune import train_model
from gpp_onnx.importance import Evidence, get_criterion
from gpp_onnx.model import normalize
from gpp_onnx.plan import kept_elements, model_digest, plan_by_ratio
from gpp_onnx.repair import reconstruct
from gpp_onnx.samples import digits_cnn, sample_cnn
from gpp_onnx.torch_backend import OnnxModule, resolve_device, write_back
from gpp_onnx.verify import run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


@pytest.fixture(autouse=True)
def strict_fp32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_auto_device_is_cuda():
    assert resolve_device("auto").type == "cuda"


def test_forward_on_cuda_matches_onnxruntime():
    model = normalize(sample_cnn())
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    module = OnnxModule(model, device="cuda").eval()
    with torch.no_grad():
        got = module(torch.from_numpy(x).cuda()).cpu().numpy()
    assert rel_err([got], run(model, {"input": x})) < 1e-5


def _digits():
    from gpp_onnx.data import DataSpec, load_dataset
    return load_dataset(DataSpec("digits", 1, 8, 8))


def test_training_on_cuda_learns_and_writes_back():
    data = _digits()
    model = digits_cnn(0)
    before = accuracy(model, data)
    trained = train_model(model, data, TrainOptions(epochs=3, lr=0.05, device="cuda"), 0)
    after = accuracy(trained, data)  # onnxruntime on the written-back weights
    assert after > max(0.8, before + 0.3)
    module = OnnxModule(trained, device="cuda").eval()
    x = data.x[:16]
    with torch.no_grad():
        got = module(torch.from_numpy(x).cuda()).cpu().numpy()
    assert rel_err([got], run(trained, {"input": x})) < 1e-5
    # write_back of an unchanged module is the identity
    again = write_back(module, trained)
    assert rel_err(run(again, {"input": x}), run(trained, {"input": x})) < 1e-6


def test_mixed_precision_training_on_cuda():
    """--amp: the forward runs in float16 under autocast with loss scaling, the model
    still learns, and what is written is float32."""
    import math

    from onnx import TensorProto

    from gpp_onnx.finetune import _batches
    from gpp_onnx.train import CrossEntropy, Trainer

    data = _digits()
    model = digits_cnn(0)
    before = accuracy(model, data)
    module = OnnxModule(model, device="cuda")
    dtypes = set()
    run_values = module.run

    def recording(*args, **kwargs):
        values = run_values(*args, **kwargs)
        dtypes.update(v.dtype for v in values.values())
        return values

    module.run = recording
    steps = 3 * math.ceil(len(data) / 64)
    trainer = Trainer(module, [CrossEntropy()], TrainOptions(lr=0.05, device="cuda", amp=True),
                      steps)
    trainer.fit(_batches(data, 64, 0))
    assert trainer.scaler is not None and torch.float16 in dtypes
    trained = write_back(module, model)
    assert {t.data_type for t in trained.graph.initializer} <= {TensorProto.FLOAT,
                                                                TensorProto.INT64}
    assert accuracy(trained, data) > max(0.8, before + 0.3)


def test_gpp_scores_on_cuda_match_cpu():
    data = _digits()
    model = normalize(train_model(digits_cnn(1), data, TrainOptions(epochs=2, lr=0.05,
                                                                     device="cuda"), 1))
    analysis = analyze_model(model)
    feature = final_hidden_layer(analysis.view)
    sample = data.subset(np.arange(200))
    cpu = get_criterion("gpp").score(analysis, Evidence(sample, feature, "cpu", 32))
    gpu = get_criterion("gpp").score(analysis, Evidence(sample, feature, "cuda", 32))
    for key in cpu:
        np.testing.assert_allclose(gpu[key], cpu[key], rtol=1e-3, atol=1e-6)


def test_lsq_repair_on_cuda_matches_cpu():
    data = _digits()
    model = normalize(train_model(digits_cnn(2), data, TrainOptions(epochs=2, lr=0.05,
                                                                     device="cuda"), 2))
    analysis = analyze_model(model)
    scores = {g.key: np.random.default_rng(0).random(g.width) for g in analysis.prunable}
    kept = kept_elements(analysis, plan_by_ratio(analysis, scores, 0.5, model_digest(model)))
    images = data.x[:300]
    w_cpu, d_cpu = reconstruct(analysis, kept, {}, images, "cpu")
    w_gpu, d_gpu = reconstruct(analysis, kept, {}, images, "cuda")
    assert w_cpu and set(w_cpu) == set(w_gpu)
    for key in w_cpu:
        assert rel_err([w_gpu[key]], [w_cpu[key]]) < 1e-3
    for key in d_cpu:
        np.testing.assert_allclose(d_gpu[key], d_cpu[key], rtol=1e-3, atol=1e-4)


def test_prune_with_finetuning_on_cuda(tmp_path):
    import gpp_onnx
    from gpp_onnx import files

    data = _digits()
    src = files.save(train_model(digits_cnn(3), data, TrainOptions(epochs=10, lr=0.05,
                                                                   device="cuda"), 3),
                     tmp_path / "digits.onnx")
    config = PruneConfig(ratio=0.5, data=DataOptions("digits"), latency=False,
                         train=TrainOptions(epochs=1, device="cuda"))
    result = gpp_onnx.prune(src, tmp_path / "small.onnx", config)
    rnd = result.report["rounds"][-1]
    assert result.equivalence_error < 1e-5
    assert rnd["accuracy_after_cut"] > 0.85 and rnd["accuracy_after_finetune"] > 0.85
