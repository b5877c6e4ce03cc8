"""The one trainer and the push loss, against numpy references and a real-data effect."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from gpp_onnx.analysis.features import final_hidden_layer
from gpp_onnx.config import TrainOptions
from gpp_onnx.data import DataSpec, load_dataset
from gpp_onnx.finetune import _batches
from gpp_onnx.graph import GraphView
from gpp_onnx.samples import digits_cnn
from gpp_onnx.torch_backend import OnnxModule
from gpp_onnx.train import CrossEntropy, PushLoss, Trainer
from gpp_onnx.train.losses import offdiag_energy


def test_push_loss_fisher_ratios_match_numpy_on_the_first_batch():
    rng = np.random.default_rng(0)
    h = rng.standard_normal((60, 5)) + np.repeat(rng.standard_normal((3, 5)) * 2, 20, axis=0)
    y = np.repeat(np.arange(3), 20)
    loss = PushLoss("h", 3, sep=1.0, cov=0.0, align=0.0, eps=0.0)
    _, logs = loss(None, {"y": torch.from_numpy(y)}, {"h": torch.from_numpy(h)})
    means = np.stack([h[y == c].mean(0) for c in range(3)])
    s_w = ((h - means[y]) ** 2).mean(0)
    s_b = ((means - h.mean(0)) ** 2).mean(0)           # equal priors: 20 images per class
    assert logs["fisher"] == pytest.approx(float((s_b / s_w).mean()), rel=1e-9)
    assert logs["sep"] == pytest.approx(float(-(s_b / s_w / (1 + s_b / s_w)).mean()), rel=1e-9)


def test_offdiagonal_energy_matches_numpy():
    z = np.random.default_rng(1).standard_normal((50, 4))
    z[:, 1] += 0.8 * z[:, 0]
    cov = z.T @ z
    expected = (cov[~np.eye(4, dtype=bool)] ** 2).sum() / (cov ** 2).sum()
    assert float(offdiag_energy(torch.from_numpy(cov))) == pytest.approx(expected, rel=1e-9)
    assert float(offdiag_energy(torch.eye(3))) == 0.0


def _offdiag_energy(model, data, feature) -> float:
    """||offdiag(S_w)||_F^2 / ||S_w||_F^2 of the features, computed in numpy."""
    module = OnnxModule(model).eval()
    with torch.no_grad():
        h = module.run([torch.from_numpy(data.x[:])], [feature])[feature].numpy()
    h = h.reshape(h.shape[0], h.shape[1], -1).mean(2) if h.ndim > 2 else h
    z = h - np.stack([h[data.y == c].mean(0) for c in range(10)])[data.y]
    s_w = z.T @ z
    return float(((s_w - np.diag(np.diag(s_w))) ** 2).sum() / (s_w ** 2).sum())


def _train(losses, steps=300):
    data = load_dataset(DataSpec("digits", 1, 8, 8))
    model = digits_cnn(0)
    torch.manual_seed(0)
    module = OnnxModule(model)
    options = TrainOptions(lr=0.05, device="cpu")
    Trainer(module, losses, options, steps).fit(_batches(data, 64, 0))
    from gpp_onnx.torch_backend import write_back
    return write_back(module, model), data


def test_push_makes_the_within_class_scatter_more_diagonal():
    feature = final_hidden_layer(GraphView(digits_cnn(0)))
    plain, data = _train([CrossEntropy()])
    pushed, _ = _train([CrossEntropy(), PushLoss(feature, 10)])
    # 300 steps: 0.79 -> 0.42 on one thread, lower on two (summation order changes the run)
    assert _offdiag_energy(pushed, data, feature) < 0.7 * _offdiag_energy(plain, data, feature)


def test_a_resumed_trainer_continues_exactly():
    data = load_dataset(DataSpec("digits", 1, 8, 8))
    feature = final_hidden_layer(GraphView(digits_cnn(0)))
    options = TrainOptions(lr=0.05, device="cpu")

    def fresh():
        torch.manual_seed(0)
        module = OnnxModule(digits_cnn(0))
        return module, Trainer(module, [CrossEntropy(), PushLoss(feature, 10)], options, 6)

    whole, t = fresh()
    t.fit(_batches(data, 32, 0))
    first, t1 = fresh()
    batches = _batches(data, 32, 0)
    t1.fit(batches, steps=3)
    state, weights = t1.state_dict(), {k: v.clone() for k, v in first.state_dict().items()}
    second, t2 = fresh()
    second.load_state_dict(weights)
    t2.load_state_dict(state)
    t2.fit(batches)
    for k, v in whole.state_dict().items():
        torch.testing.assert_close(second.state_dict()[k], v)


def test_mixed_precision_is_ignored_on_the_cpu():
    """--amp is for CUDA: on the CPU the trainer steps exactly as without it."""
    data = load_dataset(DataSpec("digits", 1, 8, 8))
    weights = []
    for amp in (False, True):
        torch.manual_seed(0)
        module = OnnxModule(digits_cnn(0))
        trainer = Trainer(module, [CrossEntropy()], TrainOptions(lr=0.05, device="cpu",
                                                                 amp=amp), 4)
        trainer.fit(_batches(data, 32, 0))
        assert trainer.scaler is None
        weights.append(module.state_dict())
    for k, v in weights[0].items():
        assert torch.equal(weights[1][k], v)
    assert any(not torch.equal(v, OnnxModule(digits_cnn(0)).state_dict()[k])
               for k, v in weights[0].items())     # it did train


@pytest.mark.parametrize("command", ["prune", "gpp", "push", "grow"])
def test_every_training_command_takes_amp(command):
    from gpp_onnx import cli
    from gpp_onnx.cli_args import build_parser

    def train_options(*flags):
        args = build_parser().parse_args([command, "m.onnx", "-o", "o.onnx", *flags])
        if command == "push":
            return args
        return (cli._grow_config(args) if command == "grow" else cli._prune_config(args)).train

    assert train_options("--amp").amp and not train_options().amp


def _trained_alike(plain, probs) -> list:
    """Both models after the same 4 cross-entropy steps on the digits, which must leave
    them with the same weights; the two state dicts."""
    data = load_dataset(DataSpec("digits", 1, 8, 8))
    weights = []
    for model in (plain, probs):
        torch.manual_seed(0)
        module = OnnxModule(model)
        Trainer(module, [CrossEntropy()], TrainOptions(lr=0.05, device="cpu"), 4).fit(
            _batches(data, 32, 0))
        weights.append(module.state_dict())
    for k, v in weights[0].items():
        torch.testing.assert_close(weights[1][k], v)
    return weights


@pytest.mark.parametrize("opset", [11, 13])
def test_a_model_ending_in_softmax_trains_on_its_logits(opset):
    """Cross-entropy reads the Softmax's input: the same steps as the model without it."""
    from onnx import helper

    plain = digits_cnn(0)
    probs = onnx.ModelProto()
    probs.CopyFrom(plain)
    out = probs.graph.output[0].name
    probs.graph.node[-1].output[0] = "z"
    probs.graph.node.append(helper.make_node("Softmax", ["z"], [out], **(
        {} if opset >= 13 else {"axis": 1})))
    del probs.opset_import[:]
    probs.opset_import.append(helper.make_opsetid("", opset))
    weights = _trained_alike(plain, probs)
    assert any(not torch.equal(v, OnnxModule(plain).state_dict()[k])
               for k, v in weights[0].items())


@pytest.mark.parametrize("tail", [("Softmax", "Identity"), ("Sigmoid",), ("Sigmoid", "Identity")])
def test_a_model_ending_in_probabilities_behind_an_identity_or_a_sigmoid_trains_on_its_logits(
        tail):
    """Cross-entropy reads the logits in front of a Sigmoid, and of a Softmax that an
    Identity (tf2onnx's output) follows: the same steps as the model without them (it read
    the probabilities: loss 1.80 against 0.75 on a Fashion-MNIST net, and a Sigmoid head's
    held-out accuracy fell 0.59 -> 0.55 in a push that raised its logits twin's to 0.69)."""
    from onnx import helper

    from gpp_onnx.train.trainer import logits_value

    plain = digits_cnn(0)
    probs = onnx.ModelProto()
    probs.CopyFrom(plain)
    out = probs.graph.output[0].name
    probs.graph.node[-1].output[0] = "z"
    names = ["z", *[f"t{i}" for i in range(len(tail) - 1)], out]
    for op, a, b in zip(tail, names, names[1:]):
        probs.graph.node.append(helper.make_node(op, [a], [b]))
    assert logits_value(OnnxModule(probs)) == "z"
    _trained_alike(plain, probs)


def test_push_command_writes_a_checked_model_and_its_report(tmp_path, capsys):
    import json

    import onnx

    from gpp_onnx.cli import main
    from gpp_onnx.push import offdiag_share

    src = tmp_path / "m.onnx"
    onnx.save(digits_cnn(0), src)
    out = tmp_path / "pushed.onnx"
    assert main(["-q", "push", str(src), "--data", "digits", "--epochs", "0.5", "--lr", "0.05",
                 "-o", str(out)]) == 0
    assert "S_w off-diagonal energy" in capsys.readouterr().out
    rep = json.loads((tmp_path / "pushed.report.json").read_text())["push"]
    pushed = onnx.load(str(out))
    onnx.checker.check_model(pushed, full_check=True)
    from gpp_onnx.data import split

    _, val = split(load_dataset(DataSpec("digits", 1, 8, 8)), 0.1, 0)   # --val-split default
    # the report's figure is the written model's, on the held-out images
    assert rep["steps"] > 0
    assert offdiag_share(pushed, val, rep["feature"]) == pytest.approx(rep["offdiag_after"],
                                                                         rel=1e-4)


@pytest.mark.parametrize("argv", [[], ["--data", "digits", "--epochs", "0"]])
def test_push_without_data_or_epochs_is_a_one_line_error(tmp_path, argv, capsys):
    import onnx

    from gpp_onnx.cli import main

    src = tmp_path / "m.onnx"
    onnx.save(digits_cnn(0), src)
    out = tmp_path / "p.onnx"
    try:
        code = main(["-q", "push", str(src), *argv, "-o", str(out)])
    except SystemExit as stop:   # --epochs 0: the parser's refusal
        code = stop.code
    assert code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not out.exists()


def test_accumulated_batches_step_as_one_batch_of_all_their_images():
    """Two steps each summing the gradients of batches of 5 and 7 images end with the
    weights of two plain steps on the 12 images together (the mean loss over all)."""
    data = load_dataset(DataSpec("digits", 1, 8, 8))
    x, y = data.x[:24].astype(np.float32), data.y[:24]
    ends = {}
    for accumulate in (1, 2):
        torch.manual_seed(0)
        module = OnnxModule(digits_cnn(0))
        trainer = Trainer(module, [CrossEntropy()], TrainOptions(lr=0.1), steps=2,
                          accumulate=accumulate)
        cuts = [(0, 12), (12, 24)] if accumulate == 1 else [(0, 5), (5, 12), (12, 17), (17, 24)]
        trainer.fit(iter([(x[a:b], y[a:b]) for a, b in cuts]), "t")
        ends[accumulate] = {k: p.detach().numpy().copy()
                            for k, p in module.named_onnx_parameters()}
    start = {k: p.detach().numpy() for k, p in OnnxModule(digits_cnn(0)).named_onnx_parameters()}
    for key, want in ends[1].items():
        assert np.abs(want - start[key]).max() > 1e-4, key
        np.testing.assert_allclose(ends[2][key], want, rtol=0, atol=1e-6, err_msg=key)


def _first_conv_weight(model) -> str:
    return next(n.input[1] for n in model.graph.node if n.op_type == "Conv")


def test_a_raw_scale_input_steps_as_the_unit_scale_model_does():
    """The digits net fed x of RMS 1 and the same function fed 100 x (its first conv's
    weight / 100): plain SGD steps on the first (RMS below the limit), the trainer's
    preconditioned steps on the second, and the two stay the same function (first weight
    x 100 equal, every other weight equal)."""
    from onnx import numpy_helper

    data = load_dataset(DataSpec("digits", 1, 8, 8))
    x, y = data.x[:32].astype(np.float64), data.y[:32]
    x = (x / np.sqrt((x[:16] ** 2).mean())).astype(np.float32)  # RMS 1 on the first batch
    unit, raw = digits_cnn(0), digits_cnn(0)
    first = _first_conv_weight(raw)
    for init in raw.graph.initializer:
        if init.name == first:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) / 100, first))
    options = TrainOptions(lr=0.05, momentum=0.9, weight_decay=0.0, clip_grad=0.0)
    ends = {}
    for name, model, scale in (("unit", unit, 1.0), ("raw", raw, 100.0)):
        module = OnnxModule(model)
        trainer = Trainer(module, [CrossEntropy()], options, steps=3)
        trainer.fit(iter([(x[i:i + 16] * scale, y[i:i + 16]) for i in (0, 16, 0)]), "t")
        ends[name] = {k: p.detach().numpy().copy() for k, p in module.named_onnx_parameters()}
    assert trainer.input_scales == {first: pytest.approx(100, rel=1e-5)}
    start = {k: p.detach().numpy() for k, p in OnnxModule(unit).named_onnx_parameters()}
    for key, want in ends["unit"].items():
        got = ends["raw"][key] * (100 if key == first else 1)
        assert np.abs(want - start[key]).max() > 1e-4, key
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5, err_msg=key)


def test_input_layers_read_the_input_through_parameter_free_ops_only():
    from gpp_onnx.samples import GraphBuilder
    from gpp_onnx.train.scale import input_layers

    b = GraphBuilder((1, 4, 8, 8), seed=0, name="raw_input")
    halves = [b.op("Slice", ["input", b.const(np.array([lo])), b.const(np.array([lo + 2])),
                             b.const(np.array([1]))], (1, 2, 8, 8)) for lo in (0, 2)]
    joined = b.concat(halves[::-1])                               # moved
    a = b.conv(joined, 8)
    shifted = b.binary("Sub", "input", b.const(np.full((1, 4, 1, 1), 0.5, np.float32)))
    c = b.conv(shifted, 8)                                         # arithmetic with a constant
    x = b.conv(b.act(b.binary("Add", a, c), "Relu"), 8)           # reads features
    model = b.build(x)
    convs = [(n.input[1], n.input[0]) for n in model.graph.node if n.op_type == "Conv"]
    assert input_layers(OnnxModule(model)) == convs[:2]


def test_only_layers_whose_measured_input_is_of_raw_scale_are_preconditioned():
    """A conv reading x - 0.5 and one reading (x - 128) / 64 in the same net fed 0..255
    values: the trainer scales the first (input RMS measured in numpy) and not the
    second (RMS about 1)."""
    from gpp_onnx.samples import GraphBuilder

    b = GraphBuilder((1, 3, 8, 8), seed=0, name="two_stems")
    raw = b.conv(b.binary("Sub", "input", b.const(np.full((1, 3, 1, 1), 0.5, np.float32))), 4)
    normalised = b.binary("Div", b.binary("Sub", "input", b.const(
        np.full((1, 3, 1, 1), 128, np.float32))), b.const(np.float32(64)))
    model = b.build(b.binary("Add", raw, b.conv(normalised, 4)))
    convs = [n.input[1] for n in model.graph.node if n.op_type == "Conv"]
    x = np.random.default_rng(0).uniform(0, 255, (6, 3, 8, 8)).astype(np.float32)
    trainer = Trainer(OnnxModule(model), [], TrainOptions(lr=0.01), steps=1)
    scales = trainer._input_scales([torch.from_numpy(x)])
    assert scales == {convs[0]: pytest.approx(np.sqrt(((x - 0.5) ** 2).mean()), rel=1e-6)}


def test_measuring_the_input_scale_leaves_batchnorm_and_the_random_state_alone():
    """The raw value a conv reads comes after a BatchNormalization in node order, so the
    measurement runs it: in training mode it would update the running statistics."""
    from gpp_onnx.samples import GraphBuilder

    b = GraphBuilder((1, 3, 8, 8), seed=0, name="bn_first")
    a = b.conv(b.bn("input"), 4)                                   # BN: not parameter-free
    c = b.conv(b.binary("Mul", "input", b.const(np.float32(1.0))), 4)
    model = b.build(b.binary("Add", a, c))
    module = OnnxModule(model).train()
    trainer = Trainer(module, [], TrainOptions(lr=0.01), steps=1)
    stats = {k: t.clone() for k, t in module.named_onnx_tensors()}
    rng = torch.random.get_rng_state()
    x = torch.from_numpy(np.random.default_rng(0).uniform(0, 255, (4, 3, 8, 8)).astype(np.float32))
    scales = trainer._input_scales([x])
    assert list(scales) == [[n.input[1] for n in model.graph.node if n.op_type == "Conv"][1]]
    assert all(torch.equal(t, stats[k]) for k, t in module.named_onnx_tensors())
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert all(node.training for node in module.nodes)


def test_the_offdiagonal_share_is_not_measured_without_two_images_of_a_class(tmp_path,
                                                                            capsys):
    """100 classes of 5 images held out 50, one a class: S_w is zero, and the share was
    reported as 0.000 (the value of discriminants on neuron axes); it is 'n/a' now."""
    from gpp_onnx.cli import main
    from gpp_onnx.push import offdiag_share

    model = digits_cnn(0)
    ds = load_dataset(DataSpec("digits", 1, 8, 8))
    one_each = ds.subset(np.array([int(np.flatnonzero(ds.y == c)[0]) for c in range(10)]))
    feature = final_hidden_layer(GraphView(model))
    assert offdiag_share(model, one_each, feature) is None
    assert offdiag_share(model, ds, feature) > 0
    d = load_dataset(DataSpec("digits", 1, 8, 8))
    x = np.concatenate([d.x[np.flatnonzero(d.y == c)[:3]] for c in range(10)])
    np.savez(tmp_path / "d.npz", x=(x * 255).round().astype(np.uint8),
             y=np.repeat(np.arange(10), 3))   # 3 a class: the 10% held out is one of 3 classes
    onnx.save(model, tmp_path / "m.onnx")
    assert main(["-q", "push", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"),
                 "--epochs", "0.1", "-o", str(tmp_path / "p.onnx")]) == 0
    line = [s for s in capsys.readouterr().out.splitlines() if s.startswith("S_w")][0]
    assert line.split()[-2:] == ["n/a", "n/a"]
