"""Fast torchvision zoo tier: export, prune at ratio 0.5 and check the result.

A small subset of ``tools/zoo.py`` at 64x64 inputs (random weights, re-drawn by
``zoo.perturb`` so the logits really depend on the input). Each case asserts
that pruning succeeds, that the pruned model equals the masked original, that params
and MACs strictly shrink, and that most channel groups are prunable. About 20-30 s on
an idle 2-core CPU (the dynamo export of resnet18 is the slowest case). torchvision is
only reached through ``adapters.pytorch.load_torchvision``.
"""
import importlib.util

import pytest

pytest.importorskip("onnxruntime")
if importlib.util.find_spec("torchvision") is None:
    pytest.skip("torchvision is not installed", allow_module_level=True)

from conftest import zoo_tool  # noqa: E402

zoo = zoo_tool()

SIZE = 64
EQUIVALENCE_TOL = 1e-5

# Every case is a plain CNN, so nearly all channel groups (all but the model input and
# output) are expected prunable; shufflenet's legacy export checks that the channel
# shuffle with a dynamic batch is followed (it was not before commit b3d8822).
CASES = [
    ("resnet18", "legacy"),
    ("mobilenet_v2", "legacy"),
    ("shufflenet_v2_x0_5", "legacy"),
    ("squeezenet1_1", "legacy"),
    ("googlenet", "legacy"),
    ("resnet18", "dynamo"),
]


@pytest.mark.parametrize("name,exporter", CASES)
def test_zoo_model_prunes(tmp_path, name, exporter):
    row = zoo.run_one(name, exporter, 0.5, SIZE, tmp_path, latency=False)
    assert row["status"] == "ok", "\n".join(row.get("traceback", [row["status"]]))
    assert row["output_spread"] > 1e-3  # the equivalence check below is not vacuous
    assert row["equivalence_error"] < EQUIVALENCE_TOL
    params_before, params_after = row["params"]
    macs_before, macs_after = row["macs"]
    assert params_after < params_before
    assert macs_after < macs_before
    assert row["prunable"] >= row["groups"] / 2, row["blocked_reasons"]


def test_input_shape_respects_model_limits():
    assert zoo.input_shape("resnet18", 64) == (1, 3, 64, 64)
    assert zoo.input_shape("inception_v3", 64) == (1, 3, 75, 75)
    assert zoo.input_shape("vit_b_16", 64) == (1, 3, 224, 224)
    assert zoo.input_shape("inception_v3", None) == (1, 3, 299, 299)


def test_perturb_makes_zero_initialised_outputs_depend_on_the_input():
    import torch

    class ZeroHead(torch.nn.Module):  # like ViT's zero-initialised classifier head
        def __init__(self):
            super().__init__()
            self.conv, self.head = torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4, 2)
            torch.nn.init.zeros_(self.head.weight)
            torch.nn.init.zeros_(self.head.bias)

        def forward(self, x):
            return self.head(self.conv(x).mean((2, 3)))

    model = ZeroHead().eval()
    assert zoo.output_spread(model, (1, 3, 8, 8)) == 0
    assert zoo.output_spread(zoo.perturb(model, (1, 3, 8, 8)), (1, 3, 8, 8)) > 1e-3


def test_table_lists_failures():
    rows = [{"model": "m", "exporter": "legacy", "input_shape": [1, 3, 8, 8],
             "status": "export failed: boom", "seconds": 1.0}]
    text = zoo.table(rows)
    assert "export failed: boom" in text and text.count("\n") == 2


def test_cli_hides_onnxruntime_optimizer_warnings(tmp_path, capfd):
    """shufflenet's normalised legacy export makes onnxruntime's optimizer warn once per
    Unsqueeze it cannot remove (through its process-wide logger); the CLI must not print
    that noise."""
    import onnx
    import onnxruntime as ort

    from adapters.pytorch import export_torch, load_torchvision
    from gpp_onnx.cli import main
    from gpp_onnx.model import normalize

    path = export_torch(load_torchvision("shufflenet_v2_x0_5"), tmp_path / "s.onnx",
                        (1, 3, SIZE, SIZE), exporter="legacy")
    ort.set_default_logger_severity(2)
    capfd.readouterr()
    ort.InferenceSession(normalize(onnx.load(str(path))).SerializeToString(),
                         providers=["CPUExecutionProvider"])
    assert "[W:onnxruntime" in capfd.readouterr().err  # the model does trigger warnings
    assert main(["prune", str(path), "--ratio", "0.5", "--no-latency",
                 "-o", str(tmp_path / "small.onnx")]) == 0
    assert "[W:onnxruntime" not in capfd.readouterr().err
