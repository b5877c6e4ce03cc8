"""Tests for adapters.pytorch: both torch ONNX exporters, torchvision loading."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from adapters.pytorch import export_torch, load_torchvision, sample_input_shape

RTOL, ATOL = 1e-4, 1e-5


class TinyCNN(torch.nn.Module):
    """Two conv+BN blocks (one conv bias-free) and a linear head."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.c2, self.b2 = torch.nn.Conv2d(8, 6, 3, padding=1, bias=False), torch.nn.BatchNorm2d(6)
        self.fc = torch.nn.Linear(6, 5)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def tiny_cnn() -> TinyCNN:
    torch.manual_seed(0)
    net = TinyCNN()
    with torch.no_grad():  # non-trivial BN statistics so folding actually changes weights
        for bn in (net.b1, net.b2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
    return net.eval()


def _op_types(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def _assert_matches_torch(model, path, chw, batches=(1, 3)):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"]
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    gen = torch.Generator().manual_seed(1)
    for b in batches:
        x = torch.randn((b, *chw), generator=gen)
        with torch.no_grad():
            ref = model(x).numpy()
        (got,) = sess.run(None, {"input": x.numpy()})
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)


def _batch_dim(value_info):
    return value_info.type.tensor_type.shape.dim[0]


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_export_tiny_cnn(tmp_path, exporter):
    model = tiny_cnn()
    path = export_torch(model, tmp_path / "tiny.onnx", (1, 3, 16, 16), exporter=exporter, opset=18)
    assert path == tmp_path / "tiny.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    for vi in (proto.graph.input[0], proto.graph.output[0]):
        dim = _batch_dim(vi)
        assert dim.dim_param and not dim.HasField("dim_value"), vi
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]  # no external-data sidecar
    assert "BatchNormalization" not in _op_types(path)  # both exporters fold BN in eval mode
    _assert_matches_torch(model, path, (3, 16, 16))


def test_legacy_folds_batchnorm_into_conv(tmp_path):
    model = tiny_cnn()
    model.train()  # export_torch must switch to eval itself
    path = export_torch(model, tmp_path / "m.onnx", (1, 3, 8, 8), exporter="legacy", opset=17)
    ops = _op_types(path)
    assert ops.count("Conv") == 2 and "BatchNormalization" not in ops
    assert not model.training
    assert onnx.load(str(path)).opset_import[0].version == 17


def test_static_batch(tmp_path):
    path = export_torch(tiny_cnn(), tmp_path / "s.onnx", (2, 3, 8, 8), dynamic_batch=False)
    assert _batch_dim(onnx.load(str(path)).graph.input[0]).dim_value == 2


def test_dynamo_raises_low_opset_to_18(tmp_path):
    path = export_torch(tiny_cnn(), tmp_path / "d.onnx", (1, 3, 8, 8), exporter="dynamo", opset=17)
    versions = {o.domain: o.version for o in onnx.load(str(path)).opset_import}
    assert versions.get("", versions.get("ai.onnx")) == 18


@pytest.mark.parametrize("exporter,opset", [("legacy", 10), ("dynamo", 10), ("legacy", 21),
                                            ("legacy", 999), ("dynamo", 999), ("legacy", "17")])
def test_bad_opset_raises(tmp_path, exporter, opset):
    with pytest.raises(ValueError, match="opset"):
        export_torch(tiny_cnn(), tmp_path / "x.onnx", (1, 3, 8, 8), exporter=exporter, opset=opset)
    assert not (tmp_path / "x.onnx").exists()


def test_bad_exporter_raises(tmp_path):
    with pytest.raises(ValueError, match="exporter"):
        export_torch(tiny_cnn(), tmp_path / "x.onnx", exporter="tf2onnx")


def test_resnet18_legacy(tmp_path):
    model = load_torchvision("resnet18", num_classes=10)
    path = export_torch(model, tmp_path / "r18.onnx", (1, 3, 64, 64), exporter="legacy")
    assert "BatchNormalization" not in _op_types(path)
    _assert_matches_torch(model, path, (3, 64, 64))


def test_load_torchvision_refuses_weights():
    with pytest.raises(ValueError):
        load_torchvision("resnet18", weights="DEFAULT")


def test_sample_input_shape():
    assert sample_input_shape("resnet50") == (1, 3, 224, 224)
    assert sample_input_shape("vit_b_16") == (1, 3, 224, 224)
    assert sample_input_shape("inception_v3") == (1, 3, 299, 299)
    assert sample_input_shape("mobilenet_v2", batch=4) == (4, 3, 224, 224)
