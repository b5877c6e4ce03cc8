"""Grow on torchvision architectures (random weights, 64x64, legacy export): the grown
model computes what the exported one computes, at the automatic positions and at a
position inside a block, checked in onnxruntime against the exported file."""
import importlib.util

import onnx
import pytest

pytest.importorskip("onnxruntime")
if importlib.util.find_spec("torchvision") is None:
    pytest.skip("torchvision is not installed", allow_module_level=True)

from gpp_onnx import grow
from gpp_onnx.config import TrainOptions
from gpp_onnx.grow import Widths

from conftest import feeds_for, rel_err, run_model, zoo_tool

zoo = zoo_tool()

SHAPE = (1, 3, 64, 64)
# an inner position per family: a conv block inside a residual / inverted-residual block
INNER = {"resnet18": "/layer2/layer2.0/relu/Relu_output_0",
         "vgg11": "/features/features.4/Relu_output_0",
         "mobilenet_v2": "/features/features.4/conv/conv.1/conv.1.2/Clip_output_0"}


def _torch_model(name):
    import torch
    from adapters.pytorch import load_torchvision

    model = load_torchvision(name)
    if name == "vgg11":  # torchvision's 7x7 pool + 25088-wide head needs 224 px: a small head
        model.avgpool = torch.nn.Identity()
        model.classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(512 * 4, 64),
                                               torch.nn.ReLU(), torch.nn.Dropout(),
                                               torch.nn.Linear(64, 10))
    return zoo.perturb(model.eval(), SHAPE)


@pytest.fixture(scope="module", params=["resnet18", "vgg11", "mobilenet_v2"])
def exported(request, tmp_path_factory):
    from adapters.pytorch import export_torch

    model = _torch_model(request.param)
    assert zoo.output_spread(model, SHAPE) > 1e-3  # outputs depend on the input
    path = tmp_path_factory.mktemp("grow_zoo") / f"{request.param}.onnx"
    with zoo.stdout_to_stderr():
        export_torch(model, path, SHAPE, exporter="legacy")
    return request.param, path


def _check(path, grown: onnx.ModelProto):
    base = onnx.load(str(path))
    feeds = feeds_for(base, batch=2)
    assert rel_err(run_model(grown, feeds), run_model(base, feeds)) < 1e-5


def test_auto_positions_preserve_the_function(exported, tmp_path):
    name, path = exported
    res = grow(path, tmp_path / "grown.onnx", max_modules=2, train=TrainOptions(epochs=0),
               widths=Widths(16, 8, 8))
    assert len(res.modules) == 2 and res.after.params > res.before.params
    assert res.modules[0].module.height < res.modules[1].module.height  # deepest first
    _check(path, onnx.load(str(tmp_path / "grown.onnx")))


def test_inner_position_preserves_the_function(exported):
    name, path = exported
    res = grow(path, at=(INNER[name],), max_modules=1, train=TrainOptions(epochs=0),
               widths=Widths(16, 8, 8))
    assert res.modules[0].module.at == INNER[name]
    _check(path, res.model)


def test_grown_resnet_prunes_with_pruned_equal_to_masked(exported, tmp_path):
    from conftest import assert_pruned_equals_masked

    name, path = exported
    if name != "resnet18":
        pytest.skip("one family is enough here; the digits CNN case is in test_grow.py")
    res = grow(path, max_modules=1, train=TrainOptions(epochs=0), widths=Widths(16, 8, 8))
    result = assert_pruned_equals_masked(res.model, tmp_path, ratio=0.5)
    cut = {g for g, removed in result.plan.removed.items() if len(removed)}
    assert any(g.startswith("grow1.") for g in cut)
