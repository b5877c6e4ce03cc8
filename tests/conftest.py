"""Shared test helpers: save a model, run it in onnxruntime, prune it through the API."""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import settings

# CI replays the same generated graphs every run (a landing must not hinge on a new draw);
# local runs keep exploring new ones.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

from gpp_onnx import PruneConfig, prune


def _readable_make_model(graph, **kwargs) -> onnx.ModelProto:
    """onnx.helper.make_model at the oldest IR version the model's opsets allow (unless the
    test names one): onnx writes its newest by default, which an onnxruntime older than that
    onnx cannot open (onnx 1.23 writes IR 14, onnxruntime 1.30 reads up to 13)."""
    model = _make_model(graph, **kwargs)
    if "ir_version" not in kwargs:
        model.ir_version = onnx.helper.find_min_ir_version_for(list(model.opset_import),
                                                               ignore_unknown=True)
    return model


_make_model, onnx.helper.make_model = onnx.helper.make_model, _readable_make_model


def child_env(**extra) -> dict:
    """The environment of a `python -m gpp_onnx` child process: this repository first on
    its PYTHONPATH, the caller's entries kept (packages installed beside the suite by path)."""
    root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)


def run_model(model_or_path, feeds: dict) -> list[np.ndarray]:
    """The model's outputs in onnxruntime without graph optimisations: what the ONNX graph
    computes. (onnxruntime before 1.32 fuses Pad(0) -> MaxPool into a MaxPool padded with
    -inf, another function: an original and its pruned copy compared with the optimiser on
    differed by 1e-2 where one of them kept that pattern.)"""
    data = (model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto)
            else str(model_or_path))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def feeds_for(model: onnx.ModelProto, batch: int = 2, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {}
    init = {t.name for t in model.graph.initializer}
    for v in model.graph.input:
        if v.name in init:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else batch
                for d in v.type.tensor_type.shape.dim]
        feeds[v.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def rel_err(a, b) -> float:
    return max(float(np.linalg.norm(np.asarray(x, np.float64) - np.asarray(y, np.float64)))
               / max(float(np.linalg.norm(np.asarray(y, np.float64))), 1e-30)
               for x, y in zip(a, b))


def n_params(path) -> int:
    """Float weights held in initializers or Constant nodes (a sparse initializer counts
    the elements of the dense tensor it stands for)."""
    model = onnx.load(str(path))
    tensors = list(model.graph.initializer) + [
        a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute
        if a.name == "value"]
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    return (sum(int(np.prod(t.dims)) for t in tensors if t.data_type in floats)
            + sum(int(np.prod(s.dims)) for s in model.graph.sparse_initializer
                  if s.values.data_type in floats))


def prune_both(model: onnx.ModelProto, tmp_path: Path, **config):
    """Prune `model`, then replay the same plan with --mask-only; return both paths."""
    src = tmp_path / "model.onnx"
    onnx.save(model, src)
    cfg = PruneConfig(**{"latency": False, "round_to": 1, **config})  # exact widths
    result = prune(src, tmp_path / "pruned.onnx", cfg, plan_out=tmp_path / "plan.json")
    prune(src, tmp_path / "masked.onnx", PruneConfig(latency=False, mask_only=True),
          plan_path=tmp_path / "plan.json")
    return src, tmp_path / "pruned.onnx", tmp_path / "masked.onnx", result


def _shares_weights(model: onnx.ModelProto) -> bool:
    weights = {t.name for t in model.graph.initializer if len(t.dims) > 1}
    reads = [name for n in model.graph.node for name in set(n.input) if name in weights]
    return len(reads) != len(set(reads))


def assert_pruned_equals_masked(model: onnx.ModelProto, tmp_path: Path, expect_change=True,
                                **config):
    """The central invariant, checked here independently of the tool's own verification."""
    src, pruned, masked, result = prune_both(model, tmp_path, **config)
    feeds = feeds_for(model, batch=3)
    out_pruned, out_masked = run_model(pruned, feeds), run_model(masked, feeds)
    assert rel_err(out_pruned, out_masked) < 1e-5
    if result.plan.removed_channels and not _shares_weights(model):
        # (a weight read by two nodes gets a copy per node whose cut differs: more params)
        assert n_params(pruned) < n_params(src)
        if expect_change:  # masking really removed something (random graphs may cut dead units)
            assert rel_err(run_model(src, feeds), out_masked) > 1e-6
    return result


def assert_repaired_pruned_equals_masked(model: onnx.ModelProto, ratio: float, seed: int):
    """The invariant with the least-squares repair's new weights and biases on both sides:
    a random cut of the normalised `model`, the bias fold and the refit on 24 images (in
    batches of the size its input fixes), pruned == masked; where float32 rounding amplified
    by a refit (sums in another order) exceeds 1e-5, float64 decides, as in the tool."""
    from hypothesis import assume

    from gpp_onnx import repair, surgery
    from gpp_onnx.analysis import analyze_model
    from gpp_onnx.exact import FLOAT64_TOLERANCE, float64_outputs
    from gpp_onnx.model import normalize
    from gpp_onnx.plan import kept_elements, model_digest, plan_by_ratio

    model = normalize(model)
    analysis = analyze_model(model)
    assume(analysis.prunable)
    rng = np.random.default_rng(seed)
    scores = {g.key: rng.random(g.width) for g in analysis.prunable}
    kept = kept_elements(analysis, plan_by_ratio(analysis, scores, ratio, model_digest(model)))
    assume(kept)
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    size = dims[0] if dims[0] > 0 else 64
    images = rng.standard_normal((24, *dims[1:])).astype(np.float32)
    batches = [images[i:i + size] for i in range(0, len(images), size)]
    means = repair.channel_means(model, repair.values_to_measure(analysis, kept), batches)
    deltas = repair.bias_deltas(analysis, kept, means)
    weights, deltas = repair.reconstruct(analysis, kept, deltas, images, "cpu",
                                         batch_size=size, seed=seed)
    feeds = feeds_for(model, batch=3)
    pruned = surgery.cut(analysis, kept, deltas, weights)
    masked = surgery.mask(analysis, kept, deltas, weights)
    if rel_err(run_model(pruned, feeds), run_model(masked, feeds)) >= 1e-5:
        assert rel_err(float64_outputs(pruned, feeds),
                       float64_outputs(masked, feeds)) < FLOAT64_TOLERANCE


@functools.lru_cache(maxsize=None)
def tool_module(name: str):
    """tools/NAME.py as a module (the zoo's exported torchvision families, the plots)."""
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"gpp_tool_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def zoo_tool():
    """tools/zoo.py as a module (the exported torchvision families the e2e tests use)."""
    return tool_module("zoo")


@pytest.fixture
def sample_model():
    from gpp_onnx.samples import sample_cnn
    return sample_cnn()


@pytest.fixture(autouse=True)
def _private_home(tmp_path_factory, monkeypatch):
    """Caches under ~ (the latency profiles) go to a folder of this test run, never the
    user's: no test reads what another run measured."""
    monkeypatch.setenv("HOME", str(tmp_path_factory.getbasetemp() / "home"))


@pytest.fixture(autouse=True)
def _cpu_paths(request, monkeypatch):
    """The suite checks the CPU paths, bit for bit where it compares two runs; on a machine
    with a GPU, device 'auto' would train on CUDA, whose kernels are not bitwise
    reproducible (a resumed run differs from an uninterrupted one by rounding). The CUDA
    paths have their own tests (test_cuda.py), which keep the GPU."""
    if request.module.__name__ != "test_cuda":
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")   # and the processes tests start


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """The digits CNN trained a few epochs (about 0.9 held-out): the gpp schedule tests'
    starting model, trained once per session."""
    from gpp_onnx.config import DataOptions, TrainOptions
    from gpp_onnx.finetune import train_model
    from gpp_onnx.graph import GraphView
    from gpp_onnx.splits import load_data
    from gpp_onnx.samples import digits_cnn

    model = digits_cnn(0)
    splits = load_data(GraphView(model), PruneConfig(data=DataOptions("digits"), seed=0))
    path = tmp_path_factory.mktemp("gpp") / "digits.onnx"
    onnx.save(train_model(model, splits.train, TrainOptions(epochs=6, lr=0.05), 0), path)
    return path
