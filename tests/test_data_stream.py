"""Streamed data: batches equal an independent per-image reference (Pillow's float bilinear
resize), stores are memory-mapped where the format allows, and subsets, splits, batching and
evaluation never hold the preprocessed data set (tracemalloc)."""
from __future__ import annotations

import gzip
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest

from gpp_onnx import pipeline
from gpp_onnx.config import DataOptions
from gpp_onnx.data import DataSpec, iter_batches, load_dataset, split
from gpp_onnx.samples import GraphBuilder

Image = pytest.importorskip("PIL.Image")

MEAN, STD = (0.2, 0.3, 0.4), (0.5, 0.25, 2.0)


def _idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    payload = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    payload += struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def _idx_pair(folder: Path, images: np.ndarray, labels: np.ndarray, compress=False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if compress else ""
    _idx(folder / f"train-labels-idx1-ubyte{ext}", labels, compress)
    return _idx(folder / f"train-images-idx3-ubyte{ext}", images, compress)


def _reference(hwc_uint8: np.ndarray, channels: int, height: int, width: int) -> np.ndarray:
    """One image the plain way: / 255, Pillow float ('F') bilinear resize per channel,
    grayscale replicated, then (x - mean) / std. (C, H, W) float32."""
    planes = hwc_uint8.reshape(*hwc_uint8.shape[:2], -1)
    resized = [np.asarray(Image.fromarray(planes[..., c].astype(np.float32) / 255, mode="F")
                          .resize((width, height), Image.BILINEAR)) for c in range(planes.shape[2])]
    x = np.stack(resized * (channels // len(resized)))
    mean, std = np.array(MEAN[:channels])[:, None, None], np.array(STD[:channels])[:, None, None]
    return ((x - mean) / std).astype(np.float32)


def _images(n=24, size=(9, 7), channels=None, seed=0) -> np.ndarray:
    shape = (n, *size) if channels is None else (n, *size, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _expected(raw_hwc: np.ndarray, raw_ids: np.ndarray) -> np.ndarray:
    return np.stack([_reference(raw_hwc[i], 3, 20, 16) for i in raw_ids])


@pytest.mark.parametrize("fmt", ["idx", "idx.gz", "npz", "npz-compressed", "npz-fortran",
                                 "folder"])
def test_batches_equal_a_per_image_reference(tmp_path, fmt):
    rgb = fmt == "npz-fortran" or fmt == "folder"
    raw = _images(channels=3 if rgb else None)
    y = np.arange(len(raw)) % 3
    if fmt.startswith("idx"):
        source = _idx_pair(tmp_path / "idx", raw, y, compress=fmt.endswith(".gz"))
    elif fmt == "folder":
        for i, img in enumerate(raw):
            (tmp_path / "f" / f"c{y[i]}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(tmp_path / "f" / f"c{y[i]}" / f"{i:03d}.png")
        source = tmp_path / "f"
    else:
        source = tmp_path / "d.npz"
        x = np.asfortranarray(raw) if fmt == "npz-fortran" else raw
        (np.savez_compressed if fmt == "npz-compressed" else np.savez)(source, x=x, y=y)
    ds = load_dataset(DataSpec(str(source), 3, 20, 16, mean=MEAN, std=STD, workers=0))
    order = np.arange(len(raw))
    if fmt == "folder":  # files are listed class by class, then by name
        order = np.argsort(y, kind="stable")
    np.testing.assert_array_equal(ds.y, y[order])
    shuffled = np.random.default_rng(1).permutation(len(raw))
    for chunk in np.array_split(shuffled, 5):
        np.testing.assert_allclose(ds.x[chunk], _expected(raw, order[chunk]), atol=2e-5)
    train, val = split(ds, 0.25, seed=3)
    np.testing.assert_allclose(val.x[:], _expected(raw, order[val.x.index]), atol=2e-5)
    got = np.concatenate([x for x, _ in iter_batches(train, 4, shuffle=True, seed=2)])
    want = _expected(raw, order[train.x.index]).reshape(len(train), -1)
    dist = np.abs(got.reshape(len(got), -1)[:, None] - want[None]).max(axis=2)
    match = dist.argmin(axis=1)  # the shuffled batches hold each train image once
    assert dist.min(axis=1).max() < 2e-5 and sorted(match) == list(range(len(train)))


def test_array_stores_are_memory_maps_where_possible(tmp_path):
    raw = _images()
    y = np.arange(len(raw)) % 2
    plain = _idx_pair(tmp_path / "a", raw, y)
    np.savez(tmp_path / "u.npz", x=raw, y=y)
    np.savez_compressed(tmp_path / "c.npz", x=raw, y=y)
    for source, mapped in ((plain, True), (tmp_path / "u.npz", True),
                           (tmp_path / "c.npz", False)):
        ds = load_dataset(DataSpec(str(source), 1, 9, 7))
        base = ds.x.pixels.array
        while not isinstance(base, np.memmap) and base.base is not None:
            base = base.base
        assert isinstance(base, np.memmap) == mapped, source
        np.testing.assert_array_equal(ds.x[:][:, 0], raw / np.float32(255))


def test_workers_give_the_same_batches(tmp_path):
    raw = _images(n=12, channels=3)
    for i, img in enumerate(raw):
        (tmp_path / f"c{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(img).save(tmp_path / f"c{i % 2}" / f"{i:02d}.png")
    one = load_dataset(DataSpec(str(tmp_path), 3, 12, 12, workers=0))
    two = load_dataset(DataSpec(str(tmp_path), 3, 12, 12, workers=2))
    assert one.workers == 0 and two.workers == 2
    for (xa, ya), (xb, yb) in zip(iter_batches(one, 5, shuffle=True, seed=4),
                                  iter_batches(two, 5, shuffle=True, seed=4), strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


# ---------------------------------------------------------------- bounded memory

N, SIDE, BATCH = 3000, 128, 32
FULL_BYTES = N * SIDE * SIDE * 4  # the preprocessed set, one channel: 197 MB


@pytest.fixture(scope="module")
def big_idx(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    return _idx_pair(folder, rng.integers(0, 256, (N, 28, 28), dtype=np.uint8),
                     np.arange(N) % 10)


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("fmt", ["idx", "npz"])
def test_split_subset_and_batches_never_hold_the_resized_set(big_idx, tmp_path, fmt):
    source = big_idx
    if fmt == "npz":  # compressed: raw uint8 read once (2 MB), never the resized floats
        raw = np.frombuffer(source.read_bytes()[16:], np.uint8).reshape(N, 28, 28)
        source = tmp_path / "big.npz"
        np.savez_compressed(source, x=raw, y=np.arange(N) % 10)

    def work():
        ds = load_dataset(DataSpec(str(source), 1, SIDE, SIDE, mean=(0.5,), std=(0.25,)))
        train, val = split(ds, 0.1, seed=0)
        scoring = train.subset(np.flatnonzero(train.y < 5))
        for part in (train, val, scoring):
            for x, _ in iter_batches(part, BATCH, shuffle=True):
                assert x.shape == (len(x), 1, SIDE, SIDE)

    assert _peak(work) < FULL_BYTES / 10


def test_evaluate_streams(big_idx):
    b = GraphBuilder((1, 1, SIDE, SIDE), seed=0)
    model = b.build(b.gemm(b.flatten(b.gap(b.act(b.conv("input", 4, stride=4), "Relu"))), 10))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    path = big_idx.parent / "m.onnx"
    onnx.save(model, path)
    result = {}

    def work():
        result["acc"] = pipeline.evaluate(path, DataOptions(str(big_idx), batch_size=BATCH))

    assert _peak(work) < FULL_BYTES / 10
    assert result["acc"][1] == N


def test_accuracy_batches_shrink_with_the_image_size(big_idx, monkeypatch):
    """onnxruntime holds a batch's activations at once: large images are evaluated in
    smaller batches (here 224-px RGB: at most 64 a batch), small ones in batches of 256;
    the accuracy counts every image either way."""
    from gpp_onnx import evaluation

    assert evaluation.eval_batch_size((1, 28, 28)) == 256
    assert 8 <= evaluation.eval_batch_size((3, 224, 224)) <= 64
    assert evaluation.eval_batch_size((224, 224, 3)) == evaluation.eval_batch_size((3, 224, 224))
    seen = []
    real = evaluation.outputs
    monkeypatch.setattr(evaluation, "outputs",
                        lambda s, feeds, *a: (seen.append(len(next(iter(feeds.values())))),
                                              real(s, feeds, *a))[1])
    monkeypatch.setattr(evaluation, "EVAL_BYTES", 4 * SIDE * SIDE * evaluation.ACTIVATION_FACTOR * 7)
    b = GraphBuilder((1, 1, SIDE, SIDE), seed=0)
    model = b.build(b.gemm(b.flatten(b.gap(b.act(b.conv("input", 4, stride=4), "Relu"))), 10))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    ds = load_dataset(DataSpec(str(big_idx), 1, SIDE, SIDE)).subset(np.arange(30))
    evaluation.accuracy(model, ds)
    assert seen == [7, 7, 7, 7, 2]


def test_a_batch_of_large_photos_is_resized_one_at_a_time(tmp_path):
    """Each file is resized before the next is decoded: a batch of 8 photos of 600x800
    never holds the 8 full-size float copies (46 MB), only about one (5.8 MB)."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (60, 80, 3), np.uint8)).resize((800, 600))
    for c in range(2):
        (tmp_path / f"c{c}").mkdir()
        for i in range(4):
            img.save(tmp_path / f"c{c}" / f"{i}.png")
    ds = load_dataset(DataSpec(str(tmp_path), 3, 16, 16, workers=0))
    one = 600 * 800 * 3 * 4
    assert _peak(lambda: ds.x[:8]) < 3 * one
