"""Recurrent layers (LSTM / GRU / RNN): pruned == masked original on generated graphs and
exported torch CRNNs, checked against a numpy hand-cut and against torch.nn.LSTM."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from conftest import assert_pruned_equals_masked, feeds_for, n_params, rel_err, run_model
from gpp_onnx import PruneConfig, prune
from gpp_onnx.analysis import analyze_model
from gpp_onnx.model import normalize
from gpp_onnx.samples import GraphBuilder
from gpp_onnx import surgery
from gpp_onnx.graph import GraphView
from gpp_onnx.plan import kept_elements, model_digest, plan_by_ratio
from gpp_onnx.stats import Estimator, count

SEQ = 8


def _i64(*values):
    return np.array(values, dtype=np.int64)


def _backbone(b, channels):
    """Conv -> MaxPool over the height -> (SEQ, N, C) sequence, as in CRNNs."""
    n = b.shapes["input"][0]
    x = b.act(b.conv("input", channels), "Relu")
    x = b.op("MaxPool", [x], (n, channels, 1, SEQ), kernel_shape=[4, 1], strides=[4, 1])
    return x, b.to_sequence(x)


def _zero_state(b, seq, d, h):
    """ConstantOfShape((d, batch, h)) with the batch read from the sequence: what the
    PyTorch exporter writes for an omitted h0."""
    n = b.shapes[seq][1]
    batch = b.op("Gather", [b.op("Shape", [seq], (3,)), b.const(_i64(1))], (1,), axis=0)
    shape = b.op("Concat", [b.const(_i64(d)), batch, b.const(_i64(h))], (3,), axis=0)
    return b.op("ConstantOfShape", [shape], (d, n, h))


def _computed_state(b, x, d, h):
    """Initial state from the image: per direction Gemm(GAP(x)) -> (1, N, h), concatenated."""
    n = b.shapes["input"][0]
    parts = [b.op("Unsqueeze", [b.gemm(b.flatten(b.gap(x)), h), b.const(_i64(0))], (1, n, h))
             for _ in range(d)]
    return parts[0] if d == 1 else b.op("Concat", parts, (d, n, h), axis=0)


def _states(b, kind, x, seq, op, d, h):
    count_ = 2 if op == "LSTM" else 1
    n = b.shapes["input"][0]
    if kind == "none":
        return None
    if kind == "zeros":
        return [_zero_state(b, seq, d, h)] * count_
    if kind == "computed":
        return [_computed_state(b, x, d, h) for _ in range(count_)]
    return [b.weight(d, n, h, scale=0.5) for _ in range(count_)]  # constant (fixed batch)


def _head(b, outs, kind, classes=5):
    n = b.shapes["input"][0]
    if kind == "sequence":  # every step: (SEQ, N, D*H) @ W -> (N, SEQ, classes)
        y = b.matmul(b.merge_directions(outs[0]), classes)
        return b.op("Transpose", [y], (n, SEQ, classes), perm=[1, 0, 2])
    if kind == "flat":      # (SEQ, N, D*H) -> (SEQ*N, D*H) -> Gemm, as crnn.pytorch does
        merged = b.merge_directions(outs[0])
        width = b.shapes[merged][2]
        flat = b.op("Reshape", [merged, b.const(_i64(-1, width))], (SEQ * n, width))
        return b.gemm(flat, classes)
    d, _, h = b.shapes[outs[1]]     # last state: Y_h (D, N, H) -> (N, D*H) -> Gemm
    t = b.op("Transpose", [outs[1]], (n, d, h), perm=[1, 0, 2])
    return b.gemm(b.op("Reshape", [t, b.const(_i64(0, -1))], (n, d * h)), classes)


OPS = ["LSTM", "GRU", "RNN"]
DIRECTIONS = ["forward", "reverse", "bidirectional"]


@st.composite
def recurrent_graphs(draw):
    op, direction = draw(st.sampled_from(OPS)), draw(st.sampled_from(DIRECTIONS))
    states = draw(st.sampled_from(["none", "zeros", "computed", "constant"]))
    lens = draw(st.booleans())
    fixed = states == "constant" or lens  # constant states / lengths fix the batch
    n = 2 if fixed else 1
    b = GraphBuilder((n, 3, 4, SEQ), seed=draw(st.integers(0, 2 ** 16)), dynamic_batch=not fixed)
    x, seq = _backbone(b, draw(st.integers(2, 8)))
    d, h = 2 if direction == "bidirectional" else 1, draw(st.integers(2, 8))
    attrs = {"linear_before_reset": draw(st.integers(0, 1))} if op == "GRU" else {}
    seq_lens = b.const(np.array([SEQ, 3], dtype=np.int32)) if lens else None
    outs = b.recurrent(seq, op, h, direction, initial=_states(b, states, x, seq, op, d, h),
                       seq_lens=seq_lens, peepholes=op == "LSTM" and draw(st.booleans()),
                       **attrs)
    if draw(st.booleans()):  # a second layer reads the first one's merged directions
        outs = b.recurrent(b.merge_directions(outs[0]), draw(st.sampled_from(OPS)),
                           draw(st.integers(2, 8)), draw(st.sampled_from(DIRECTIONS)))
    return b.build(_head(b, outs, draw(st.sampled_from(["sequence", "flat", "last"]))))


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model=recurrent_graphs(), ratio=st.sampled_from([0.25, 0.5, 0.75]),
       criterion=st.sampled_from(["l1", "random"]))
def test_random_recurrent_graphs_pruned_equals_masked(model, ratio, criterion, tmp_path_factory):
    analysis = analyze_model(normalize(model))
    rec = next(n for n in analysis.view.nodes if n.op_type in OPS)
    hidden = next(g for g in analysis.groups if rec.output[0] in g.values)
    assert hidden.prunable, hidden.reason
    result = assert_pruned_equals_masked(model, tmp_path_factory.mktemp("rnn"),
                                         expect_change=False, ratio=ratio, criterion=criterion)
    assert len(result.plan.removed[hidden.key]) == int(ratio * hidden.width + 1e-9)


# --------------------------------------------------------------- numpy hand-cut
def _bilstm_model(op="LSTM", seed=0):
    b = GraphBuilder((1, 3, 4, SEQ), seed=seed)
    x, seq = _backbone(b, 6)
    return b.build(_head(b, b.recurrent(seq, op, 5, "bidirectional"), "sequence"))


def _hand_cut(model, removed_conv, removed_hidden, op):
    """The original with removed conv channels / hidden units deleted by numpy slicing of
    the initializers, the hidden size set by hand (no gpp-onnx code involved)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = {n.op_type: n for n in model.graph.node}
    conv, rec, mm = nodes["Conv"], nodes[op], nodes["MatMul"]
    keep_c = np.setdiff1d(np.arange(inits[conv.input[1]].shape[0]), removed_conv)
    h = inits[rec.input[2]].shape[2]
    keep_h = np.setdiff1d(np.arange(h), removed_hidden)
    gates = inits[rec.input[1]].shape[1] // h
    rows = (np.arange(gates)[:, None] * h + keep_h).ravel()
    inits[conv.input[1]] = inits[conv.input[1]][keep_c]
    inits[conv.input[2]] = inits[conv.input[2]][keep_c]
    inits[rec.input[1]] = inits[rec.input[1]][:, rows][:, :, keep_c]
    inits[rec.input[2]] = inits[rec.input[2]][:, rows][:, :, keep_h]
    inits[rec.input[3]] = inits[rec.input[3]][:, np.concatenate([rows, gates * h + rows])]
    inits[mm.input[1]] = inits[mm.input[1]][np.concatenate([keep_h, h + keep_h])]
    graph = helper.make_graph(
        list(model.graph.node), "cut", list(model.graph.input),
        [helper.make_tensor_value_info(model.graph.output[0].name, TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ascontiguousarray(a), k) for k, a in inits.items()])
    cut = helper.make_model(graph, opset_imports=model.opset_import, ir_version=8)
    rec_cut = next(n for n in cut.graph.node if n.op_type == op)
    next(a for a in rec_cut.attribute if a.name == "hidden_size").i = len(keep_h)
    reshape = next(n for n in cut.graph.node if n.op_type == "Reshape")
    assert list(inits[reshape.input[1]]) == [0, 0, -1]  # nothing to change there
    return cut


@pytest.mark.parametrize("op", OPS)
def test_bidirectional_cut_matches_numpy_hand_cut(op, tmp_path):
    model = _bilstm_model(op)
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    result = prune(src, tmp_path / "p.onnx", PruneConfig(ratio=0.5, round_to=1, latency=False))
    rec = next(n for n in model.graph.node if n.op_type == op)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    removed_h, removed_c = result.plan.removed[rec.output[0]], result.plan.removed[conv.output[0]]
    assert len(removed_h) == 2 and len(removed_c) == 3
    feeds = feeds_for(model, batch=3)
    expected = run_model(_hand_cut(model, removed_c, removed_h, op), feeds)
    assert rel_err(run_model(tmp_path / "p.onnx", feeds), expected) < 1e-5


@pytest.mark.parametrize("op,gates", [("LSTM", 4), ("GRU", 3), ("RNN", 1)])
def test_macs_and_estimate_of_a_recurrent_layer(op, gates):
    """Hand-counted MACs; the plan estimate equals the count of the cut model."""
    model = normalize(_bilstm_model(op))
    analysis = analyze_model(model)
    conv = 6 * 4 * SEQ * 3 * 9
    rec = SEQ * 2 * gates * 5 * (6 + 5)   # seq * D * G*H * (I + H)
    assert count(analysis.view).macs == conv + rec + SEQ * 10 * 5
    rng = np.random.default_rng(0)
    scores = {g.key: rng.random(g.width) for g in analysis.prunable}
    kept = kept_elements(analysis, plan_by_ratio(analysis, scores, 0.5, model_digest(model)))
    assert Estimator(analysis).estimate(kept) == count(GraphView(surgery.cut(analysis, kept)))


def test_initial_state_from_a_model_input_keeps_the_units():
    b = GraphBuilder((1, 3, 4, SEQ), seed=0, dynamic_batch=False)
    _, seq = _backbone(b, 4)
    h0 = b.weight(1, 1, 6)
    y = b.recurrent(seq, "GRU", 6, "forward", initial=[h0])[0]
    model = b.build(_head(b, [y, None], "sequence"))
    init = next(t for t in model.graph.initializer if t.name == h0)
    model.graph.initializer.remove(init)  # the initial state becomes a model input
    model.graph.input.append(helper.make_tensor_value_info(h0, TensorProto.FLOAT, [1, 1, 6]))
    analysis = analyze_model(normalize(model))
    hidden = next(g for g in analysis.groups if g.key == y)
    assert not hidden.prunable and f"initial state '{h0}' is a model input" in hidden.reason
    assert any(g.prunable for g in analysis.groups)  # the conv channels still go


# --------------------------------------------------------------- exported torch CRNN
class CRNN(torch.nn.Module):
    """Conv backbone -> squeeze/permute -> bidirectional LSTM -> Linear over characters;
    ``view``: the Linear reads ``y.view(T * b, 2H)`` as in crnn.pytorch."""

    def __init__(self, c1=16, c2=24, hidden=32, layers=1, view=False, classes=100):
        super().__init__()
        self.conv1, self.conv2 = torch.nn.Conv2d(1, c1, 3, padding=1), torch.nn.Conv2d(c1, c2, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(c2)
        self.rnn = torch.nn.LSTM(c2, hidden, num_layers=layers, bidirectional=True)
        self.fc = torch.nn.Linear(2 * hidden, classes)
        self.view = view

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv1(x)), (2, 1))
        x = torch.max_pool2d(torch.relu(self.bn(self.conv2(x))), (4, 1))
        y, _ = self.rnn(x.squeeze(2).permute(2, 0, 1))
        if not self.view:
            return self.fc(y)
        t, b, h = y.shape
        return self.fc(y.view(t * b, h)).view(t, b, -1)


def _crnn(layers, view) -> CRNN:
    torch.manual_seed(0)
    net = CRNN(layers=layers, view=view)
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _torch_cut(net: CRNN, removed: list[tuple]) -> CRNN:
    """net with removed conv channels and LSTM units (`removed` per group, in graph order:
    conv1, conv2, then each LSTM layer) sliced out of its torch weights: an outside
    reference for the pruned ONNX model."""
    k1, k2, *kh = (np.setdiff1d(np.arange(w), r) for w, r in
                   zip([16, 24] + [32] * net.rnn.num_layers, removed))
    small = CRNN(len(k1), len(k2), len(kh[0]), net.rnn.num_layers, net.view).eval()
    with torch.no_grad():
        small.conv1.weight.copy_(net.conv1.weight[k1]), small.conv1.bias.copy_(net.conv1.bias[k1])
        small.conv2.weight.copy_(net.conv2.weight[k2][:, k1]), small.conv2.bias.copy_(net.conv2.bias[k2])
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(small.bn, name).copy_(getattr(net.bn, name)[k2])
        inputs = k2
        for layer, keep in enumerate(kh):
            rows = np.concatenate([g * 32 + keep for g in range(4)])
            for sfx in (f"_l{layer}", f"_l{layer}_reverse"):
                get = lambda n: getattr(net.rnn, n + sfx)  # noqa: E731
                getattr(small.rnn, "weight_ih" + sfx).copy_(get("weight_ih")[rows][:, inputs])
                getattr(small.rnn, "weight_hh" + sfx).copy_(get("weight_hh")[rows][:, keep])
                getattr(small.rnn, "bias_ih" + sfx).copy_(get("bias_ih")[rows])
                getattr(small.rnn, "bias_hh" + sfx).copy_(get("bias_hh")[rows])
            inputs = np.concatenate([keep, 32 + keep])  # both directions' units
        small.fc.weight.copy_(net.fc.weight[:, inputs])
        small.fc.bias.copy_(net.fc.bias)
    return small


@pytest.mark.parametrize("exporter,layers,view", [("legacy", 1, False), ("dynamo", 1, False),
                                                  ("legacy", 2, True), ("dynamo", 2, True)])
def test_exported_crnn_prunes_to_under_0_8x_params(exporter, layers, view, tmp_path):
    from adapters.pytorch import export_torch

    net = _crnn(layers, view)
    src = export_torch(net, tmp_path / "crnn.onnx", (1, 1, 8, 20), exporter=exporter)
    result = assert_pruned_equals_masked(onnx.load(str(src)), tmp_path, ratio=0.5)
    ratio = n_params(tmp_path / "pruned.onnx") / n_params(tmp_path / "model.onnx")
    assert ratio <= 0.8
    assert list(result.plan.widths.values()) == [16, 24] + [32] * layers
    model = onnx.load(str(src))
    batch = model.graph.input[0].type.tensor_type.shape.dim[0].dim_value or 2
    x = torch.randn(batch, 1, 8, 20)  # the dynamo export may fix batch 1 (its h0 constant)
    with torch.no_grad():
        expected = _torch_cut(net, list(result.plan.removed.values()))(x).numpy()
    got = run_model(tmp_path / "pruned.onnx", {"input": x.numpy()})
    assert rel_err(got, [expected]) < 1e-4


class WidthLSTM(torch.nn.Module):
    """Conv backbone -> the columns as a sequence of C*H features -> LSTM -> mean over the
    sequence -> Linear: a classifier with a recurrent head."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.rnn, self.fc = torch.nn.LSTM(16 * 7, 24), torch.nn.Linear(24, 10)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.c1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.c2(x)), 2)
        n, c, h, w = x.shape
        y, _ = self.rnn(x.permute(3, 0, 1, 2).reshape(w, n, c * h))
        return self.fc(y.mean(0))


def test_compare_with_data_on_a_recurrent_classifier(tmp_path, capsys):
    """compare --data reads the recurrent model's outputs (its analysis runs on the
    normalised graph, as prune's does): the relative error and top-1 agreement it prints
    are the ones computed here from both models' outputs."""
    from adapters.pytorch import export_torch

    from gpp_onnx.cli import main

    torch.manual_seed(0)
    src = export_torch(WidthLSTM().eval(), tmp_path / "m.onnx", (1, 1, 28, 28),
                       exporter="legacy")
    assert_pruned_equals_masked(onnx.load(str(src)), tmp_path, ratio=0.5)
    x = np.random.default_rng(0).integers(0, 256, (12, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "x.npz", x=x)
    assert main(["-q", "compare", str(src), str(tmp_path / "pruned.onnx"), "--data",
                 str(tmp_path / "x.npz")]) == 0
    out = capsys.readouterr().out.splitlines()
    feeds = {"input": (x[:, None] / 255).astype(np.float32)}
    t = run_model(src, feeds)[0].astype(np.float64)
    m = run_model(tmp_path / "pruned.onnx", feeds)[0].astype(np.float64)
    error = next(v for v in out if "relative error" in v).split()[-1]
    agreement = next(v for v in out if "top-1 agreement" in v).split()[-1]
    assert float(error) == pytest.approx(np.sqrt(((m - t) ** 2).sum() / (t ** 2).sum()),
                                         abs=1e-4)
    assert float(agreement) == pytest.approx((m.argmax(1) == t.argmax(1)).mean(), abs=1e-4)
