"""Bad labelled data and unsuitable models for data-driven pruning: one-line error, exit 2,
nothing written."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from gpp_onnx.cli import main
from gpp_onnx.samples import GraphBuilder


def _cnn(classes=3, size=8, channels=1, head="gemm"):
    b = GraphBuilder((1, channels, size, size), seed=0)
    x = b.act(b.conv("input", 6), "Relu")
    if head == "gemm":
        return b.build(b.gemm(b.flatten(b.gap(x)), classes))
    if head == "pooled_conv":  # Gluon's MobileNet: 1x1 conv on the pooled map, Flatten
        return b.build(b.flatten(b.conv(b.gap(x), classes, k=1)))
    return b.build(b.flatten(b.gap(b.conv(x, classes, k=1))))  # conv classifier, no Gemm


def _npz(path, n=30, classes=3, size=8, channels=None, labels=True, nan=False):
    rng = np.random.default_rng(0)
    shape = (n, size, size) if channels is None else (n, size, size, channels)
    x = rng.integers(0, 255, shape).astype(np.uint8 if not nan else np.float32)
    if nan:
        x[0, 0, 0] = np.nan
    arrays = {"x": x}
    if labels:
        arrays["y"] = np.arange(n) % classes
    np.savez(path, **arrays)
    return path


def _prune(tmp_path, capsys, model, data, extra=()):
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(model, src)
    code = main(["prune", str(src), "-o", str(out), "--data", str(data), "--no-latency",
                 *extra])
    lines = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in lines)
    assert not out.exists() and not (tmp_path / "o.report.json").exists()
    return code, lines[-1] if lines else ""


@pytest.mark.parametrize("kind,message", [
    ("no_labels", "needs labels"),
    ("one_class", "class"),
    ("labels_too_big", "label"),
    ("label_corrupt", "no class index"),
    ("wrong_channels", "channel"),
    ("nan", "NaN"),
])
def test_bad_data(kind, message, tmp_path, capsys):
    data = tmp_path / "d.npz"
    if kind == "no_labels":
        _npz(data, labels=False)
    elif kind == "one_class":
        _npz(data, classes=1)
    elif kind == "labels_too_big":
        _npz(data, classes=5)
    elif kind == "label_corrupt":   # -1 stored as uint32: ran out of memory naming classes
        y = (np.arange(30) % 3).astype(np.uint32)
        y[4] = np.uint32(0xFFFFFFFF)
        np.savez(data, x=np.load(_npz(data))["x"], y=y)
    elif kind == "wrong_channels":
        _npz(data, channels=3)
    else:
        _npz(data, nan=True)
    extra = ["--criterion", "gpp"] if kind == "no_labels" else []  # a criterion with labels
    code, err = _prune(tmp_path, capsys, _cnn(), data, extra)
    assert code == 2 and err.startswith("gpp-onnx: error:") and message.lower() in err.lower()


def test_wrong_image_size_without_resize(tmp_path, capsys):
    data = _npz(tmp_path / "d.npz", size=12)
    code, err = _prune(tmp_path, capsys, _cnn(), data, ["--no-resize"])
    assert code == 2 and "12" in err and "8" in err


def test_last_layer_not_linear_names_the_way_out(tmp_path, capsys):
    data = _npz(tmp_path / "d.npz")
    code, err = _prune(tmp_path, capsys, _cnn(head="conv"), data)
    assert code == 2 and "--feature-tensor" in err
    # the conv classifier's input, the name the next test passes, and the other way out
    assert "'relu2'" in err and "--criterion taylor or l1" in err


def test_feature_tensor_override_unknown_name(tmp_path, capsys):
    data = _npz(tmp_path / "d.npz")
    code, err = _prune(tmp_path, capsys, _cnn(), data, ["--feature-tensor", "nope"])
    assert code == 2 and "nope" in err


def test_feature_tensor_override_makes_a_conv_classifier_usable(tmp_path, capsys):
    data = _npz(tmp_path / "d.npz")
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(_cnn(head="conv"), src)
    assert main(["-q", "prune", str(src), "-o", str(out), "--data", str(data), "--no-latency",
                 "--feature-tensor", "relu2"]) == 0
    assert out.exists()


def test_a_1x1_conv_on_the_pooled_map_is_a_linear_classifier(tmp_path, capsys):
    """Gluon's MobileNet v1/v2 end in pool -> 1x1 conv -> Flatten: linear in the pooled
    channels like a Gemm, but the default criterion refused them (exit 2)."""
    data = _npz(tmp_path / "d.npz")
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(_cnn(head="pooled_conv"), src)
    assert main(["-q", "prune", str(src), "-o", str(out), "--data", str(data), "--no-latency",
                 "--round-to", "1"]) == 0
    assert out.exists()


def test_data_criterion_without_data(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(_cnn(), src)
    assert main(["prune", str(src), "-o", str(tmp_path / "o.onnx"), "--criterion", "gpp"]) == 2
    assert "--data" in capsys.readouterr().err


def test_evaluate_reports_accuracy(tmp_path, capsys):
    data = _npz(tmp_path / "d.npz")
    src = tmp_path / "m.onnx"
    onnx.save(_cnn(), src)
    assert main(["evaluate", str(src), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    acc = float(out.split()[2])
    assert 0.0 <= acc <= 1.0 and "30 images" in out


def test_conv_classifier_works_with_data_for_criteria_without_features(tmp_path, capsys):
    data = _npz(tmp_path / "d.npz")
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(_cnn(head="conv"), src)
    assert main(["-q", "prune", str(src), "-o", str(out), "--data", str(data), "--no-latency",
                 "--criterion", "taylor"]) == 0


@pytest.mark.parametrize("workers", ["0", "1"])
def test_image_that_fails_to_decode_is_one_line(tmp_path, capsys, workers):
    """A truncated JPEG passes the header probe and fails when its batch is decoded, in a
    worker process too: one line naming the file, exit 2 (not the worker's traceback)."""
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for c in range(3):
        (tmp_path / "d" / f"c{c}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (8, 8), np.uint8)).save(
                tmp_path / "d" / f"c{c}" / f"{i}.png")
    whole = tmp_path / "whole.jpg"
    Image.fromarray(rng.integers(0, 256, (64, 64), np.uint8)).save(whole)
    (tmp_path / "d" / "c1" / "cut.jpg").write_bytes(whole.read_bytes()[:400])
    src = tmp_path / "m.onnx"
    onnx.save(_cnn(), src)
    code = main(["evaluate", str(src), "--data", str(tmp_path / "d"), "--workers", workers,
                 "--batch-size", "4"])  # several batches: the workers take them
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("gpp-onnx: error: cannot read image")
    assert "cut.jpg" in lines[-1] and not any("Traceback" in line for line in lines)


def test_image_too_large_for_pillow_is_one_line(tmp_path, capsys):
    """A file Pillow refuses as a decompression bomb (here 20000x20000 px) is a bad input:
    one line naming it, exit 2, not an internal error."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xffffffff)

    pytest.importorskip("PIL.Image")
    data = tmp_path / "d"
    for c in range(3):
        (data / f"c{c}").mkdir(parents=True)
        (data / f"c{c}" / "0.png").write_bytes(
            b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 72)) + chunk(b"IEND", b""))
    (data / "c0" / "huge.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))
    src = tmp_path / "m.onnx"
    onnx.save(_cnn(), src)
    code = main(["evaluate", str(src), "--data", str(data), "--workers", "0"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("gpp-onnx: error:") and "huge.png" in err


@pytest.mark.parametrize("splits", [("train", "val"), ("train",)])
def test_dataset_root_given_for_a_split_names_the_split(tmp_path, capsys, splits):
    """ImageNet's layout, root/train/<class>/*.png: the root would be read as the classes
    'train' and 'val' (or one class): refused, naming root/train."""
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    root = tmp_path / "d"
    for split in splits:
        for c in range(3):
            (root / split / f"c{c}").mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (8, 8), np.uint8)).save(
                root / split / f"c{c}" / "0.png")
    code, err = _prune(tmp_path, capsys, _cnn(), root, ["--ratio", "0.5"])
    assert code == 2 and f"--data {root / 'train'}" in err


def test_classes_named_like_splits_that_hold_images_are_classes(tmp_path, capsys):
    """Class folders named 'train' and 'test' that hold images directly stay classes."""
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for name in ("train", "test", "val"):
        (tmp_path / "d" / name / "more").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (8, 8), np.uint8)).save(
                tmp_path / "d" / name / f"{i}.png")
    src = tmp_path / "m.onnx"
    onnx.save(_cnn(), src)
    assert main(["evaluate", str(src), "--data", str(tmp_path / "d")]) == 0


def test_limit_below_the_classes_names_limit(tmp_path, capsys):
    """5 images of each of 10 classes, --limit 8: one image of 8 classes, none to hold out;
    the error named the data ('give two or more of a class'), which had them."""
    data = _npz(tmp_path / "d.npz", n=50, classes=10)
    code, err = _prune(tmp_path, capsys, _cnn(classes=10), data, ["--limit", "8"])
    assert code == 2 and "--limit 8" in err and "raise --limit" in err


def test_per_position_output_with_labels_says_so_before_the_feature(tmp_path, capsys):
    """A CTC-style (N, T, K) output and labelled data: the refusal says a classifier gives
    (N, classes), with or without --feature-tensor (the first error sent the user to
    --feature-tensor, which only led to this one)."""
    b = GraphBuilder((1, 1, 8, 8), seed=0)
    x = b.act(b.conv("input", 6), "Relu")
    x = b.conv(b.op("MaxPool", [x], (1, 6, 1, 8), kernel_shape=[8, 1], strides=[8, 1]), 10, k=1)
    x = b.op("Squeeze", [x, b.const(np.array([2], dtype=np.int64))], (1, 10, 8))
    model = b.build(b.op("Transpose", [x], (1, 8, 10), perm=[0, 2, 1]))
    data = _npz(tmp_path / "d.npz", n=40, classes=10)
    for extra in ([], ["--feature-tensor", "relu2"]):
        code, err = _prune(tmp_path, capsys, model, data, extra)
        assert code == 2 and "a classifier gives (N, classes)" in err, err


def test_a_score_map_is_refused_with_the_batch_shown_and_a_way_out(tmp_path, capsys):
    """An output that is a map (N, 3, 8, 8), not class scores: the refusal showed the
    probe's batch of 1 and gave no way out. (A conv classifier's (N, classes, 1, 1) is
    read as its scores: tests/test_output_forms.py.)"""
    b = GraphBuilder((1, 1, 8, 8), seed=0)
    model = b.build(b.conv(b.act(b.conv("input", 6), "Relu"), 3, k=1))
    code, err = _prune(tmp_path, capsys, model, _npz(tmp_path / "d.npz"))
    assert code == 2 and "(N, 3, 8, 8)" in err and "--no-labels" in err


def test_evaluate_on_a_score_map_names_a_command_that_takes_no_labels(tmp_path, capsys):
    """evaluate (accuracy: labels are its point) was told to use --no-labels, an option it
    does not have; the refusal now names the commands that work without labels."""
    b = GraphBuilder((1, 1, 8, 8), seed=0)
    src = tmp_path / "m.onnx"
    onnx.save(b.build(b.conv(b.act(b.conv("input", 6), "Relu"), 3, k=1)), src)
    assert main(["evaluate", str(src), "--data", str(_npz(tmp_path / "d.npz"))]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "(N, 3, 8, 8)" in err and "compare A B --data" in err
