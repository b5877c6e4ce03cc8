"""Data for models with several inputs: an .npz holding one array per input, named as the
input. The reference throughout is the trained digits net with one input: wrapped so that
its image is multiplied by a second input `gain` (1 in the data), it computes the same
function on the same pixels, so every data path must score, cut, repair and train it as it
does the one-input net on `--data digits`; accuracies and agreement are checked against
onnxruntime runs made here on the arrays themselves."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from gpp_onnx.cli import main
from conftest import run_model


def _digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.images[:, None] / 16.0).astype(np.float32), bunch.target.astype(np.int64)


def _with_gain(path, gain_type=TensorProto.FLOAT) -> onnx.ModelProto:
    """The one-input net at `path` taking (image, gain): its input is image * gain (gain
    cast to float first where it is an integer input)."""
    model = onnx.load(str(path))
    old = model.graph.input[0].name
    for node in model.graph.node:
        node.input[:] = ["scaled" if name == old else name for name in node.input]
    gain = "gain"
    front = []
    if gain_type != TensorProto.FLOAT:
        front.append(helper.make_node("Cast", ["gain"], ["gain_f"], to=TensorProto.FLOAT))
        gain = "gain_f"
    front.append(helper.make_node("Mul", ["image", gain], ["scaled"]))
    for node in reversed(front):
        model.graph.node.insert(0, node)
    del model.graph.input[:]
    model.graph.input.extend([
        helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 8, 8]),
        helper.make_tensor_value_info("gain", gain_type, ["N", 1, 1, 1])])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(scope="module")
def two(trained, tmp_path_factory):
    """(folder, the one-input net, the two-input net, labelled .npz, x-only .npz)."""
    d = tmp_path_factory.mktemp("multi")
    x, y = _digits()
    gain = np.ones((len(x), 1, 1, 1), np.float32)
    onnx.save(_with_gain(trained), d / "two.onnx")
    np.savez(d / "xy.npz", image=x, gain=gain, y=y)
    np.savez(d / "x.npz", image=x, gain=gain)
    return d, trained, d / "two.onnx", d / "xy.npz", d / "x.npz"


def _accuracy(model, feeds: dict, y) -> float:
    logits = run_model(model, feeds)[0]
    return float((logits.argmax(1) == y).mean())


def _report(path):
    return json.loads(path.with_suffix(".report.json").read_text())


def test_evaluate_reads_every_input_from_the_npz(two, capsys):
    d, one, model, xy, _ = two
    x, y = _digits()
    want = _accuracy(model, {"image": x, "gain": np.ones((len(x), 1, 1, 1), np.float32)}, y)
    assert want > 0.85          # the trained net, unchanged by the unit gain
    assert main(["evaluate", str(model), "--data", str(xy)]) == 0
    assert f"top-1 accuracy {want:.4f} on {len(y)} images" in capsys.readouterr().out
    # the gain reaches the model: halved, the accuracy is that of the halved images
    half = np.full((len(x), 1, 1, 1), 0.5, np.float32)
    np.savez(d / "half.npz", image=x, gain=half, y=y)
    assert main(["evaluate", str(model), "--data", str(d / "half.npz")]) == 0
    got = capsys.readouterr().out
    assert f"top-1 accuracy {_accuracy(one, {'input': x * 0.5}, y):.4f}" in got


@pytest.mark.parametrize("extra", [[], ["--criterion", "taylor", "--finetune-epochs", "1"]],
                         ids=["gpp", "taylor-finetune"])
def test_prune_with_labels_cuts_as_the_one_input_net_does(two, extra, tmp_path):
    """Criterion, repair and fine-tuning see the same numbers through both inputs: the cut
    and the written model's accuracy equal the one-input net's on --data digits."""
    _, one, model, xy, _ = two
    common = ["--ratio", "0.5", "--no-latency", "--round-to", "1", *extra]
    a, b = tmp_path / "one.onnx", tmp_path / "two.onnx"
    assert main(["prune", str(one), "--data", "digits", "-o", str(a), *common]) == 0
    assert main(["prune", str(model), "--data", str(xy), "-o", str(b), *common]) == 0
    ra, rb = _report(a), _report(b)
    assert rb["plan"]["removed"] == ra["plan"]["removed"]
    assert sum(len(v) for v in rb["plan"]["removed"].values()) > 0
    x, y = _digits()
    got = _accuracy(b, {"image": x, "gain": np.ones((len(x), 1, 1, 1), np.float32)}, y)
    assert got == pytest.approx(_accuracy(a, {"input": x}, y), abs=2 / len(y))


def test_prune_without_labels_distils_through_both_inputs(two, tmp_path):
    """--no-labels: the fisher criterion, the repair and distillation on the x-only .npz
    give the fidelity the one-input net gets on the digits without their labels."""
    _, one, model, _, xo = two
    common = ["--ratio", "0.5", "--no-latency", "--round-to", "1", "--finetune-epochs", "1"]
    a, b = tmp_path / "one.onnx", tmp_path / "two.onnx"
    assert main(["prune", str(one), "--data", "digits", "--no-labels", "-o", str(a),
                 *common]) == 0
    assert main(["prune", str(model), "--data", str(xo), "-o", str(b), *common]) == 0
    ra, rb = _report(a), _report(b)
    assert rb["plan"]["removed"] == ra["plan"]["removed"]
    fa, fb = ra["fidelity"], rb["fidelity"]
    assert list(fa) == list(fb) and len(fa) >= 3        # before, cut, repair/fine-tune
    for stage in fa:
        for out in fa[stage]:
            for key, value in fa[stage][out].items():
                assert fb[stage][out][key] == pytest.approx(value, abs=1e-4), (stage, key)


def test_compare_reports_the_agreement_onnxruntime_measures(two, tmp_path, capsys):
    d, _, model, _, xo = two
    out = tmp_path / "p.onnx"
    assert main(["prune", str(model), "-o", str(out), "--ratio", "0.5", "--no-latency"]) == 0
    capsys.readouterr()
    assert main(["compare", str(model), str(out), "--data", str(xo)]) == 0
    text = capsys.readouterr().out
    x, _ = _digits()
    feeds = {"image": x, "gain": np.ones((len(x), 1, 1, 1), np.float32)}
    want = run_model(model, feeds)[0].argmax(1) == run_model(out, feeds)[0].argmax(1)
    line = next(s for s in text.splitlines() if "top-1 agreement" in s)
    assert float(line.split()[-1]) == pytest.approx(want.mean(), abs=5e-5)


def test_an_integer_input_takes_integers(trained, tmp_path, capsys):
    model = tmp_path / "int.onnx"
    onnx.save(_with_gain(trained, TensorProto.INT64), model)
    x, y = _digits()
    np.savez(tmp_path / "ints.npz", image=x, gain=np.ones((len(x), 1, 1, 1), np.int64), y=y)
    assert main(["evaluate", str(model), "--data", str(tmp_path / "ints.npz")]) == 0
    feeds = {"image": x, "gain": np.ones((len(x), 1, 1, 1), np.int64)}
    assert f"top-1 accuracy {_accuracy(model, feeds, y):.4f}" in capsys.readouterr().out
    np.savez(tmp_path / "floats.npz", image=x, gain=np.ones((len(x), 1, 1, 1), np.float32), y=y)
    assert main(["evaluate", str(model), "--data", str(tmp_path / "floats.npz")]) == 2
    err = capsys.readouterr().err
    assert "gain has dtype float32 but input 'gain' takes int64; store integers" in err


@pytest.mark.parametrize("batch", [None, 4], ids=["free-batch", "fixed-batch-4"])
def test_free_sizes_are_taken_from_the_arrays(batch, tmp_path, capsys):
    """A model with several inputs whose sides are free runs at its arrays' sizes, at the
    batch it fixes where it fixes one (the probe ran at batch 1, which such a model
    refused)."""
    from test_load_forms import _two_inputs

    model = _two_inputs()
    for value in (*model.graph.input, *model.graph.output) if batch else ():
        value.type.tensor_type.shape.dim[0].dim_value = batch
    src = tmp_path / "two.onnx"
    onnx.save(model, src)
    rng = np.random.default_rng(0)
    feeds = {"input": rng.normal(size=(32, 3, 8, 8)).astype(np.float32),
             "aux": rng.normal(size=(32, 3, 4, 4)).astype(np.float32)}
    y = rng.integers(0, 4, 32)
    np.savez(tmp_path / "d.npz", **feeds, y=y)
    assert main(["evaluate", str(src), "--data", str(tmp_path / "d.npz")]) == 0
    logits = np.concatenate([run_model(model, {k: v[i:i + 4] for k, v in feeds.items()})[0]
                             for i in range(0, 32, 4)])
    assert f"top-1 accuracy {(logits.argmax(1) == y).mean():.4f}" in capsys.readouterr().out


def _bad_sources(d):
    x, y = _digits()
    ones = np.ones((len(x), 1, 1, 1), np.float32)
    np.savez(d / "no_gain.npz", image=x, y=y)
    np.savez(d / "flat_gain.npz", image=x, gain=ones.reshape(-1, 1), y=y)
    np.savez(d / "short.npz", image=x, gain=ones[:-1], y=y)
    np.savez(d / "x_only.npz", x=x, y=y)
    nan = x.copy()
    nan[5, 0, 3, 3] = np.nan
    np.savez(d / "nan.npz", image=nan, gain=ones, y=y)
    return [
        ("digits", "--data digits is not an .npz but must hold the model's inputs image, "
                   "gain - give an .npz with one array per input"),
        (str(d / "no_gain.npz"), "no array 'gain' (found: image, y); store one array per "
                                 "input, named as the inputs: numpy.savez(path, image=..., "
                                 "gain=..., y=labels)"),
        (str(d / "x_only.npz"), "no array 'image', 'gain'"),
        (str(d / "flat_gain.npz"), "gain holds samples of shape (1,) but input 'gain' takes "
                                   "(1, 1, 1)"),
        (str(d / "short.npz"), "hold different numbers of samples (image 1797, gain 1796)"),
        (str(d / "nan.npz"), "image holds NaN or infinite values (sample 5); clean or drop"),
    ]


@pytest.mark.parametrize("command", ["prune", "evaluate"])
def test_bad_sources_are_one_line_exit_2_nothing_written(two, command, tmp_path, capsys):
    _, _, model, _, _ = two
    for source, message in _bad_sources(tmp_path):
        out = tmp_path / "p.onnx"
        extra = ["-o", str(out), "--no-latency"] if command == "prune" else []
        before = sorted(p.name for p in tmp_path.iterdir())
        assert main([command, str(model), "--data", source, *extra]) == 2, source
        lines = capsys.readouterr().err.strip().splitlines()
        errors = [s for s in lines if s.startswith("gpp-onnx: error:")]
        assert len(errors) == 1 and lines[-1] == errors[0], lines
        assert message in errors[0], (message, errors[0])
        assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_nan_values_are_refused_before_any_work(two, tmp_path, capsys):
    """NaN in training rows reached the repair's least squares (an internal error with
    --criterion l1); in a held-out row, the fidelity printed nan and the model was written."""
    _, _, model, _, _ = two
    x, _ = _digits()
    x[:2, 0, 3, 3] = np.nan
    np.savez(tmp_path / "nan.npz", image=x, gain=np.ones((len(x), 1, 1, 1), np.float32))
    out = tmp_path / "p.onnx"
    assert main(["prune", str(model), "--data", str(tmp_path / "nan.npz"), "--criterion", "l1",
                 "--ratio", "0.5", "--no-latency", "-o", str(out)]) == 2
    assert "image holds NaN or infinite values (sample 0)" in capsys.readouterr().err
    assert not out.exists()


def test_a_float16_input_is_fed_its_type(two, tmp_path, capsys):
    """Float arrays are fed float32 and cast where an input declares float16."""
    _, _, model, xy, _ = two
    m = onnx.load(str(model))
    m.graph.input[1].type.tensor_type.elem_type = TensorProto.FLOAT16
    m.graph.node.insert(0, helper.make_node("Cast", ["gain"], ["gain32"], to=TensorProto.FLOAT))
    mul = next(n for n in m.graph.node if n.op_type == "Mul" and "gain" in n.input)
    mul.input[:] = ["gain32" if s == "gain" else s for s in mul.input]
    path = tmp_path / "half_gain.onnx"
    onnx.save(m, path)
    x, y = _digits()
    assert main(["evaluate", str(path), "--data", str(xy)]) == 0
    want = _accuracy(path, {"image": x, "gain": np.ones((len(x), 1, 1, 1), np.float16)}, y)
    assert f"top-1 accuracy {want:.4f}" in capsys.readouterr().out
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.type for i in session.get_inputs()] == ["tensor(float)", "tensor(float16)"]


def test_an_input_named_y_takes_the_array_y_and_the_run_goes_without_labels(two, tmp_path,
                                                                            capsys):
    """The .npz's y is the input's array, not labels: prune runs label-free (the plan of the
    one-input net with --no-labels), evaluate asks for a command that needs none."""
    _, one, model, _, _ = two
    m = onnx.load(str(model))
    m.graph.input[1].name = "y"
    for node in m.graph.node:
        node.input[:] = ["y" if s == "gain" else s for s in node.input]
    src = tmp_path / "named_y.onnx"
    onnx.save(m, src)
    x, _ = _digits()
    np.savez(tmp_path / "d.npz", image=x, y=np.ones((len(x), 1, 1, 1), np.float32))
    common = ["--ratio", "0.5", "--no-latency", "--round-to", "1"]
    a, b = tmp_path / "one.onnx", tmp_path / "b.onnx"
    assert main(["prune", str(one), "--data", "digits", "--no-labels", "-o", str(a),
                 *common]) == 0
    assert main(["prune", str(src), "--data", str(tmp_path / "d.npz"), "-o", str(b),
                 *common]) == 0
    assert _report(b)["plan"]["removed"] == _report(a)["plan"]["removed"]
    capsys.readouterr()
    assert main(["evaluate", str(src), "--data", str(tmp_path / "d.npz")]) == 2
    assert "input 'y' takes the array y, so the .npz holds no labels" in capsys.readouterr().err


def _with_temperature(path) -> onnx.ModelProto:
    """The one-input net at `path` taking (temperature, image, bias): its logits / t + bias,
    t a scalar and bias (1, 10), neither with a batch axis."""
    model = onnx.load(str(path))
    out = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = ["logits" if s == out else s for s in node.output]
    model.graph.node.extend([helper.make_node("Div", ["logits", "t"], ["cooled"]),
                             helper.make_node("Add", ["cooled", "bias"], [out])])
    image = model.graph.input[0]
    image.name, old = "image", image.name
    for node in model.graph.node:
        node.input[:] = ["image" if s == old else s for s in node.input]
    model.graph.input.insert(0, helper.make_tensor_value_info("t", TensorProto.FLOAT, []))
    model.graph.input.append(helper.make_tensor_value_info("bias", TensorProto.FLOAT, [1, 10]))
    onnx.checker.check_model(model, full_check=True)
    return model


def test_inputs_without_a_batch_axis_are_fed_whole(trained, tmp_path, capsys):
    """A scalar and a (1, 10) input take one array each, fed with every batch: the net then
    cuts as the one-input net does, and the arrays' values reach it."""
    src = tmp_path / "t.onnx"
    onnx.save(_with_temperature(trained), src)
    x, y = _digits()
    np.savez(tmp_path / "d.npz", image=x, t=np.float32(1.0), bias=np.zeros((1, 10), np.float32),
             y=y)
    # the head is no longer a lone linear layer: the final hidden layer is named
    hidden = next(n.input[0] for n in reversed(onnx.load(str(trained)).graph.node)
                  if n.op_type == "Gemm")
    common = ["--ratio", "0.5", "--no-latency", "--round-to", "1", "--feature-tensor", hidden]
    a, b = tmp_path / "one.onnx", tmp_path / "b.onnx"
    assert main(["prune", str(trained), "--data", "digits", "-o", str(a), *common]) == 0
    assert main(["prune", str(src), "--data", str(tmp_path / "d.npz"), "-o", str(b),
                 *common]) == 0
    assert _report(b)["plan"]["removed"] == _report(a)["plan"]["removed"]
    # a bias that favours class 3 reaches the model: the accuracy onnxruntime gives it
    bias = np.zeros((1, 10), np.float32)
    bias[0, 3] = 2.0
    np.savez(tmp_path / "b3.npz", image=x, t=np.float32(2.0), bias=bias, y=y)
    capsys.readouterr()
    assert main(["evaluate", str(src), "--data", str(tmp_path / "b3.npz")]) == 0
    want = _accuracy(src, {"image": x, "t": np.array(2.0, np.float32), "bias": bias}, y)
    assert want < _accuracy(src, {"image": x, "t": np.array(1.0, np.float32),
                                  "bias": np.zeros((1, 10), np.float32)}, y)
    assert f"top-1 accuracy {want:.4f}" in capsys.readouterr().out
    # stored per sample, the scalar is refused with the shape it takes
    np.savez(tmp_path / "rows.npz", image=x, t=np.ones(len(x), np.float32),
             bias=np.zeros((1, 10), np.float32), y=y)
    assert main(["evaluate", str(src), "--data", str(tmp_path / "rows.npz")]) == 2
    assert ("t has shape (1797,) but input 't' has no batch axis and takes () whole"
            in capsys.readouterr().err)


def test_an_input_beside_images_an_export_fixed_at_batch_4_is_fed_whole(trained, tmp_path,
                                                                           capsys):
    """Every input fixes dim 0 (an export at batch 4): the (1, 10) bias has no batch axis
    and takes one array, as beside a free batch (it was counted as 1 sample of 1797)."""
    model = _with_temperature(trained)
    for value in (model.graph.input[1], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = 4
    src = tmp_path / "b4.onnx"
    onnx.save(model, src)
    x, y = _digits()
    bias = np.zeros((1, 10), np.float32)
    bias[0, 3] = 2.0
    np.savez(tmp_path / "d.npz", t=np.float32(2.0), image=x, bias=bias, y=y)
    assert main(["evaluate", str(src), "--data", str(tmp_path / "d.npz")]) == 0
    padded = np.concatenate([x, np.zeros((3, *x.shape[1:]), np.float32)])
    logits = np.concatenate([run_model(src, {"t": np.array(2.0, np.float32), "bias": bias,
                                             "image": padded[i:i + 4]})[0]
                             for i in range(0, len(x), 4)])[:len(x)]
    assert f"top-1 accuracy {(logits.argmax(1) == y).mean():.4f}" in capsys.readouterr().out


def test_a_model_whose_inputs_have_no_batch_axis_takes_no_data(tmp_path, capsys):
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["s"])], "scalars",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, []) for n in ("a", "b")],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, [])])
    src = tmp_path / "s.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                ir_version=8), src)
    np.savez(tmp_path / "d.npz", a=np.float32(1), b=np.float32(2))
    assert main(["compare", str(src), str(src), "--data", str(tmp_path / "d.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("gpp-onnx: error: none of the model's inputs (a, b) has a "
                              "batch axis")


# -- images for one input, --feed for the others -------------------------------------------
def test_feed_gives_the_other_inputs_beside_images(two, tmp_path, capsys):
    """`--data digits --feed gain=1`: the images feed `image`, the gain is 1 for every
    sample; the net cuts as the one-input net does, and a gain of 0.5 reaches it."""
    _, one, model, _, _ = two
    common = ["--ratio", "0.5", "--no-latency", "--round-to", "1"]
    a, b = tmp_path / "one.onnx", tmp_path / "two.onnx"
    assert main(["prune", str(one), "--data", "digits", "-o", str(a), *common]) == 0
    assert main(["prune", str(model), "--data", "digits", "--feed", "gain=1", "-o", str(b),
                 *common]) == 0
    assert _report(b)["plan"]["removed"] == _report(a)["plan"]["removed"]
    capsys.readouterr()
    x, y = _digits()
    assert main(["evaluate", str(model), "--data", "digits", "--feed", "gain=0.5"]) == 0
    assert f"top-1 accuracy {_accuracy(one, {'input': x * 0.5}, y):.4f}" in \
        capsys.readouterr().out


def test_feed_with_an_image_folder_read_by_worker_processes(two, tmp_path, capsys):
    """Decoded by DataLoader workers, the batches carry the fed input too."""
    from PIL import Image

    _, _, model, _, _ = two
    x, y = _digits()
    for i in range(120):
        folder = tmp_path / "images" / str(y[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((x[i, 0] * 255).round().astype(np.uint8)).save(folder / f"{i}.png")
    assert main(["evaluate", str(model), "--data", str(tmp_path / "images"), "--feed",
                 "gain=1", "--workers", "2", "--batch-size", "16"]) == 0
    pixels = (x[:120] * 255).round() / 255
    classes = sorted(str(c) for c in set(y[:120]))       # folders sorted by name
    labels = np.array([classes.index(str(c)) for c in y[:120]])
    logits = run_model(model, {"image": pixels.astype(np.float32),
                               "gain": np.ones((120, 1, 1, 1), np.float32)})[0]
    assert sorted(classes, key=int) == classes            # the digits sort as numbers too
    want = float((logits.argmax(1) == labels).mean())
    assert f"top-1 accuracy {want:.4f} on 120 images" in capsys.readouterr().out


@pytest.mark.parametrize("extra,message", [
    (["--feed", "nope=1"], "--feed names 'nope', which is not an input of the model - its "
                           "inputs are image, gain"),
    (["--feed", "gain=1,2"], "--feed gain has 2 values but input 'gain' takes (1, 1, 1) per "
                             "sample: give 1 (or one for all)"),
    (["--feed", "gain=1", "--feed", "image=0"], "--feed gives every input (image, gain)"),
    (["--feed", "gain=nan"], "is not NAME=VALUES"),
])
def test_bad_feeds_are_one_line_exit_2(two, extra, message, tmp_path, capsys):
    _, _, model, _, _ = two
    out = tmp_path / "p.onnx"
    try:
        code = main(["prune", str(model), "--data", "digits", "-o", str(out), "--no-latency",
                     *extra])
    except SystemExit as stop:       # the option's form, refused by the parser
        code = stop.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and not out.exists()


def test_feed_on_a_one_input_model_or_a_non_integer_for_an_integer_input(two, trained,
                                                                         tmp_path, capsys):
    assert main(["evaluate", str(trained), "--data", "digits", "--feed", "gain=1"]) == 2
    assert "--feed gives the inputs of a model with several, and this one has one" in \
        capsys.readouterr().err
    src = tmp_path / "int.onnx"
    onnx.save(_with_gain(trained, TensorProto.INT64), src)
    assert main(["evaluate", str(src), "--data", "digits", "--feed", "gain=1.5"]) == 2
    assert "input 'gain' takes int64 values; give whole numbers" in capsys.readouterr().err
    x, y = _digits()
    assert main(["evaluate", str(src), "--data", "digits", "--feed", "gain=2"]) == 0
    feeds = {"image": x, "gain": np.full((len(x), 1, 1, 1), 2, np.int64)}
    assert f"top-1 accuracy {_accuracy(src, feeds, y):.4f}" in capsys.readouterr().out


def test_feed_fills_a_scalar_and_an_input_of_several_axes(trained, tmp_path, capsys):
    """--feed on a scalar input (t, shape ()) and on the (1, 10) bias given all ten values:
    both reach the model (a ValueError from numpy's broadcast before)."""
    src = tmp_path / "t.onnx"
    onnx.save(_with_temperature(trained), src)
    x, y = _digits()
    bias = np.zeros((1, 10), np.float32)
    bias[0, 3] = 2.0
    assert main(["evaluate", str(src), "--data", "digits", "--feed", "t=2",
                 "--feed", "bias=" + ",".join(str(v) for v in bias.ravel())]) == 0
    want = _accuracy(src, {"image": x, "t": np.array(2.0, np.float32), "bias": bias}, y)
    assert f"top-1 accuracy {want:.4f}" in capsys.readouterr().out
    # a per-sample input of two axes, (N, 2, 5), given its ten values
    model = _with_temperature(trained)
    model.graph.input[2].type.tensor_type.shape.Clear()
    for d in ("N", 2, 5):
        dim = model.graph.input[2].type.tensor_type.shape.dim.add()
        if isinstance(d, str):
            dim.dim_param = d
        else:
            dim.dim_value = d
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([-1, 10]), "shp"))
    model.graph.node.insert(0, helper.make_node("Reshape", ["bias", "shp"], ["bias10"]))
    add = next(n for n in model.graph.node if n.op_type == "Add" and "bias" in n.input)
    add.input[:] = ["bias10" if s == "bias" else s for s in add.input]
    src = tmp_path / "rows.onnx"
    onnx.save(model, src)
    assert main(["evaluate", str(src), "--data", "digits", "--feed", "t=2",
                 "--feed", "bias=" + ",".join(str(v) for v in bias.ravel())]) == 0
    want = _accuracy(src, {"image": x, "t": np.array(2.0, np.float32),
                           "bias": np.repeat(bias.reshape(1, 2, 5), len(x), 0)}, y)
    assert f"top-1 accuracy {want:.4f}" in capsys.readouterr().out


def test_two_values_for_one_input_are_refused(two, tmp_path, capsys):
    """Two --feed of one input, or a --feed of an input the .npz holds: one line, exit 2,
    nothing written (the last --feed, and the --feed over the file's array, were taken)."""
    _, _, model, xy, _ = two
    out = tmp_path / "p.onnx"
    for data, feeds, message in (
            ("digits", ["gain=1", "gain=0.5"], "--feed gives 'gain' twice"),
            (str(xy), ["gain=0.5"], f"--feed gives 'gain', which {xy} also holds")):
        for command in (["prune", "-o", str(out), "--no-latency"], ["evaluate"]):
            args = [command[0], str(model), "--data", data, *command[1:]]
            for feed in feeds:
                args += ["--feed", feed]
            assert main(args) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert message in err[-1] and err[-1].startswith("gpp-onnx: error:"), err
            assert not out.exists()


@pytest.mark.parametrize("gain_type,value,message", [
    (TensorProto.FLOAT, "1e40", "input 'gain' takes float32 values from -3.40282e+38 to "
                                "3.40282e+38"),
    (TensorProto.UINT8, "300", "input 'gain' takes uint8 values from 0 to 255"),
    (TensorProto.INT64, "1e20", "input 'gain' takes int64 values from"),
])
def test_a_value_the_input_type_cannot_hold_is_refused(trained, gain_type, value, message,
                                                       tmp_path, capsys):
    """It was cast on: inf for a float32 input (a nan fidelity in a written report), 44 for
    300 in a uint8 input, -2**63 for 1e20 in an int64 input."""
    src = tmp_path / "g.onnx"
    onnx.save(_with_gain(trained, gain_type), src)
    out = tmp_path / "p.onnx"
    assert main(["prune", str(src), "--data", "digits", "--feed", f"gain={value}",
                 "--criterion", "taylor", "--no-latency", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and not out.exists(), err


def test_a_nan_feed_from_python_is_refused(two, tmp_path):
    from gpp_onnx import prune
    from gpp_onnx.config import DataOptions
    from gpp_onnx.errors import DataError

    _, _, model, _, _ = two
    with pytest.raises(DataError, match="input 'gain' takes float32 values"):
        prune(str(model), str(tmp_path / "p.onnx"),
              data=DataOptions("digits", feeds={"gain": float("nan")}), latency=False)
    assert not (tmp_path / "p.onnx").exists()


def test_feed_beside_an_npz_of_images_as_x(two, tmp_path, capsys):
    """An .npz with x (and y) is an image source like the others: beside --feed it feeds
    the one input left, as digits does (it was asked for an array named 'image')."""
    _, one, model, _, _ = two
    x, y = _digits()
    np.savez(tmp_path / "xy.npz", x=x, y=y)
    assert main(["evaluate", str(model), "--data", str(tmp_path / "xy.npz"), "--feed",
                 "gain=0.5"]) == 0
    assert f"top-1 accuracy {_accuracy(one, {'input': x * 0.5}, y):.4f} on {len(y)} images" \
        in capsys.readouterr().out
    out = tmp_path / "p.onnx"
    assert main(["prune", str(model), "--data", str(tmp_path / "xy.npz"), "--feed", "gain=1",
                 "--ratio", "0.5", "--no-latency", "-o", str(out)]) == 0
    assert out.exists()


@pytest.mark.parametrize("option", [["--feed", "gain=1"], ["--mean", "0.5"], ["--limit", "10"],
                                    ["--workers", "0"], ["--no-labels"], ["--no-resize"]])
def test_data_options_without_data_are_refused(two, option, tmp_path, capsys):
    """They were ignored: a --feed or --mean given without --data changed nothing and said
    nothing."""
    _, _, model, _, _ = two
    out = tmp_path / "p.onnx"
    assert main(["prune", str(model), "-o", str(out), "--no-latency", *option]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"gpp-onnx: error: {option[0]} says how to read the data, and no "
                       "--data was given - add --data or leave it out")
    assert not out.exists()
