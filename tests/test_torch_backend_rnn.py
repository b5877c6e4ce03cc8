"""Torch backend on recurrent layers: parity with onnxruntime (and torch.nn.LSTM), training."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from conftest import rel_err, run_model
from gpp_onnx.errors import UnsupportedModelError
from gpp_onnx.samples import GraphBuilder
from gpp_onnx.torch_backend import OnnxModule, write_back

SEQ, BATCH, FEATURES, HIDDEN = 5, 2, 7, 6


def _model(op, direction, layout=0, states=False, lens=False, **attrs) -> onnx.ModelProto:
    """X (SEQ, BATCH, FEATURES) -> one recurrent node; every output is a graph output."""
    b = GraphBuilder((SEQ, BATCH, FEATURES), seed=1, dynamic_batch=False)
    x = "input"
    if layout:
        x = b.op("Transpose", [x], (BATCH, SEQ, FEATURES), perm=[1, 0, 2])
    d = 2 if direction == "bidirectional" else 1
    shape = (BATCH, d, HIDDEN) if layout else (d, BATCH, HIDDEN)
    initial = [b.weight(*shape, scale=0.5) for _ in range(2 if op == "LSTM" else 1)] if states else None
    seq_lens = b.const(np.array([SEQ, 2], dtype=np.int32)) if lens else None
    outs = b.recurrent(x, op, HIDDEN, direction, layout, initial, seq_lens,
                       peepholes=attrs.pop("peepholes", False), **attrs)
    model = b.build(outs[0])
    model.graph.output.extend(helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
                              for o in outs[1:])
    return model


def _torch(model, x):
    with torch.no_grad():
        out = OnnxModule(model).eval()(torch.from_numpy(x))
    return [v.numpy() for v in out]


X = np.random.default_rng(0).standard_normal((SEQ, BATCH, FEATURES)).astype(np.float32)
CASES = [dict(), dict(states=True), dict(lens=True), dict(states=True, lens=True)]


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("op,extra", [("LSTM", {}), ("LSTM", {"peepholes": True}), ("GRU", {}),
                                      ("GRU", {"linear_before_reset": 1}), ("RNN", {})])
@pytest.mark.parametrize("case", CASES, ids=["plain", "states", "lens", "states+lens"])
def test_parity_with_onnxruntime(op, extra, direction, case):
    model = _model(op, direction, **case, **extra)
    assert rel_err(_torch(model, X), run_model(model, {"input": X})) < 1e-5


@pytest.mark.skipif(tuple(int(p) for p in onnx.__version__.split(".")[:2]) < (1, 23),
                    reason="the reference evaluator's RNNs run two directions from onnx 1.23 "
                           "(before: NotImplementedError; onnx 1.16 also misreads layout = 1)")
@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_batch_first_layout_matches_onnx_reference(op):
    """onnxruntime refuses layout = 1; the ONNX reference evaluator runs it (it ignores
    sequence_lens, hence none here)."""
    from onnx.reference import ReferenceEvaluator

    model = _model(op, "bidirectional", layout=1, states=True)
    assert rel_err(_torch(model, X), ReferenceEvaluator(model).run(None, {"input": X})) < 1e-5


@pytest.mark.parametrize("attr,value", [("activations", ["Relu", "Tanh", "Tanh"]),
                                        ("clip", 3.0), ("input_forget", 1)])
def test_unsupported_attributes_are_refused_with_the_node_named(attr, value):
    model = _model("LSTM", "forward", **{attr: value})
    with pytest.raises(UnsupportedModelError, match=f"lstm.*{attr.replace('_', '.')}"):
        OnnxModule(model)


def test_default_activations_spelled_out_are_accepted():
    model = _model("GRU", "bidirectional", activations=["Sigmoid", "Tanh"] * 2)
    assert rel_err(_torch(model, X), run_model(model, {"input": X})) < 1e-5


class _SeqNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.LSTM(FEATURES, HIDDEN, bidirectional=True)
        self.gru = torch.nn.GRU(2 * HIDDEN, HIDDEN)
        self.fc = torch.nn.Linear(HIDDEN, 3)

    def forward(self, x):
        return self.fc(self.gru(self.lstm(x)[0])[0])


def test_exported_lstm_gru_match_torch_then_train_and_write_back(tmp_path):
    """The module equals torch.nn.LSTM/GRU on their own export; one SGD step changes every
    recurrent weight, and the written-back model in onnxruntime equals the trained module."""
    from adapters.pytorch import export_torch

    torch.manual_seed(0)
    net = _SeqNet().eval()
    path = export_torch(net, tmp_path / "seq.onnx", (SEQ, BATCH, FEATURES), exporter="legacy",
                        dynamic_batch=False)
    model = onnx.load(str(path))
    x = torch.from_numpy(X)
    module = OnnxModule(model)
    with torch.no_grad():
        assert rel_err(module.eval()(x).numpy(), net(x).numpy()) < 1e-5
    recurrent = {n.input[i] for n in model.graph.node if n.op_type in ("LSTM", "GRU")
                 for i in (1, 2, 3)}
    params = dict(module.named_onnx_parameters())
    assert recurrent <= set(params)
    before = {name: params[name].detach().clone() for name in recurrent}
    module.train()
    (module(x) ** 2).mean().backward()
    torch.optim.SGD(module.parameters(), lr=0.1).step()
    assert all(not torch.equal(params[n].detach(), before[n]) for n in recurrent)
    written = write_back(module, model)
    with torch.no_grad():
        trained = module.eval()(x).numpy()
    assert rel_err(run_model(written, {"input": X}), [trained]) < 1e-5
