"""The Python API a pruning user drives from code: criteria as objects, groups left alone,
per-group ratios. References are the written models' weights, read back with onnx."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from gpp_onnx import PruneConfig, prune
from gpp_onnx.cli import main
from gpp_onnx.config import DataOptions
from gpp_onnx.errors import InputError
from gpp_onnx.importance import register_criterion
from gpp_onnx.samples import GraphBuilder


def _net():
    b = GraphBuilder((1, 3, 8, 8), seed=0)
    x = b.act(b.conv("input", 16), "Relu")
    x = b.act(b.conv(x, 16), "Relu")
    return b.build(b.gemm(b.flatten(b.gap(x)), 4))


def _conv_weights(path) -> list[np.ndarray]:
    m = onnx.load(str(path))
    init = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    return [init[n.input[1]] for n in m.graph.node if n.op_type == "Conv"]


class LastChannelsFirst:
    """Scores channel i as i: the plan keeps the highest-numbered channels."""
    name = "index"

    def score(self, analysis, evidence=None):
        return {g.key: np.arange(g.width, dtype=float) for g in analysis.prunable}


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_net(), path)
    return path


def test_a_criterion_object_decides_which_channels_go(src, tmp_path):
    out = tmp_path / "p.onnx"
    result = prune(src, out, PruneConfig(ratio=0.5, round_to=1, latency=False,
                                         criterion=LastChannelsFirst()))
    w0, w1 = _conv_weights(src)
    p0, p1 = _conv_weights(out)
    np.testing.assert_array_equal(p0, w0[8:])               # the low-numbered half is gone
    np.testing.assert_array_equal(p1, w1[8:][:, 8:])
    assert result.plan.meta["criterion"] == "index"


def test_a_registered_criterion_is_usable_by_name(src, tmp_path):
    register_criterion("test-index", lambda seed: LastChannelsFirst())
    out = tmp_path / "p.onnx"
    assert main(["-q", "prune", str(src), "--criterion", "test-index", "--round-to", "1",
                 "--no-latency", "-o", str(out)]) == 0
    np.testing.assert_array_equal(_conv_weights(out)[0], _conv_weights(src)[0][8:])
    with pytest.raises(InputError):
        register_criterion("test-index", lambda seed: LastChannelsFirst())


@pytest.mark.parametrize("name", ["conv1", "relu1_out", "Relu_1"])
def test_an_ignored_group_keeps_its_width(src, tmp_path, name):
    model = onnx.load(str(src))
    first_conv = next(n for n in model.graph.node if n.op_type == "Conv")
    first_relu = next(n for n in model.graph.node if n.op_type == "Relu")
    name = {"conv1": first_conv.output[0], "relu1_out": first_relu.output[0],
            "Relu_1": first_relu.name}[name]
    out = tmp_path / "p.onnx"
    result = prune(src, out, PruneConfig(ratio=0.5, round_to=1, latency=False, ignore=(name,)))
    p0, p1 = _conv_weights(out)
    assert p0.shape[0] == 16 and p1.shape[0] == 8         # first kept whole, second halved
    assert sum(1 for r in result.report["groups"] if r["reason"].startswith("kept whole")) == 1


def test_a_group_ratio_overrides_the_uniform_one(src, tmp_path):
    first = onnx.load(str(src)).graph.node[0].output[0]
    out = tmp_path / "p.onnx"
    assert main(["-q", "prune", str(src), "--ratio", "0.5", "--group-ratio", f"{first}=0.25",
                 "--round-to", "1", "--no-latency", "-o", str(out)]) == 0
    p0, p1 = _conv_weights(out)
    assert (p0.shape[0], p1.shape[0]) == (12, 8)


@pytest.mark.parametrize("argv", [["--ignore", "no_such_layer"], ["--group-ratio", "x=0.5"],
                                  ["--group-ratio", "x=2"]])
def test_bad_names_and_ratios_are_one_line_errors(src, tmp_path, argv, capsys):
    out = tmp_path / "p.onnx"
    code = main(["-q", "prune", str(src), *argv, "--no-latency", "-o", str(out)])
    assert code == 2 and not out.exists()
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("options, message", [
    ({"group_ratios": (("x", 0.5),)}, "'x' names no channel group"),
    ({"criterion": "gppp"}, "unknown criterion 'gppp' - choose one of"),
])
def test_unknown_names_are_refused_before_the_data_is_read(src, monkeypatch, options, message):
    import gpp_onnx.start

    def no_data(*args, **kwargs):
        raise AssertionError("the data was read before the name was checked")

    monkeypatch.setattr(gpp_onnx.start, "load_data", no_data)   # where a run loads it
    with pytest.raises(InputError, match=message):
        prune(src, config=PruneConfig(ratio=0.5, latency=False, data=DataOptions("digits"),
                                      **options))


def test_a_malformed_group_ratio_is_refused_by_the_parser(src, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["-q", "prune", str(src), "--group-ratio", "nonsense", "-o", str(tmp_path / "p.onnx")])
    assert exc.value.code == 2 and "NAME=RATIO" in capsys.readouterr().err


def test_an_in_memory_model_is_pruned_without_writing_or_touching_it(tmp_path, monkeypatch):
    from conftest import feeds_for, run_model
    from gpp_onnx.report import prune_summary

    monkeypatch.chdir(tmp_path)
    model = _net()
    before = model.SerializeToString()
    res = prune(model, ratio=0.5, round_to=1, latency=False)
    assert model.SerializeToString() == before             # the caller's proto is untouched
    assert list(tmp_path.iterdir()) == [] and res.output is None
    w0 = [numpy_helper.to_array(t) for t in model.graph.initializer if len(t.dims) == 4][0]
    p0 = _conv_weights_of(res.model)[0]
    assert p0.shape[0] == 8 and p0.shape[1:] == w0.shape[1:]
    feeds = feeds_for(res.model)
    assert run_model(res.model, feeds)[0].shape == (2, 4)
    assert "nothing written" in prune_summary(res)


def _conv_weights_of(model) -> list[np.ndarray]:
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [init[n.input[1]] for n in model.graph.node if n.op_type == "Conv"]


def test_a_prune_in_rounds_reports_the_widths_it_wrote(tmp_path, capsys):
    """With --rounds 3, each round cuts the model the one before left: the report's kept
    widths are the written model's, and the summary counts every round's channels."""
    import json

    import onnx
    from onnx import numpy_helper

    from gpp_onnx.cli import main
    from gpp_onnx.samples import GraphBuilder

    b = GraphBuilder((1, 3, 16, 16), seed=0)
    x = b.act(b.conv("input", 32), "Relu")
    x = b.act(b.conv(x, 32), "Relu")
    x = b.act(b.conv(x, 16), "Relu")
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(b.build(b.gemm(b.flatten(b.gap(x)), 10)), src)
    assert main(["-q", "prune", str(src), "--rounds", "3", "--ratio", "0.5", "--round-to", "1",
                 "--no-latency", "-o", str(out)]) == 0
    rep = json.loads(out.with_suffix(".report.json").read_text())
    written = onnx.load(out)
    inits = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    producer = {o: n for n in written.graph.node for o in n.output}
    checked = 0
    for row in rep["groups"]:
        node = producer.get(row["key"])
        if node is not None and node.op_type == "Conv":
            assert inits[node.input[1]].shape[0] == row["kept"], row["key"]
            checked += 1
    assert checked == 3
    total = sum(r["removed_channels"] for r in rep["rounds"])
    assert len(rep["rounds"]) == 3 and total == sum(g["width"] - g["kept"] for g in rep["groups"])
    assert f"removed {total} channels" in capsys.readouterr().out


def test_a_latency_target_missed_by_more_than_the_noise_is_a_warning():
    from types import SimpleNamespace

    from gpp_onnx.config import PruneConfig
    from gpp_onnx.pipeline import _short_of_target
    from gpp_onnx.stats import ModelStats

    before = ModelStats(1000, 10_000)
    last = SimpleNamespace(params=500, macs=5_000)
    config = PruneConfig(target_latency=0.5)
    assert "above --target-latency 0.5" in _short_of_target(config, before, last, 0.61)
    assert _short_of_target(config, before, last, 0.54) is None      # within the noise
    assert _short_of_target(PruneConfig(target_macs=0.5), before, last) is None


@pytest.mark.parametrize("flags, train", [
    ([], {}),
    (["--lr", "0.05"], {"lr": 0.05}),
    (["--distill", "0", "--no-renorm"], {"distill": 0.0, "renorm": False}),
])
def test_train_options_spelt_in_python_train_as_the_same_flags_do(flags, train):
    """`train=TrainOptions(epochs=1)` is `--finetune-epochs 1`: what it leaves unset takes
    the fine-tune's defaults (distillation, the BatchNorm put back at its own rate)."""
    from gpp_onnx import TrainOptions
    from gpp_onnx.cli import _prune_config
    from gpp_onnx.cli_args import build_parser

    argv = ["prune", "m.onnx", "-o", "o.onnx", "--data", "digits", "--finetune-epochs", "1"]
    cli = _prune_config(build_parser().parse_args(argv + flags)).checked().train
    api = PruneConfig(data=DataOptions("digits"),
                      train=TrainOptions(epochs=1, **train)).checked().train
    fields = ("lr", "distill", "renorm", "temperature", "batchnorm")
    assert [getattr(api, f) for f in fields] == [getattr(cli, f) for f in fields]
    if cli.renorm:
        assert api.renorm_lr == cli.renorm_lr
    assert (cli.distill, cli.renorm) == (train.get("distill", 1.0), train.get("renorm", True))


class _Scores:
    """A criterion returning `make(group)` for every prunable group."""
    name = "odd"

    def __init__(self, make):
        self.make = make

    def score(self, analysis, evidence=None):
        return {g.key: self.make(g) for g in analysis.prunable}


@pytest.mark.parametrize("make, message", [
    (lambda g: np.ones(1), "gave 1 scores for group"),
    (lambda g: np.full(g.width, np.nan), "one finite score per channel"),
    (lambda g: "high", "one finite score per channel"),
])
def test_a_criterion_whose_scores_do_not_fit_is_named(src, make, message):
    with pytest.raises(InputError, match=f"criterion 'odd' {message}" if "gave" in message
                       else message):
        prune(src, ratio=0.5, latency=False, criterion=_Scores(make))


def test_a_criterion_that_scores_no_group_is_named(src):
    empty = _Scores(None)
    empty.score = lambda analysis, evidence=None: {}
    with pytest.raises(InputError, match="criterion 'odd' gave no scores for group"):
        prune(src, ratio=0.5, latency=False, criterion=empty)


@pytest.mark.parametrize("name, factory", [(None, lambda seed: LastChannelsFirst()),
                                           ("", lambda seed: LastChannelsFirst()),
                                           ("pos2", "not callable")])
def test_a_criterion_registered_without_a_name_or_factory_is_refused(name, factory):
    from gpp_onnx.importance import criterion_names

    before = criterion_names()
    with pytest.raises(InputError):
        register_criterion(name, factory)
    assert criterion_names() == before


def test_a_group_given_two_ratios_is_refused(src):
    key = gpp_onnx_analyze(src).analysis.prunable[0].key
    with pytest.raises(InputError, match=f"'{key}' is given two ratios"):
        prune(src, ratio=0.5, latency=False, group_ratios=((key, 0.5), (key, 0.1)))


def gpp_onnx_analyze(path):
    from gpp_onnx import analyze
    return analyze(path)


@pytest.mark.parametrize("call, message", [
    (lambda m: prune(m.SerializeToString(), ratio=0.5), "expected a path or an onnx.ModelProto"),
    (lambda m: prune(None), "expected a path or an onnx.ModelProto"),
    (lambda m: prune(m, data="digits"), "is not a DataOptions"),
    (lambda m: prune(m, ratio="0.5"), "is not a number"),
    (lambda m: prune(m, rounds=1.5), "is not a whole number"),
    (lambda m: prune(m, round_to=1.5), "is not a whole number"),
    (lambda m: prune(m, ignore="conv"), "is one name - give a list of names"),
])
def test_arguments_of_the_wrong_type_are_one_line_input_errors(call, message):
    model = _net()
    with pytest.raises(InputError, match=message) as err:
        call(model)
    assert "\n" not in str(err.value)


def test_in_memory_models_are_profiled_and_compared_and_group_ratios_may_be_a_dict(tmp_path):
    import gpp_onnx

    model = _net()
    onnx.save(model, tmp_path / "m.onnx")
    assert gpp_onnx.profile(model, runs=3).total_seconds > 0
    cmp = gpp_onnx.compare(model, model, repeats=3)
    assert cmp.a == cmp.b == gpp_onnx.compare(tmp_path / "m.onnx", tmp_path / "m.onnx",
                                              repeats=3).a
    key = gpp_onnx.analyze(tmp_path / "m.onnx").analysis.prunable[0].key
    as_dict = prune(model, ratio=0.5, round_to=1, latency=False, group_ratios={key: 0.25})
    as_pairs = prune(model, ratio=0.5, round_to=1, latency=False, group_ratios=((key, 0.25),))
    assert as_dict.plan.removed == as_pairs.plan.removed


def test_an_in_memory_model_without_its_external_weights_is_named(tmp_path):
    onnx.save(_net(), tmp_path / "m.onnx", save_as_external_data=True, location="m.data",
              size_threshold=0)
    bare = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    with pytest.raises(InputError, match="external data file that was not loaded"):
        prune(bare, ratio=0.5, latency=False)


@pytest.mark.parametrize("source, message", [
    (__import__("pathlib").Path("no_such_folder"), "unknown data source 'no_such_folder'"),
    (np.zeros((2, 3, 8, 8), np.float32), "data source ndarray is not a path or a name"),
])
def test_a_data_source_of_another_type_is_a_data_error(tmp_path, monkeypatch, source, message):
    """DataOptions(Path(...)) is read like its string; a missing one is named, not an
    AttributeError; an array is refused in one line (save it with numpy.savez)."""
    from gpp_onnx.errors import DataError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=message):
        prune(_net(), "p.onnx", ratio=0.5, latency=False, data=DataOptions(source))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("shape", [(1, 3, -5, 8), "1,3,8,8", (0, 3, 8, 8)])
def test_a_bad_input_shape_is_an_input_error_in_every_entry(shape):
    """analyze / profile / compare check `input_shape` as prune does (a ValueError or a
    batch of 0 went through before)."""
    import gpp_onnx

    model = _net()
    for call in (lambda: gpp_onnx.analyze(model, input_shape=shape),
                 lambda: gpp_onnx.profile(model, input_shape=shape, runs=1),
                 lambda: gpp_onnx.compare(model, model, input_shape=shape, repeats=1)):
        with pytest.raises(InputError, match="is not a shape"):
            call()


def test_numpy_numbers_are_numbers():
    """ratio=np.float32(0.5) (a sweep over np.linspace) and seed=np.int64(1) (np.arange)
    run as their Python values; they were refused as 'not a number'."""
    model = _net()
    ref = prune(model, ratio=0.5, round_to=1, seed=1, latency=False)
    for ratio, seed in ((np.float32(0.5), np.int64(1)), (np.float64(0.5), np.int32(1))):
        res = prune(model, ratio=ratio, round_to=np.int64(1), seed=seed, latency=False)
        assert res.plan.removed == ref.plan.removed
        assert isinstance(res.report["config"]["ratio"], float)
    with pytest.raises(InputError, match="is not a number"):
        prune(model, ratio=np.bool_(True))


@pytest.mark.parametrize("train, message", [
    ({"epochs": 1, "lr": -1}, "lr=-1 must be a number > 0"),
    ({"epochs": 1, "batch_size": 0}, "batch_size=0 must be a whole number >= 1"),
    ({"epochs": -1}, "epochs=-1 must be a number >= 0"),
    ({"epochs": "1"}, "epochs='1' must be a number >= 0"),
])
def test_train_options_out_of_range_are_refused_before_the_work(tmp_path, monkeypatch, train,
                                                                message):
    """What --lr / --batch-size / --finetune-epochs refuse is refused from Python too: a
    negative rate failed in torch after the cut, a batch of 0 divided by zero, negative
    epochs were ignored."""
    from gpp_onnx import TrainOptions, grow, push

    import gpp_onnx.start

    monkeypatch.setattr(gpp_onnx.start, "load_data", lambda *a, **k: pytest.fail("data read"))
    monkeypatch.chdir(tmp_path)
    data = DataOptions("digits")
    for call in (lambda: prune(_net(), "p.onnx", data=data, train=TrainOptions(**train)),
                 lambda: push(_net(), "p.onnx", data=data, train=TrainOptions(**train)),
                 lambda: grow(_net(), "p.onnx", data=data, train=TrainOptions(**train))):
        with pytest.raises(InputError, match=message):
            call()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("call, message", [
    (lambda m: __import__("gpp_onnx").compare(m, m, data="digits"), "is not a DataOptions"),
    (lambda m: __import__("gpp_onnx").compare(m, m, repeats=0), "repeats=0 must be a whole"),
    (lambda m: __import__("gpp_onnx").profile(m, runs=0), "runs=0 must be a whole"),
    (lambda m: __import__("gpp_onnx").profile(m, options={"threads": 1}),
     "is not a LatencyOptions"),
    (lambda m: __import__("gpp_onnx").grow(m, data="digits"), "is not a DataOptions"),
    (lambda m: __import__("gpp_onnx").grow(m, train={"epochs": 0}), "is not a TrainOptions"),
    (lambda m: __import__("gpp_onnx").grow(m, max_modules="2"), "is not a whole number"),
    (lambda m: __import__("gpp_onnx").push(m, data=DataOptions("digits"), weights={"sep": 1}),
     "is not a PushWeights"),
    (lambda m: __import__("gpp_onnx").gpp(m, data=DataOptions("digits"),
                                          options={"budget_epochs": 1}), "is not a GppOptions"),
    (lambda m: prune(m, group_ratios=[("x",)]), "is not a \\(name, ratio\\) pair"),
    (lambda m: prune(m, group_ratios={"x": "0.5"}), "is not a \\(name, ratio\\) pair"),
])
def test_every_entry_refuses_options_of_the_wrong_type_in_one_line(call, message):
    """As prune(data="digits") does: an AttributeError, a TypeError or a StatisticsError
    came out of compare, profile, grow, push and gpp before."""
    with pytest.raises(InputError, match=message) as err:
        call(_net())
    assert "\n" not in str(err.value)
