"""Tests of gpp_onnx.data: every source format, adaptation, splits, batching and each DataError."""
from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpp_onnx import data, sources
from gpp_onnx.data import (DataSpec, Dataset, check_labels, iter_batches, load_dataset,
                           resize_bilinear, split)
from gpp_onnx.errors import DataError, GppError

Image = pytest.importorskip("PIL.Image")

FASHION_PRESENT = (data.FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file() or \
    (data.FASHION_MNIST_DIR / "train-images-idx3-ubyte").is_file()


# ---------------------------------------------------------------- fixture writers

def write_png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def make_folder(root: Path, classes=("dog", "cat", "ant"), per_class=4, size=(10, 12),
                rgb=False) -> Path:
    """Class k's images are constant with value 40*k + i (uint8), so labels are checkable."""
    for k, name in enumerate(sorted(classes)):
        for i in range(per_class):
            value = np.uint8(40 * k + i)
            shape = size + (3,) if rgb else size
            write_png(root / name / f"img{i}.png", np.full(shape, value, np.uint8))
    return root


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.float32): 0x0D}[array.dtype]
    payload = struct.pack(">BBBB", 0, 0, code, array.ndim)
    payload += struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


def make_idx_pair(folder: Path, prefix="train", n=12, compress=False, size=(6, 7)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n,) + size, dtype=np.uint8)
    labels = (np.arange(n) % 3).astype(np.uint8)
    ext = ".gz" if compress else ""
    write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", images, compress)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", labels, compress)
    return folder / f"{prefix}-images-idx3-ubyte{ext}"


def spec(source, channels=1, height=10, width=12, **kw) -> DataSpec:
    return DataSpec(str(source), channels, height, width, **kw)


def assert_unit(ds: Dataset) -> None:
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64
    x = ds.x[:]
    assert x.min() >= 0.0 and x.max() <= 1.0


def raises(match: str):
    return pytest.raises(DataError, match=match)


# ---------------------------------------------------------------- ImageFolder

def test_image_folder_shapes_labels_and_scaling(tmp_path):
    root = make_folder(tmp_path / "imgs")
    ds = load_dataset(spec(root))
    assert ds.x.shape == (12, 1, 10, 12) and ds.y.shape == (12,)
    assert ds.classes == ("ant", "cat", "dog") and ds.num_classes == 3
    assert_unit(ds)
    expected = np.array([(40 * k + i) / 255 for k in range(3) for i in range(4)], np.float32)
    np.testing.assert_allclose(ds.x[:, 0, 0, 0], expected, rtol=1e-6)
    np.testing.assert_array_equal(ds.y, np.repeat([0, 1, 2], 4))
    assert isinstance(ds, Dataset) and ds.source == str(root)


def test_image_folder_grayscale_to_rgb_and_resize(tmp_path):
    root = make_folder(tmp_path / "imgs")
    ds = load_dataset(spec(root, channels=3, height=5, width=6))
    assert ds.x.shape == (12, 3, 5, 6)
    np.testing.assert_array_equal(ds.x[:, 0], ds.x[:, 1])
    np.testing.assert_array_equal(ds.x[:, 0], ds.x[:, 2])


def test_image_folder_rgb_and_jpeg_mixed_sizes(tmp_path):
    root = make_folder(tmp_path / "imgs", rgb=True)
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(root / "ant" / "big.jpg")
    ds = load_dataset(spec(root, channels=3, height=8, width=8))
    assert ds.x.shape == (13, 3, 8, 8)
    assert_unit(ds)


def test_image_folder_other_pil_modes(tmp_path):
    """16-bit grayscale, palette and RGBA files all come out white in [0, 1]."""
    root = tmp_path / "modes"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(root / "a" / "x16.png")
    with Image.open(root / "a" / "x16.png") as img:
        assert img.mode.startswith("I")
    Image.fromarray(np.full((4, 4, 3), 255, np.uint8)).convert("P").save(root / "b" / "pal.png")
    Image.fromarray(np.full((4, 4, 4), 255, np.uint8), mode="RGBA").save(root / "b" / "rgba.png")
    ds = load_dataset(spec(root, 3, 4, 4))
    assert ds.x.shape == (3, 3, 4, 4) and ds.y.tolist() == [0, 1, 1]
    np.testing.assert_allclose(ds.x[:], 1.0)


def test_sixteen_bit_files_are_scaled_by_their_format_not_their_brightest_pixel(tmp_path):
    """Two 16-bit files, brightest pixels 255 and 256: both divided by 65535, so images
    0.4% apart stay 0.4% apart (a per-file rule had put them 256x apart)."""
    for top in (255, 256):
        (tmp_path / "sixteen" / str(top)).mkdir(parents=True)
        Image.fromarray(np.array([[0, top]] * 2, np.uint16)).save(
            tmp_path / "sixteen" / str(top) / "x.png")
    ds = load_dataset(spec(tmp_path / "sixteen", 1, 2, 2))
    got = np.asarray(ds.x[:], np.float32)[:, 0, 0, 1]
    np.testing.assert_allclose(got, np.array([255, 256], np.float32) / 65535, rtol=1e-6)


def test_image_folder_rgb_for_one_channel_model_errors(tmp_path):
    root = make_folder(tmp_path / "imgs", rgb=True)
    with raises("3 channels but the model takes 1.*grayscale"):
        load_dataset(spec(root))


def test_size_mismatch_without_resize_names_sizes_and_flag(tmp_path):
    root = make_folder(tmp_path / "imgs")
    with raises(r"10x12 but the model takes 28x28.*drop --no-resize"):
        load_dataset(spec(root, height=28, width=28, resize=False))


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with raises("empty"):
        load_dataset(spec(tmp_path / "empty"))
    write_png(tmp_path / "loose" / "a.png", np.zeros((4, 4), np.uint8))
    with raises("no labels"):
        load_dataset(spec(tmp_path / "loose", labels=True))
    make_folder(tmp_path / "one", classes=("only",))
    with raises("only one class"):
        load_dataset(spec(tmp_path / "one"))
    root = make_folder(tmp_path / "bad")
    (root / "ant" / "broken.png").write_bytes(b"not a png")
    with raises("cannot read image.*broken.png"):
        load_dataset(spec(root))
    root = make_folder(tmp_path / "hole")
    (root / "zebra").mkdir()
    with raises("holds no images"):
        load_dataset(spec(root))


def test_missing_pillow_names_the_install(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs")
    monkeypatch.setitem(sys.modules, "PIL", None)
    with raises("pip install pillow"):
        load_dataset(spec(root))


# ---------------------------------------------------------------- npz

@pytest.mark.parametrize("layout", ["NHW", "NHWC", "NCHW"])
def test_npz_layouts(tmp_path, layout):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (9, 10, 12), dtype=np.uint8)
    arr = {"NHW": x, "NHWC": x[..., None], "NCHW": x[:, None]}[layout]
    np.savez(tmp_path / "d.npz", x=arr, y=np.arange(9) % 3)
    ds = load_dataset(spec(tmp_path / "d.npz"))
    assert ds.x.shape == (9, 1, 10, 12) and ds.classes == ("0", "1", "2")
    np.testing.assert_allclose(ds.x[:, 0], x / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y, np.arange(9) % 3)


def test_npz_float_rgb_with_names_and_normalisation(tmp_path):
    x = np.full((4, 8, 8, 3), 0.5, np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 1, 0, 1]), classes=np.array(["a", "b"]))
    ds = load_dataset(spec(tmp_path / "d.npz", 3, 8, 8, mean=(0.5, 0.25, 0.0), std=(1, 0.5, 2)))
    assert ds.classes == ("a", "b") and ds.x.shape == (4, 3, 8, 8)
    np.testing.assert_allclose(ds.x[0, :, 0, 0], [0.0, 0.5, 0.25])


def test_npz_float_0_255_is_scaled(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.full((2, 4, 4), 255.0), y=[0, 1])
    ds = load_dataset(spec(tmp_path / "d.npz", 1, 4, 4))
    np.testing.assert_allclose(ds.x[:], 1.0)


def test_npz_errors(tmp_path):
    x = np.zeros((4, 5, 5), np.uint8)
    cases = {
        "nolabels": ({"x": x}, "no labels"),
        "nox": ({"y": [0, 1, 0, 1]}, "no array 'x'"),
        "onecls": ({"x": x, "y": [2, 2, 2, 2]}, "only one class"),
        "neg": ({"x": x, "y": [0, -1, 0, 1]}, "negative label"),
        "nan": ({"x": np.where(np.eye(5) > 0, np.nan, 0.5)[None].repeat(4, 0), "y": [0, 1, 0, 1]},
                "NaN"),
        "mismatch": ({"x": x, "y": [0, 1, 0]}, "4 images but 3 labels"),
        "empty": ({"x": x[:0], "y": np.zeros(0, int)}, "empty"),
        "onehot": ({"x": x, "y": np.eye(4)}, "one-hot"),
        "frac": ({"x": x, "y": [0, 0.5, 1, 1]}, "whole class indices"),
        "names": ({"x": x, "y": [0, 1, 2, 0], "classes": np.array(["a", "b"])}, "class names"),
    }
    for name, (arrays, message) in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)
        with raises(message):
            load_dataset(spec(path, 1, 5, 5, labels=True))
    (tmp_path / "junk.npz").write_bytes(b"garbage")
    with raises("cannot read"):
        load_dataset(spec(tmp_path / "junk.npz", 1, 5, 5))


# ---------------------------------------------------------------- IDX

@pytest.mark.parametrize("compress", [False, True])
def test_idx_file_and_directory(tmp_path, compress):
    images = make_idx_pair(tmp_path / "mnist", compress=compress)
    for source in (images, tmp_path / "mnist"):
        ds = load_dataset(spec(source, 1, 6, 7))
        assert ds.x.shape == (12, 1, 6, 7) and ds.classes == ("0", "1", "2")
        np.testing.assert_array_equal(ds.y, np.arange(12) % 3)
        assert_unit(ds)
        assert ds.x[:].max() > 0.9


def test_idx_directory_with_train_and_test(tmp_path):
    folder = tmp_path / "mnist"
    make_idx_pair(folder, "train", n=12, compress=True)
    make_idx_pair(folder, "t10k", n=6, compress=True)
    assert len(load_dataset(spec(folder, 1, 6, 7))) == 12
    assert len(load_dataset(spec(f"{folder}:test", 1, 6, 7))) == 6


def test_idx_errors(tmp_path):
    images = make_idx_pair(tmp_path / "a")
    (tmp_path / "a" / "train-labels-idx1-ubyte").unlink()
    with raises("no labels"):
        load_dataset(spec(images, 1, 6, 7, labels=True))
    images = make_idx_pair(tmp_path / "b")
    images.write_bytes(b"\x01\x02\x03\x04rest")
    with raises("bad magic"):
        load_dataset(spec(images, 1, 6, 7))
    images = make_idx_pair(tmp_path / "c")
    images.write_bytes(images.read_bytes()[:-5])
    with raises("truncated"):
        load_dataset(spec(images, 1, 6, 7))
    images = make_idx_pair(tmp_path / "d")
    write_idx(tmp_path / "d" / "train-labels-idx1-ubyte", np.zeros(5, np.uint8), False)
    with raises("12 images but 5 labels"):
        load_dataset(spec(images, 1, 6, 7))


# ---------------------------------------------------------------- named sources

@pytest.mark.skipif(not FASHION_PRESENT, reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist():
    ds = load_dataset(DataSpec("fashion-mnist", 1, 28, 28, limit=200, seed=3))
    assert ds.x.shape == (200, 1, 28, 28) and ds.source == "fashion-mnist:train"
    assert ds.classes[0] == "T-shirt/top" and ds.num_classes == 10
    assert np.bincount(ds.y).tolist() == [20] * 10
    assert_unit(ds)
    test = load_dataset(DataSpec("fashion-mnist:test", 3, 32, 32, limit=30))
    assert test.x.shape == (30, 3, 32, 32) and test.source == "fashion-mnist:test"


def test_fashion_mnist_missing_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "FASHION_MNIST_DIR", tmp_path / "absent")
    with raises("apt-get install dataset-fashion-mnist"):
        load_dataset(DataSpec("fashion-mnist", 1, 28, 28))
    with raises("unknown split"):
        load_dataset(DataSpec("fashion-mnist:val", 1, 28, 28))


def test_digits():
    pytest.importorskip("sklearn")
    ds = load_dataset(DataSpec(data.DEFAULT_SOURCE, 1, 8, 8))
    assert ds.x.shape == (1797, 1, 8, 8) and ds.num_classes == 10 and ds.source == "digits"
    assert_unit(ds)
    assert ds.x[:].max() == 1.0
    small = load_dataset(DataSpec("digits", 3, 16, 16, limit=50, seed=1))
    assert small.x.shape == (50, 3, 16, 16)
    assert np.bincount(small.y).tolist() == [5] * 10


def test_digits_without_sklearn_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with raises("pip install scikit-learn"):
        load_dataset(DataSpec("digits", 1, 8, 8))


def test_unknown_source(tmp_path):
    with raises("unknown data source 'no-such-thing'"):
        load_dataset(DataSpec("no-such-thing", 1, 8, 8))
    (tmp_path / "model.onnx").write_bytes(b"")
    with raises("unsupported file type"):
        load_dataset(spec(tmp_path / "model.onnx"))


# ---------------------------------------------------------------- limit, split, batches

def labelled(n_per_class=(10, 20, 30)) -> Dataset:
    y = np.repeat(np.arange(len(n_per_class)), n_per_class)
    x = np.arange(len(y), dtype=np.float32).reshape(-1, 1, 1, 1)
    return Dataset(x, y, tuple("abc"[: len(n_per_class)]), "mem")


def test_limit_is_stratified_and_seeded(tmp_path):
    x = np.zeros((60, 4, 4), np.uint8)
    y = np.repeat([0, 1, 2], [10, 20, 30])
    np.savez(tmp_path / "d.npz", x=x, y=y)
    one = load_dataset(spec(tmp_path / "d.npz", 1, 4, 4, limit=12, seed=5))
    two = load_dataset(spec(tmp_path / "d.npz", 1, 4, 4, limit=12, seed=5))
    assert np.bincount(one.y).tolist() == [2, 4, 6]
    np.testing.assert_array_equal(one.y, two.y)
    assert len(load_dataset(spec(tmp_path / "d.npz", 1, 4, 4, limit=1000))) == 60
    with raises("only one class"):
        load_dataset(spec(tmp_path / "d.npz", 1, 4, 4, limit=1))


def test_split_deterministic_disjoint_and_stratified():
    ds = labelled()
    train, val = split(ds, 0.2, seed=7)
    again_train, again_val = split(ds, 0.2, seed=7)
    np.testing.assert_array_equal(val.x[:], again_val.x[:])
    np.testing.assert_array_equal(train.x[:], again_train.x[:])
    assert np.bincount(val.y).tolist() == [2, 4, 6]
    assert np.bincount(train.y).tolist() == [8, 16, 24]
    ids = np.concatenate([train.x[:].ravel(), val.x[:].ravel()])
    assert sorted(ids.tolist()) == list(range(60))
    _, other_val = split(ds, 0.2, seed=8)
    assert not np.array_equal(val.x[:], other_val.x[:])


def test_split_keeps_every_class_in_train():
    ds = labelled((1, 2, 3))
    train, val = split(ds, 0.5, seed=0)
    assert set(train.y.tolist()) == {0, 1, 2} and len(val) == 3
    with raises("strictly between 0 and 1"):
        split(ds, 1.0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=2, max_size=80), st.floats(0.05, 0.95),
       st.integers(0, 2**16))
def test_split_invariants(labels, fraction, seed):
    y = np.asarray(labels)
    ds = Dataset(np.arange(len(y), dtype=np.float32).reshape(-1, 1, 1, 1), y, tuple("abcde"), "h")
    if np.bincount(y).max() < 2:
        with raises("too few samples"):
            split(ds, fraction, seed)
        return
    train, val = split(ds, fraction, seed)
    ids = np.concatenate([train.x[:].ravel(), val.x[:].ravel()])
    assert sorted(ids.tolist()) == list(range(len(y))) and len(val) >= 1
    assert set(train.y.tolist()) == set(y.tolist())
    again = split(ds, fraction, seed)[1]
    np.testing.assert_array_equal(again.x[:], val.x[:])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=80), st.integers(1, 90))
def test_stratified_pick_invariants(labels, n):
    y = np.asarray(labels)
    picked = data._stratified_pick(y, n, seed=0)
    assert len(picked) == min(n, len(y)) and len(set(picked.tolist())) == len(picked)
    if n >= len(np.unique(y)):
        assert set(y[picked].tolist()) == set(y.tolist())


def test_subset_and_iter_batches():
    ds = labelled()
    sub = ds.subset([0, 59])
    assert sub.y.tolist() == [0, 2] and sub.classes == ds.classes
    batches = list(iter_batches(ds, 25))
    assert [len(b[1]) for b in batches] == [25, 25, 10]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), ds.x[:])
    shuffled = np.concatenate([b[1] for b in iter_batches(ds, 7, shuffle=True, seed=2)])
    again = np.concatenate([b[1] for b in iter_batches(ds, 7, shuffle=True, seed=2)])
    np.testing.assert_array_equal(shuffled, again)
    assert sorted(shuffled.tolist()) == sorted(ds.y.tolist())
    with raises("batch size"):
        next(iter_batches(ds, 0))


def test_check_labels():
    ds = labelled()
    check_labels(ds, 3)
    check_labels(ds, 10)
    with raises("label 2 needs at least 3 model outputs but the model has 2"):
        check_labels(ds, 2)


def test_dataset_rejects_length_mismatch():
    with raises("3 images but 2 labels"):
        Dataset(np.zeros((3, 1, 2, 2)), np.zeros(2), ("a",), "mem")


def test_dataspec_validation():
    with raises("--mean has 2 values"):
        DataSpec("digits", 3, 8, 8, mean=(0.1, 0.2))
    with raises("--std"):
        DataSpec("digits", 1, 8, 8, std=(0.0,))
    with raises("--limit"):
        DataSpec("digits", 1, 8, 8, limit=0)


def test_errors_are_gpp_errors_with_one_line_messages(tmp_path):
    with pytest.raises(GppError) as info:
        load_dataset(DataSpec(str(tmp_path / "nothing"), 1, 8, 8))
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- resize

def test_resize_identity_and_constant():
    x = np.random.default_rng(0).random((2, 3, 5, 7), dtype=np.float32)
    np.testing.assert_array_equal(resize_bilinear(x, 5, 7), x)
    np.testing.assert_allclose(resize_bilinear(np.full((1, 1, 4, 4), 0.3, np.float32), 9, 2), 0.3,
                               rtol=1e-6)


@pytest.mark.parametrize("size", [(3, 4), (11, 17), (5, 7)])
def test_resize_matches_torch_bilinear(size):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).random((2, 3, 6, 9), dtype=np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(x), size=size, mode="bilinear",
                                           align_corners=False).numpy()
    np.testing.assert_allclose(resize_bilinear(x, *size), want, atol=1e-5)


def test_a_tiny_held_out_set_is_warned_about(caplog):
    """Fewer than 100 held-out images: a warning says each is over a point of accuracy;
    the default split of the digits (180 images) stays quiet."""
    from gpp_onnx.config import DataOptions, PruneConfig
    from gpp_onnx.graph import GraphView
    from gpp_onnx.splits import load_data
    from gpp_onnx.samples import GraphBuilder

    b = GraphBuilder((1, 1, 8, 8), seed=0)
    view = GraphView(b.build(b.gemm(b.flatten(b.gap(b.conv("input", 4))), 10)))
    with caplog.at_level("WARNING"):
        splits = load_data(view, PruneConfig(data=DataOptions("digits", val_split=0.02)))
    assert len(splits.val) == 36
    assert any("only 36 held-out images: each is 2.8% of" in r.getMessage()
               for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING"):
        splits = load_data(view, PruneConfig(data=DataOptions("digits")))
    assert len(splits.val) == 180 and not caplog.records


@pytest.mark.parametrize("y", [np.array(["cat", "dog"] * 5), np.eye(2)[np.arange(10) % 2],
                               np.arange(10) % 2 + 0.5])
def test_labels_a_run_ignores_cannot_stop_it(tmp_path, y):
    """An .npz whose y gpp-onnx cannot read as class ids: refused where labels are used,
    and the images load where they are ignored (--no-labels, compare)."""
    x = np.random.default_rng(0).integers(0, 256, (10, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    spec = DataSpec(str(tmp_path / "d.npz"), 1, 8, 8)
    with pytest.raises(DataError):
        load_dataset(spec)
    ds = load_dataset(DataSpec(str(tmp_path / "d.npz"), 1, 8, 8, labels=False))
    assert ds.y is None and len(ds) == 10
    np.testing.assert_array_equal(np.asarray(ds.x[:], np.float32)[:, 0], x / np.float32(255))


def test_image_folder_skips_hidden_entries_and_follows_linked_folders(tmp_path):
    """Class folders are listed as torchvision's ImageFolder lists them: Jupyter's
    .ipynb_checkpoints copies and macOS's ._ files are left out, a symlinked sub-folder is
    read (once, even where a link points back up the tree)."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for j in range(3):
            write_png(tmp_path / "data" / c / f"{j}.png", rng.integers(0, 256, (4, 4), np.uint8))
    write_png(tmp_path / "data" / "a" / ".ipynb_checkpoints" / "0.png",
              np.zeros((4, 4), np.uint8))
    (tmp_path / "data" / "a" / "._1.png").write_bytes(b"\x00\x05\x16\x07Mac OS X")
    for j in range(2):
        write_png(tmp_path / "extra" / f"{j}.png", rng.integers(0, 256, (4, 4), np.uint8))
    (tmp_path / "data" / "b" / "more").symlink_to(tmp_path / "extra")
    (tmp_path / "extra" / "loop").symlink_to(tmp_path / "data" / "b")
    raw = sources.resolve(str(tmp_path / "data"))
    names = [str(p.relative_to(tmp_path / "data")) for p in raw.pixels.paths]
    assert names == ["a/0.png", "a/1.png", "a/2.png", "b/0.png", "b/1.png", "b/2.png",
                     "b/more/0.png", "b/more/1.png"]
    assert raw.y.tolist() == [0, 0, 0, 1, 1, 1, 1, 1]


def test_class_folders_named_by_numbers_out_of_text_order_are_warned_about(tmp_path, caplog):
    """Folders 1..10 are classes in text order (1, 10, 2, ...), as ImageFolder takes them;
    the run says so, since a model's classes usually follow the numbers."""
    for c in range(1, 11):
        write_png(tmp_path / "num" / str(c) / "x.png", np.zeros((4, 4), np.uint8))
        write_png(tmp_path / "pad" / f"{c:02d}" / "x.png", np.zeros((4, 4), np.uint8))
    with caplog.at_level("WARNING"):
        raw = sources.resolve(str(tmp_path / "num"))
    assert list(raw.classes[:3]) == ["1", "10", "2"]
    assert any("class 0 '1', 1 '10', 2 '2'" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING"):
        sources.resolve(str(tmp_path / "pad"))
    assert not caplog.records


def test_links_back_into_the_data_folder_are_skipped_and_dangling_ones_refused(tmp_path,
                                                                              caplog):
    """A link from one class folder to the data folder (or to another class) would count
    images again under the wrong label: skipped, with a warning. A class folder link that
    points nowhere would shift the labels after it: refused."""
    for c in ("a", "b"):
        for j in range(2):
            write_png(tmp_path / "data" / c / f"{j}.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "data" / "a" / "all").symlink_to(tmp_path / "data")
    (tmp_path / "data" / "a" / "other").symlink_to(tmp_path / "data" / "b")
    with caplog.at_level("WARNING"):
        raw = sources.resolve(str(tmp_path / "data"))
    assert raw.y.tolist() == [0, 0, 1, 1]
    assert sum("links back into the data folder" in r.getMessage() for r in caplog.records) == 2
    (tmp_path / "data" / "c").symlink_to(tmp_path / "gone")
    with pytest.raises(DataError, match="c links to nothing"):
        sources.resolve(str(tmp_path / "data"))


def test_rgba_arrays_lose_their_alpha_as_rgba_files_do(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (6, 5, 5, 4), dtype=np.uint8)
    np.savez(tmp_path / "rgba.npz", x=x, y=np.arange(6) % 2)
    for i in range(6):
        write_png(tmp_path / "files" / str(i % 2) / f"{i}.png", x[i], mode="RGBA")
    arrays = load_dataset(DataSpec(str(tmp_path / "rgba.npz"), 3, 5, 5))
    files = load_dataset(DataSpec(str(tmp_path / "files"), 3, 5, 5))
    want = x[..., :3].transpose(0, 3, 1, 2) / np.float32(255)
    np.testing.assert_allclose(np.asarray(arrays.x[:], np.float32), want, rtol=1e-6)
    order = np.argsort([int(p.stem) for p in files.x.pixels.paths])
    np.testing.assert_allclose(np.asarray(files.x[:], np.float32)[order], want, rtol=1e-6)
    with pytest.raises(DataError, match="4 channels but the model takes 1"):
        load_dataset(DataSpec(str(tmp_path / "rgba.npz"), 1, 5, 5))


def test_fewer_picks_than_classes_spread_over_the_classes():
    """--limit 50 of 100 equal classes: 50 classes drawn at random, not classes 0-49."""
    y = np.repeat(np.arange(100), 5)
    classes = y[data._stratified_pick(y, 50, seed=0)]
    assert len(set(classes.tolist())) == 50 and classes.max() > 60
