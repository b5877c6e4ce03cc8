"""Pruned == masked decided in float64 where the float32 check is loose or fails
(gpp_onnx/exact.py): saturated sigmoid maps and float32 drift of deep nets."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import feeds_for, run_model
from gpp_onnx import exact, logits, prune, surgery, verify, widened
from gpp_onnx.errors import VerificationError
from gpp_onnx.samples import GraphBuilder


def saturated_map(seed: int = 0, cast: bool = False) -> onnx.ModelProto:
    """conv-relu-conv-relu-conv(1x1) + (-17) -> Sigmoid: a text-detector-like probability
    map that random inputs pin near 0, where onnxruntime's sigmoid is only accurate to an
    absolute ~6e-8, so two correct float32 evaluations differ by a large relative error.
    `cast`: a Cast to float after the first layer, as exporters write."""
    b = GraphBuilder((1, 3, 16, 16), seed=seed)
    x = b.act(b.conv("input", 32), "Relu")
    if cast:
        x = b.op("Cast", [x], b.shapes[x], to=onnx.TensorProto.FLOAT)
    x = b.act(b.conv(x, 32), "Relu")
    shift = b.const(np.full((1, 4, 1, 1), -17.0, np.float32), "shift")
    b.shapes[shift] = (1, 4, 1, 1)
    return b.build(b.act(b.binary("Add", b.conv(x, 4, k=1), shift), "Sigmoid"))


def _float64_reference(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    """The saturated map in numpy float64, written out layer by layer (independent of
    onnxruntime and of the torch backend)."""
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    x = next(iter(feeds.values())).astype(np.float64)
    for node in model.graph.node:
        ins = [w.get(i) for i in node.input]
        if node.op_type == "Conv":
            k = ins[1].shape[-1]
            p = k // 2
            xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
            h, wd = x.shape[2:]
            cols = np.stack([xp[:, :, i:i + h, j:j + wd] for i in range(k) for j in range(k)], -1)
            x = np.einsum("nchwk,ock->nohw", cols, ins[1].reshape(*ins[1].shape[:2], -1))
            x = x + ins[2][None, :, None, None]
        elif node.op_type == "Relu":
            x = np.maximum(x, 0)
        elif node.op_type == "Add":
            x = x + ins[1]
        elif node.op_type == "Sigmoid":
            x = 1 / (1 + np.exp(-x))
        elif node.op_type != "Cast":
            raise AssertionError(node.op_type)
    return x


def test_float64_outputs_stay_float64_through_casts_to_float():
    model = saturated_map(cast=True)
    feeds = feeds_for(model, batch=2)
    ref = _float64_reference(model, feeds)
    got = exact.float64_outputs(model, feeds)[0]
    assert got.dtype == np.float64
    # float32 anywhere on the way would leave ~1e-7; float64 throughout gives ~1e-15
    assert verify.relative_error([got], [ref]) < 1e-12


def test_saturated_map_prunes_and_float64_decides(tmp_path):
    model = saturated_map()
    res = prune(model, tmp_path / "small.onnx", ratio=0.5, round_to=1, latency=False)
    row = res.report["rounds"][0]
    assert row["equivalence_relative_error_float64"] is not None
    assert row["equivalence_relative_error_float64"] < exact.FLOAT64_TOLERANCE
    # outside reference: the masked original computed in numpy float64
    masked = prune(model, ratio=0.5, round_to=1, latency=False, mask_only=True).model
    feeds = feeds_for(model, batch=2)
    ref = _float64_reference(masked, feeds)
    got64 = exact.float64_outputs(res.model, feeds)[0]
    assert verify.relative_error([got64], [ref]) < 1e-9
    # and the float32 pruned model agrees with it to float32 sigmoid accuracy (absolute)
    assert np.abs(run_model(res.model, feeds)[0] - ref).max() < 1e-6


def _wrong_copy(model: onnx.ModelProto, scale: float) -> onnx.ModelProto:
    """`model` with one weight of its first conv scaled (a cut that kept a wrong value)."""
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    conv = next(n for n in bad.graph.node if n.op_type == "Conv")
    t = next(t for t in bad.graph.initializer if t.name == conv.input[1])
    arr = numpy_helper.to_array(t).copy()
    arr.flat[0] *= scale
    t.CopyFrom(numpy_helper.from_array(arr, t.name))
    return bad


def test_float64_catches_what_a_loose_float32_tolerance_lets_through():
    model = saturated_map()
    res = prune(model, ratio=0.5, round_to=1, latency=False)
    masked = prune(model, ratio=0.5, round_to=1, latency=False, mask_only=True).model
    bad = _wrong_copy(res.model, 1.01)
    feeds = feeds_for(model, batch=2)
    got, ref = run_model(bad, feeds), run_model(masked, feeds)
    loose = verify.Tolerance(optimizer_noise=0.03)  # what this model's own noise gives
    verify.check_equivalent(got, ref, tolerance=loose)  # float32 alone: accepted
    with pytest.raises(VerificationError, match="float64"):
        exact.check(bad, masked, feeds, got, ref, loose)


def test_float32_drift_is_accepted_only_when_float64_agrees():
    model = saturated_map(seed=1)
    res = prune(model, ratio=0.5, round_to=1, latency=False)
    masked = prune(model, ratio=0.5, round_to=1, latency=False, mask_only=True).model
    feeds = feeds_for(model, batch=2)
    # float32 outputs that drifted 5e-5 from the exact values (above the 1e-5 floor)
    rng = np.random.default_rng(0)
    drifted = [(y * (1 + 5e-5 * rng.choice([-1, 1], size=y.shape))).astype(np.float32)
               for y in exact.float64_outputs(res.model, feeds)]
    ref = [y.astype(np.float32) for y in exact.float64_outputs(masked, feeds)]
    with pytest.raises(VerificationError):
        verify.check_equivalent(drifted, ref)
    verdict = exact.check(res.model, masked, feeds, drifted, ref, verify.FLOOR)
    assert verdict.tolerance.float32_noise >= 4e-5
    assert verdict.error_float64 < exact.FLOAT64_TOLERANCE
    with pytest.raises(VerificationError, match="float64"):
        exact.check(_wrong_copy(res.model, 1.01), masked, feeds, drifted, ref, verify.FLOOR)


def test_clean_model_skips_the_float64_run(sample_model):
    res = prune(sample_model, ratio=0.5, latency=False)
    assert res.tolerance.value == verify.EQUIVALENCE_TOLERANCE
    assert res.report["rounds"][0]["equivalence_relative_error_float64"] is None


# -- a saturated classifier output hides the logits ---------------------------------------
def saturated_classifier(head: str = "Softmax", seed: int = 0) -> onnx.ModelProto:
    """conv-relu-conv-relu-gap-gemm, logits scaled by 3000, then `head`: a classifier whose
    logits on the N(0, 1) check inputs are 40 to 3000 away from 0 and from each other (a
    net trained on [0, 1] images gives margins of 20 and more), so its Softmax / Sigmoid
    is 0 or 1 to far below 1e-9."""
    b = GraphBuilder((1, 3, 8, 8), seed=seed)
    x = b.act(b.conv("input", 16), "Relu")
    x = b.act(b.conv(x, 16), "Relu")
    logits = b.gemm(b.flatten(b.gap(x)), 6)
    scale = b.const(np.float32(3000.0), "scale")
    return b.build(b.act(b.binary("Mul", logits, scale), head, **(
        {"axis": 1} if head == "Softmax" else {})))


def _float16_edges(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` computing in float16: float16 weights, a Cast after the input and one in
    front of the output (what fp16 converters write)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for t in g.initializer:
        if t.data_type == onnx.TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16),
                                               t.name))
    inp, res = g.input[0].name, g.output[0].name
    for node in g.node:
        node.input[:] = [inp + ".fp16" if i == inp else i for i in node.input]
        node.output[:] = [res + ".fp16" if o == res else o for o in node.output]
    g.node.insert(0, onnx.helper.make_node("Cast", [inp], [inp + ".fp16"],
                                           to=onnx.TensorProto.FLOAT16))
    g.node.append(onnx.helper.make_node("Cast", [res + ".fp16"], [res],
                                        to=onnx.TensorProto.FLOAT))
    return out


def test_saturated_inputs_are_the_logits_behind_casts_and_the_activation():
    model = _float16_edges(saturated_classifier())
    mul = next(n for n in model.graph.node if n.op_type == "Mul")
    assert logits.saturated_inputs(model) == [mul.output[0]]
    # a LogSoftmax does not saturate (its outputs move with the logits): nothing extra
    b = GraphBuilder((1, 3, 8, 8))
    assert logits.saturated_inputs(b.build(b.act(b.gemm(b.flatten(b.gap("input")), 4),
                                                 "LogSoftmax", axis=1))) == []


@pytest.mark.parametrize("form", ["Softmax", "Sigmoid", "Softmax-float16"])
def test_a_wrong_cut_behind_a_saturated_output_is_refused(form, monkeypatch):
    """A surgery bug that moves one kept channel (its weights and bias times 1.5) changes
    the logits by percents, but the saturated outputs by less than 1e-9: the check
    compares the logits too and refuses it; the correct cut passes."""
    model = saturated_classifier(form.split("-")[0])
    model = _float16_edges(model) if form.endswith("float16") else model

    def corrupt(pruned):
        conv = [n for n in pruned.graph.node if n.op_type == "Conv"][1]
        tensors = [next(t for t in pruned.graph.initializer if t.name == name)
                   for name in conv.input[1:]]
        channel = int(np.argmax(numpy_helper.to_array(tensors[1])))  # the largest bias
        for t in tensors:
            array = numpy_helper.to_array(t).copy()
            array[channel] *= 1.5
            t.CopyFrom(numpy_helper.from_array(array, t.name))

    _passes_then_refuses(model, dict(ratio=0.125, round_to=1, latency=False), corrupt,
                         monkeypatch)


def _passes_then_refuses(model, options, corrupt, monkeypatch):
    """The correct cut passes the check; the same cut changed by `corrupt` (as a surgery
    bug would change it) is refused."""
    res = prune(model, **options)
    assert res.equivalence_error < res.tolerance.value
    cut = surgery.cut_with_values

    def wrong_cut(*args, **kwargs):
        pruned, _ = cut(*args, **kwargs)
        corrupt(pruned)
        return pruned, lambda name: None

    monkeypatch.setattr(surgery, "cut_with_values", wrong_cut)
    with pytest.raises(VerificationError, match="differs from the masked original"):
        prune(model, **options)


def test_a_wrong_cut_of_a_uint8_models_channel_silent_on_0_and_1_is_refused(monkeypatch):
    """The same classifier behind uint8 pixels (Cast, / 255, as tf2onnx models take
    images): on the {0, 1} integer check input channel 0 stays at 0, so the second check
    input is pixels 0..255."""
    model, quiet = _quiet_on_noise_classifier()
    graph = model.graph
    graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.UINT8
    graph.initializer.append(numpy_helper.from_array(np.array(255, np.float32), "u8_scale"))
    graph.node.insert(0, onnx.helper.make_node("Div", ["u8_float", "u8_scale"], ["u8_image"]))
    graph.node.insert(0, onnx.helper.make_node("Cast", ["input"], ["u8_float"],
                                               to=onnx.TensorProto.FLOAT))
    for node in graph.node[2:]:
        node.input[:] = ["u8_image" if i == "input" else i for i in node.input]
    onnx.checker.check_model(model, full_check=True)

    _passes_then_refuses(model, dict(ratio=0.25, round_to=1, latency=False, ignore=(quiet,)),
                         _halve_the_1x1_convs_read_of_channel_0, monkeypatch)


def test_float32_check_of_a_float16_model_compares_the_logits():
    model = _float16_edges(saturated_classifier())
    options = dict(ratio=0.125, round_to=1, latency=False)
    pruned = prune(model, **options).model
    masked = prune(model, mask_only=True, **options).model
    feeds = feeds_for(model, batch=2)
    assert widened.check_in_float32(pruned, masked, feeds) < verify.EQUIVALENCE_TOLERANCE
    with pytest.raises(VerificationError, match="computed in float32"):
        widened.check_in_float32(_wrong_copy(pruned, 1.5), masked, feeds)


def _quiet_on_noise_classifier():
    """A conv whose channel 0 (all weights 1/192, bias -0.35) stays at 0 after its Relu on
    N(0, 1) inputs but fires on images in [0, 1], read by a 1x1 conv, then a classifier."""
    b = GraphBuilder((1, 3, 8, 8), seed=0)
    w = b.rng.standard_normal((4, 3, 8, 8)).astype(np.float32) * 0.1
    w[0] = 1.0 / 192
    bias = np.array([-0.35, 0.1, 0.1, 0.1], np.float32)
    h = b.act(b.op("Conv", ["input", b.const(w), b.const(bias)], (1, 4, 1, 1),
                   kernel_shape=[8, 8]), "Relu")
    return b.build(b.gemm(b.flatten(b.act(b.conv(h, 8, k=1), "Relu")), 3)), h


def _halve_the_1x1_convs_read_of_channel_0(pruned):
    conv = [n for n in pruned.graph.node if n.op_type == "Conv"][1]
    t = next(t for t in pruned.graph.initializer if t.name == conv.input[1])
    array = numpy_helper.to_array(t).copy()
    array[:, 0] *= 0.5
    t.CopyFrom(numpy_helper.from_array(array, t.name))


def test_a_wrong_cut_of_a_channel_silent_on_noise_is_refused(monkeypatch):
    """A surgery bug that halves how the 1x1 conv reads a kept channel that only images
    light up: invisible on two N(0, 1) check inputs, so the second one is drawn from
    U(0, 1), the scale of images fed as they are."""
    model, quiet = _quiet_on_noise_classifier()
    _passes_then_refuses(model, dict(ratio=0.25, round_to=1, latency=False, ignore=(quiet,)),
                         _halve_the_1x1_convs_read_of_channel_0, monkeypatch)


def test_a_nan_where_the_other_side_has_a_number_fails_the_check():
    """NaNs used to drop out of max(): a cut computing numbers where the masked original
    computes NaN (a NaN weight in a removed channel, a --plan replayed) passed with
    relative error 0 and 'verified: pruned == masked original' was printed."""
    ref = np.array([[np.nan, 1.0], [2.0, np.inf]], np.float32)
    got = np.array([[0.5, 1.0], [2.0, 3.0]], np.float32)
    assert verify.relative_error([got], [ref]) == np.inf
    assert verify.relative_error([ref], [got]) == np.inf
    assert verify.relative_error([ref.copy()], [ref]) == 0.0   # same NaN, same inf, same numbers
    assert verify.relative_error([ref * 2], [ref]) == pytest.approx(1.0)
    with pytest.raises(VerificationError):
        verify.check_equivalent([got], [ref])
