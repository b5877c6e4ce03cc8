"""BatchNorm put back on folded convs for fine-tuning (gpp_onnx.train.renorm), against
torch's own BatchNorm2d and onnxruntime."""
from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from gpp_onnx.config import TrainOptions
from gpp_onnx.train import renorm
from gpp_onnx.samples import GraphBuilder
from gpp_onnx.torch_backend import OnnxModule, write_back
from gpp_onnx.train import CrossEntropy, Trainer
from gpp_onnx.train.renorm import EPS, folded_convs


@pytest.fixture(autouse=True)
def short_runs(monkeypatch):
    """These tests train a few steps of a few images: the limits for real runs are lifted
    (test_no_renorm_on_short_runs_or_small_batches checks them)."""
    monkeypatch.setattr(renorm, "MIN_BATCH", 1)
    monkeypatch.setattr(renorm, "MIN_STEPS", 1)


def _net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))


def _export(net: nn.Module) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, torch.zeros(1, 2, 6, 6), buf, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    return onnx.load_from_string(buf.getvalue())


def _with_batchnorm(net: nn.Sequential, x: torch.Tensor) -> nn.Sequential:
    """`net` with a BatchNorm2d after each conv, set (numpy, on `x`) to the identity on the
    conv output's channel statistics: running mean m and (biased) variance v, weight
    sqrt(v + eps), bias m."""
    layers, h = [], x
    for layer in net:
        layers.append(layer)
        h = layer(h).detach()
        if isinstance(layer, nn.Conv2d):
            y = h.double().numpy()
            m, v = y.mean((0, 2, 3)), y.var((0, 2, 3))
            bn = nn.BatchNorm2d(layer.out_channels, eps=EPS, momentum=0.1)
            bn.running_mean.copy_(torch.from_numpy(m))
            bn.running_var.copy_(torch.from_numpy(v))
            bn.weight.data.copy_(torch.from_numpy(np.sqrt(v + EPS)))
            bn.bias.data.copy_(torch.from_numpy(m))
            layers.append(bn)
    return nn.Sequential(*layers)


def test_training_steps_and_the_written_model_match_torch_batchnorm():
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((16, 2, 6, 6)).astype(np.float32) for _ in range(3)]
    ys = [rng.integers(0, 3, 16) for _ in range(3)]
    net = _net()
    model = _export(net)
    # the trainer: SGD with momentum, cosine schedule over 3 steps, no decay, no clipping
    options = TrainOptions(lr=0.1, momentum=0.9, weight_decay=0.0, clip_grad=0.0, renorm=True,
                           batch_size=16)
    module = OnnxModule(model)
    trainer = Trainer(module, [CrossEntropy()], options, steps=3)
    assert len(folded_convs(module)) == 2
    trainer.fit(iter(zip(xs, ys)), "t")
    written = write_back(module, model)
    assert not hasattr(module, "renorm")   # folded back after the last step
    assert [n.op_type for n in written.graph.node] == [n.op_type for n in model.graph.node]
    # the reference: torch's BatchNorm2d after each conv, the same optimiser and schedule
    ref = _with_batchnorm(net, torch.from_numpy(xs[0]))
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 3)
    ref.train()
    for x, y in zip(xs, ys):
        opt.zero_grad()
        nn.functional.cross_entropy(ref(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        opt.step()
        schedule.step()
    ref.eval()
    probe = rng.standard_normal((16, 2, 6, 6)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(probe)).numpy()
    got = ort.InferenceSession(written.SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"x": probe})[0]
    start = ort.InferenceSession(model.SerializeToString(),
                                 providers=["CPUExecutionProvider"]).run(None, {"x": probe})[0]
    assert np.abs(want - start).max() > 1e-2          # the steps moved the function
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_without_renorm_the_steps_are_plain_sgd():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((8, 2, 6, 6)).astype(np.float32), rng.integers(0, 3, 8)
    net = _net(1)
    model = _export(net)
    module = OnnxModule(model)
    Trainer(module, [CrossEntropy()], TrainOptions(lr=0.1, momentum=0.0, weight_decay=0.0,
                                                   clip_grad=0.0), steps=1).fit(iter([(x, y)]))
    nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y)).backward()
    with torch.no_grad():
        for p in net.parameters():
            p -= 0.1 * p.grad
    probe = torch.from_numpy(rng.standard_normal((4, 2, 6, 6)).astype(np.float32))
    with torch.no_grad():
        torch.testing.assert_close(module.eval()(probe), net(probe), rtol=1e-5, atol=1e-6)


def test_an_interrupted_renorm_run_resumes_exactly():
    rng = np.random.default_rng(2)
    batches = [(rng.standard_normal((8, 2, 6, 6)).astype(np.float32), rng.integers(0, 3, 8))
               for _ in range(4)]
    model = _export(_net(2))
    options = TrainOptions(lr=0.1, renorm=True)

    def fresh():
        module = OnnxModule(model)
        return module, Trainer(module, [CrossEntropy()], options, steps=4)

    whole, t = fresh()
    t.fit(iter(batches))
    first, t1 = fresh()
    t1.fit(iter(batches[:2]), steps=2)
    assert hasattr(first, "renorm")              # not folded before the last step
    state, weights = t1.state_dict(), {k: v.clone() for k, v in first.state_dict().items()}
    second, t2 = fresh()
    second.load_state_dict(weights)
    t2.load_state_dict(state)
    t2.fit(iter(batches[2:]))
    assert whole.state_dict().keys() == second.state_dict().keys()
    for k, v in whole.state_dict().items():
        torch.testing.assert_close(second.state_dict()[k], v)


def test_only_unshared_folded_convs_before_features_get_a_batchnorm():
    b = GraphBuilder((2, 3, 8, 8), seed=0)
    first = b.conv("input", 4)                                  # gets one
    a = b.act(first, "Relu")
    shared = b.weight(4, 4, 3, 3)
    c1 = b.op("Conv", [a, shared, b.vector(4)], (2, 4, 8, 8), kernel_shape=[3, 3],
              pads=[1, 1, 1, 1])
    c2 = b.op("Conv", [c1, shared, b.vector(4)], (2, 4, 8, 8), kernel_shape=[3, 3],
              pads=[1, 1, 1, 1])                               # both read one weight: none
    nobias = b.conv(b.act(c2, "Relu"), 4, bias=False)          # no bias: none
    head = b.conv(b.act(nobias, "Relu"), 5, k=1)               # the logits: none
    model = b.build(b.flatten(b.gap(b.act(head, "Relu"))))     # (as squeezenet's)
    module = OnnxModule(model)
    assert [n.outputs[0] for n in folded_convs(module)] == [first]
    b2 = GraphBuilder((2, 3, 8, 8), seed=0)
    kept = b2.act(b2.bn(b2.conv("input", 4)), "Relu")          # a BatchNorm survived: none
    model2 = b2.build(b2.flatten(b2.gap(b2.conv(b2.act(b2.conv(kept, 4), "Relu"), 5, k=1))))
    assert folded_convs(OnnxModule(model2)) == []


def test_an_explicit_frozen_batchnorm_keeps_renorm_off():
    from gpp_onnx.data import DataSpec, load_dataset
    from gpp_onnx.finetune import train_model
    from gpp_onnx.samples import digits_cnn

    data = load_dataset(DataSpec("digits", 1, 8, 8)).subset(np.arange(256))

    def weights(**options):
        model = train_model(digits_cnn(0), data, TrainOptions(epochs=0.5, lr=0.05, **options))
        return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}

    plain = weights(renorm=False)
    frozen = weights(renorm=True, batchnorm="frozen")
    renormed = weights(renorm=True, batchnorm="auto")
    assert all(np.array_equal(plain[k], frozen[k]) for k in plain)
    assert not all(np.array_equal(plain[k], renormed[k]) for k in plain)


@pytest.mark.parametrize("batch, steps, attached", [(32, 50, True), (31, 50, False),
                                                     (32, 49, False)])
def test_no_renorm_on_short_runs_or_small_batches(monkeypatch, batch, steps, attached):
    monkeypatch.setattr(renorm, "MIN_BATCH", 32)
    monkeypatch.setattr(renorm, "MIN_STEPS", 50)
    module = OnnxModule(_export(_net()))
    Trainer(module, [CrossEntropy()], TrainOptions(renorm=True, batch_size=batch), steps=steps)
    assert hasattr(module, "renorm") == attached


@pytest.mark.parametrize("argv, want", [
    ([], (0.01, 0.03, True)),                      # the defaults
    (["--lr", "0.2"], (0.2, 0.2, True)),           # --lr sets both rates
    (["--no-renorm"], (0.01, None, False)),       # no rate of its own when it is off
])
def test_prune_flags_set_the_fine_tune_rates(argv, want):
    from gpp_onnx.cli import _prune_config, build_parser

    for command in ("prune", "gpp"):
        args = build_parser().parse_args([command, "m.onnx", "--ratio", "0.5", "-o", "o.onnx",
                                          *argv])
        train = _prune_config(args).checked().train
        assert (train.lr, train.renorm_lr, train.renorm) == want


def test_the_rate_while_renorm_is_on_is_renorm_lr():
    model = _export(_net())
    on = Trainer(OnnxModule(model), [CrossEntropy()],
                 TrainOptions(lr=0.01, renorm=True, renorm_lr=0.03), steps=1)
    off = Trainer(OnnxModule(model), [CrossEntropy()],
                  TrainOptions(lr=0.01, renorm=False, renorm_lr=0.03), steps=1)
    assert [g["lr"] for g in on.opt.param_groups] == [0.03]
    assert [g["lr"] for g in off.opt.param_groups] == [0.01]


def test_a_module_mid_training_is_not_written_back():
    from gpp_onnx.errors import InputError

    model = _export(_net())
    module = OnnxModule(model)
    trainer = Trainer(module, [CrossEntropy()], TrainOptions(renorm=True, batch_size=16), 2)
    x = np.random.default_rng(0).standard_normal((16, 2, 6, 6)).astype(np.float32)
    trainer.fit(iter([(x, np.zeros(16, np.int64))]), steps=1)
    with pytest.raises(InputError, match="BatchNorms put back"):
        write_back(module, model)


@pytest.mark.parametrize("name", ["resnet18", "squeezenet1_1"])   # their outputs vary with x
def test_the_fold_keeps_the_function_on_exported_zoo_nets(name):
    """After steps with the BatchNorms on, the module's inference function (BatchNorms in
    inference mode) equals the written model's in onnxruntime once they are folded."""
    import onnxruntime as ort
    from test_torch_backend import legacy_export

    from gpp_onnx.model import normalize

    model, x = legacy_export(name)
    model = normalize(model)
    module = OnnxModule(model)
    trainer = Trainer(module, [CrossEntropy()], TrainOptions(lr=0.2, renorm=True), steps=5)
    assert len(trainer.renorm.nodes) > 5
    rng = np.random.default_rng(0)
    batch = x.numpy()                          # the export fixes the batch
    trainer.fit(iter([(batch, rng.integers(0, 10, len(batch)))] * 4), "t", steps=4)
    probe = rng.standard_normal(batch.shape).astype(np.float32)
    with torch.no_grad():
        want = module.eval()(torch.from_numpy(probe)).numpy()
    renorm.detach(module)
    written = write_back(module, model)
    sess = ort.InferenceSession(written.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: probe})[0]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())


def test_a_running_statistic_shared_with_a_bias_trains_apart_from_it():
    """The legacy exporter shares an untrained BatchNorm's zero running mean with a zero
    bias (and its running variance of ones with a scale): the fine-tune asked a gradient
    of the running mean (an internal error). Each running statistic now trains as its own
    copy: the bias and the statistic end apart, and the written model computes what the
    trained module computes."""
    import torch

    from gpp_onnx.samples import GraphBuilder
    from gpp_onnx.torch_backend import OnnxModule, write_back
    from gpp_onnx.train import CrossEntropy, Trainer

    b = GraphBuilder((1, 1, 8, 8), seed=0)
    x = b.conv("input", 6)
    y = b.act(b.bn(x), "Relu")
    model = b.build(b.gemm(b.flatten(b.gap(y)), 3))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    bn.input[3] = conv.input[2]                   # running mean read from the conv's bias
    bn.input[4] = bn.input[1]                     # running variance from the BN's scale
    module = OnnxModule(model)
    rng = np.random.default_rng(0)
    xs = torch.from_numpy(rng.standard_normal((16, 1, 8, 8)).astype(np.float32))
    ys = torch.from_numpy(rng.integers(0, 3, 16))
    Trainer(module, [CrossEntropy()], TrainOptions(lr=0.1, renorm=False), 3).fit(
        iter([(xs.numpy(), ys.numpy())] * 3), "train")
    written = write_back(module.eval(), model)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in written.graph.initializer}
    wconv = next(n for n in written.graph.node if n.op_type == "Conv")
    wbn = next(n for n in written.graph.node if n.op_type == "BatchNormalization")
    assert len({wconv.input[2], wbn.input[1], wbn.input[3], wbn.input[4]}) == 4
    assert not np.allclose(inits[wbn.input[3]], inits[wconv.input[2]])
    with torch.no_grad():
        want = module(xs).numpy()
    import onnxruntime as ort

    session = ort.InferenceSession(written.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": xs.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
