"""Grow (METHOD 5): function-preserving Inception modules. References are onnxruntime runs
of the base model, hand-built graphs and the pruned == masked check of conftest."""
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from gpp_onnx import grow
from gpp_onnx.config import TrainOptions
from gpp_onnx.graph import GraphView
from gpp_onnx.grow import Widths, auto_positions, insert_module, position
from gpp_onnx.model import normalize
from gpp_onnx.samples import GraphBuilder, digits_cnn

from conftest import assert_pruned_equals_masked, feeds_for, rel_err, run_model

INSERT_ONLY = TrainOptions(epochs=0)


def _grown(model, **options):
    return grow(model, train=INSERT_ONLY, **options)


def _assert_same_function(base, grown, batch=3):
    feeds = feeds_for(base, batch=batch)
    got, want = run_model(grown, feeds), run_model(base, feeds)
    assert rel_err(got, want) < 1e-5
    return feeds


def _consumer_extension(model):
    """The weights the grow extended (named '<old>.grown'), as {name: array}."""
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
            if t.name.endswith(".grown")}


def test_insert_only_keeps_the_digits_cnn_function_at_every_stage():
    base = digits_cnn(seed=2)
    before = base.SerializeToString()
    res = _grown(base, max_modules=3)
    assert base.SerializeToString() == before and res.output is None  # nothing touched
    assert len(res.modules) == 2  # two resolution stages (8x8, 4x4), deepest first
    assert [r.module.height for r in res.modules] == [4, 8]
    feeds = _assert_same_function(base, res.model)
    concats = [n for n in res.model.graph.node if n.op_type == "Concat"
               and n.name.startswith("grow")]
    assert len(concats) == 2
    # not vacuous: the extra channels carry signal, and the consumers' zero weights
    # are what hides it - set them to 1 and the outputs change
    live = onnx.ModelProto()
    live.CopyFrom(res.model)
    for t in live.graph.initializer:
        if t.name.endswith(".grown"):
            a = numpy_helper.to_array(t).copy()
            a[a == 0] = 1.0
            t.CopyFrom(numpy_helper.from_array(a, t.name))
    assert rel_err(run_model(live, feeds), run_model(base, feeds)) > 1e-3


def test_module_layout_widths_and_identity_branch():
    base = normalize(digits_cnn())
    view = GraphView(base)
    pos = position(view, "relu2")  # the first conv block, 16 channels at 8x8
    grown, module = insert_module(base, pos, Widths(12, 4, 8), 1)
    out = GraphView(grown)
    assert out.shape(module.output) == (1, 16 + 12 + 4 + 8, 8, 8)
    assert module.branch_channels() == {"1x1": (0, 16), "3x3": (16, 28),
                                        "3x3dbl": (28, 32), "pool": (32, 40)}
    # the module's output begins with its input, exactly
    feeds = feeds_for(base)
    exposed = onnx.ModelProto()
    exposed.CopyFrom(grown)
    exposed.graph.output.extend([onnx.ValueInfoProto(name=module.output),
                                 onnx.ValueInfoProto(name="relu2")])
    y, v = run_model(exposed, feeds)[1:]
    np.testing.assert_array_equal(y[:, :16], v)
    assert np.abs(y[:, 16:]).max() > 0
    ops = {n.name: n.op_type for n in grown.graph.node}
    assert ops["grow1.1x1.act"] == "Relu"  # ReLU(v) = v on a ReLU output


@pytest.mark.parametrize("act", ["Relu", "Clip", "LeakyRelu", "HardSwish", None])
def test_host_activation_is_matched_and_the_identity_stays_exact(act):
    b = GraphBuilder((1, 3, 10, 10), seed=4)
    x = b.conv("input", 8)
    x = b.act(x, act) if act else x
    y = b.act(b.bn(b.conv(x, 8)), "Relu")
    base = b.build(b.gemm(b.flatten(b.pool(y)), 5))  # MaxPool -> Flatten -> Gemm
    res = _grown(base, at=(x,), max_modules=1)
    _assert_same_function(base, res.model)
    ops = {n.name: n.op_type for n in res.model.graph.node}
    assert ops["grow1.3x3.act"] == (act or "Relu")
    identity_act = "grow1.1x1.act" in ops
    assert identity_act == (act in ("Relu", "Clip"))  # only where act(act(x)) = act(x)


@pytest.mark.parametrize("include_pad", [0, 1])
def test_an_average_pool_of_zero_padding_does_not_keep_the_activations_range(include_pad):
    """Clip(1, 6) -> AveragePool(3x3, pad 1): counting the padding in averages border
    values below 1, so the identity branch there must not end in the Clip."""
    b = GraphBuilder((1, 1, 8, 8), seed=3)
    x = b.conv("input", 8)
    lo, hi = b.const(np.float32(1.0)), b.const(np.float32(6.0))
    x = b.op("Clip", [x, lo, hi], (1, 8, 8, 8))
    p = b.op("AveragePool", [x], (1, 8, 8, 8), kernel_shape=[3, 3], pads=[1, 1, 1, 1],
             count_include_pad=include_pad)
    base = b.build(b.gemm(b.flatten(b.gap(b.act(b.conv(p, 8), "Relu"))), 5))
    res = _grown(base, at=(p,), max_modules=1)
    _assert_same_function(base, res.model)
    ops = {n.name: n.op_type for n in res.model.graph.node}
    assert ("grow1.1x1.act" in ops) == (include_pad == 0)


def test_flatten_gemm_and_batchnorm_consumers_are_extended():
    b = GraphBuilder((1, 3, 8, 8), seed=5)
    x = b.act(b.conv("input", 6), "Relu")
    y = b.act(b.bn(x), "Relu")            # a BN directly on the grown value
    z = b.act(b.conv(y, 4), "Relu")
    base = b.build(b.gemm(b.flatten(b.pool(z)), 3))
    res = _grown(base, at=(x, z), max_modules=2, widths=Widths(8, 8, 8))
    _assert_same_function(base, res.model)
    ext = _consumer_extension(res.model)
    gemm = [a for a in ext.values() if a.ndim == 2]
    assert gemm and gemm[0].shape[1] == (4 + 24) * 4 * 4  # C*H*W rows after a 2x2 pool
    bn = sorted(a.tolist() for a in ext.values() if a.ndim == 1)
    assert [v[-1] for v in bn] == [0.0, 0.0, 1.0, 1.0]  # bias, mean 0; scale, var 1


def test_grown_model_prunes_with_pruned_equal_to_masked(tmp_path):
    res = _grown(digits_cnn(seed=1), max_modules=2)
    result = assert_pruned_equals_masked(res.model, tmp_path, ratio=0.5)
    cut = {g for g, removed in result.plan.removed.items() if len(removed)}
    assert any(g.startswith("grow1.") for g in cut)  # the module's branches were cut


def test_training_reaches_the_new_channels():
    """Zero consumer weights plus random branch weights: the consumers' new weights get a
    gradient from the first step (zero on both sides would be a saddle)."""
    from gpp_onnx.data import split
    from gpp_onnx.evaluation import dataset_for
    from gpp_onnx.finetune import train_model

    base = normalize(digits_cnn())
    view = GraphView(base)
    grown, module = insert_module(base, position(view, "relu2"), Widths(), 1)
    (name, before), = _consumer_extension(grown).items()
    assert not before[:, module.channels:].any()
    train, _ = split(dataset_for(view, "digits"), 0.5)
    trained = train_model(grown, train, TrainOptions(epochs=0.1, lr=0.05))
    after = _consumer_extension(trained)[name]
    assert np.abs(after[:, module.channels:]).max() > 1e-4


def _digits_options():
    from gpp_onnx.config import DataOptions

    return DataOptions("digits", val_split=0.25)


def test_a_module_that_does_not_pay_is_dropped_and_growth_stops():
    base = digits_cnn()
    res = grow(base, data=_digits_options(), max_modules=2, min_gain=100.0,
               train=TrainOptions(epochs=0.2))
    assert len(res.modules) == 1 and not res.modules[0].kept
    assert not any(n.name.startswith("grow") for n in res.model.graph.node)
    _assert_same_function(base, res.model)
    assert res.report["modules"][0]["kept"] is False
    assert res.after == res.before


def test_auto_positions_are_one_per_stage_deepest_first():
    b = GraphBuilder((1, 3, 16, 16), seed=0)
    a = b.act(b.conv("input", 8), "Relu")
    a2 = b.act(b.conv(a, 8), "Relu")                  # last block at 16x16
    c = b.act(b.conv(b.pool(a2), 16), "Relu")         # 8x8
    s = b.binary("Add", c, b.conv(c, 16))             # feeds a residual Add: skipped
    d = b.act(b.conv(s, 16), "Relu")                  # last growable block at 8x8
    base = normalize(b.build(b.gemm(b.flatten(b.gap(d)), 4)))
    got = [p.value for p in auto_positions(GraphView(base))[0]]
    assert got == [d, a2]


def test_a_grown_model_grows_again_under_new_module_names():
    base = digits_cnn()
    once = _grown(base, max_modules=1).model
    twice = _grown(once, max_modules=2, at=("relu2",)).model
    concats = sorted(n.name for n in twice.graph.node if n.op_type == "Concat"
                     and n.name.startswith("grow"))
    assert concats == ["grow1.concat", "grow2.concat"]
    _assert_same_function(base, twice)


def test_grow_in_python_without_data_inserts_only(tmp_path):
    """As on the command line: without data the default is 0 epochs (insert only)."""
    base = digits_cnn(0)
    res = grow(base, max_modules=1)
    _assert_same_function(base, res.model)
    with pytest.raises(Exception, match="one name"):
        grow(base, at="relu2")


@pytest.mark.parametrize("options, message", [
    (dict(widths=(8, 8, 8)), "widths=(8, 8, 8) is not a Widths"),
    (dict(widths=Widths(8.5)), "widths.b3x3=8.5 is not a whole number"),
    (dict(min_gain="0.5"), "min_gain='0.5' is not a number"),
    (dict(min_gain=float("nan")), "--min-gain nan must be >= 0"),
    (dict(seed="1"), "seed='1' is not a whole number"),
])
def test_python_options_of_a_wrong_type_are_input_errors(options, message):
    from gpp_onnx.errors import InputError
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _grown(digits_cnn(), max_modules=1, **options)


def test_the_insertion_check_compares_the_logits_a_saturated_softmax_hides(monkeypatch):
    """A consumer weight left slightly nonzero moves the logits by about 1e-3 relative; a
    final Softmax saturated by large logits shows none of it (1e-36), so the check must
    compare the logits in front of it too."""
    from dataclasses import replace as dc_replace

    from gpp_onnx.errors import VerificationError
    from gpp_onnx.grow import module as grow_module

    model = digits_cnn()
    final = model.graph.node[-1]
    weights = {t.name: t for t in model.graph.initializer}
    w = weights[final.input[1]]
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 300, w.name))
    logits = final.output[0]
    final.output[0] = "logits"
    model.graph.node.append(onnx.helper.make_node("Softmax", ["logits"], [logits], axis=-1))
    extended = grow_module.extended
    monkeypatch.setattr(grow_module, "extended", lambda array, step: extended(
        array, dc_replace(step, fill=1e-4) if step.fill == 0 else step))
    with pytest.raises(VerificationError, match="does not compute what the base computes"):
        _grown(model, max_modules=1)
