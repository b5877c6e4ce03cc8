"""CIFAR-10/100 in the layouts their authors distribute (python pickles and binary
records): the images and labels read back are the ones written, in every form a user
names them (folder, FOLDER:test, the folder above, one batch file), and bad files are
one-line DataErrors. The files are written here from the published format, independently
of the reader."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from gpp_onnx import sources
from gpp_onnx.cli import main
from gpp_onnx.errors import DataError

NAMES10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n)


def _write_python10(folder, batches, test) -> None:
    folder.mkdir(parents=True)
    for i, (x, y) in enumerate(batches, 1):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"batch_label": b"training batch", b"labels": [int(v) for v in y],
                         b"data": x.reshape(len(x), -1), b"filenames": []}, f, protocol=2)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"labels": [int(v) for v in test[1]], b"data": test[0].reshape(
            len(test[0]), -1)}, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in NAMES10]}, f, protocol=2)


def _write_binary10(folder, batches, test) -> None:
    folder.mkdir(parents=True)
    for name, (x, y) in [(f"data_batch_{i}.bin", b) for i, b in enumerate(batches, 1)] + [
            ("test_batch.bin", test)]:
        records = np.concatenate([y.astype(np.uint8)[:, None], x.reshape(len(x), -1)], 1)
        records.tofile(folder / name)
    (folder / "batches.meta.txt").write_text("\n".join(NAMES10) + "\n\n")


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    batches = [_images(7, 1), _images(5, 2)]
    test = _images(4, 3)
    _write_python10(root / "py" / "cifar-10-batches-py", batches, test)
    _write_binary10(root / "bin" / "cifar-10-batches-bin", batches, test)
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    return root, (x, y), test


def _read(source: str):
    raw = sources.resolve(source)
    n = len(raw.pixels)
    return raw.pixels.read(np.arange(n))[0], raw.y, raw.classes


@pytest.mark.parametrize("form", ["py", "bin"])
def test_cifar10_reads_back_the_images_and_labels_written(cifar10, form):
    root, (x, y), (xt, yt) = cifar10
    folder = root / form / f"cifar-10-batches-{form}"
    for source, (want_x, want_y) in [(folder, (x, y)), (root / form, (x, y)),
                                     (f"{folder}:test", (xt, yt)),
                                     (f"{folder}:train", (x, y))]:
        got_x, got_y, classes = _read(str(source))
        np.testing.assert_array_equal(got_x, want_x.astype(np.float32) / 255)
        np.testing.assert_array_equal(got_y, want_y)
        assert list(classes) == NAMES10
        assert sources.has_labels(str(source))
    one = folder / ("data_batch_2" if form == "py" else "data_batch_2.bin")
    got_x, got_y, _ = _read(str(one))
    np.testing.assert_array_equal(got_x, x[7:].astype(np.float32) / 255)
    np.testing.assert_array_equal(got_y, y[7:])
    # the pixel order is the format's: 1024 red, then green, then blue values, row-major
    assert sources.native_shape(str(folder)) == (3, 32, 32)


@pytest.mark.parametrize("form", ["py", "bin"])
def test_cifar100_uses_the_fine_labels(tmp_path, form):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 3 * 32 * 32), dtype=np.uint8)
    fine, coarse = rng.integers(0, 100, 6), rng.integers(0, 20, 6)
    fine_names = [f"fine{i}" for i in range(100)]
    if form == "py":
        folder = tmp_path / "cifar-100-python"
        folder.mkdir()
        for name in ("train", "test"):
            with open(folder / name, "wb") as f:
                pickle.dump({b"data": x, b"fine_labels": list(map(int, fine)),
                             b"coarse_labels": list(map(int, coarse))}, f, protocol=2)
        with open(folder / "meta", "wb") as f:
            pickle.dump({b"fine_label_names": [n.encode() for n in fine_names],
                         b"coarse_label_names": []}, f, protocol=2)
    else:
        folder = tmp_path / "cifar-100-binary"
        folder.mkdir()
        records = np.concatenate([coarse.astype(np.uint8)[:, None],
                                  fine.astype(np.uint8)[:, None], x], 1)
        for name in ("train.bin", "test.bin"):
            records.tofile(folder / name)
        (folder / "fine_label_names.txt").write_text("\n".join(fine_names))
    got_x, got_y, classes = _read(str(tmp_path))
    np.testing.assert_array_equal(got_x, x.reshape(6, 3, 32, 32).astype(np.float32) / 255)
    np.testing.assert_array_equal(got_y, fine)
    assert list(classes) == fine_names


def test_a_pickle_that_asks_for_code_is_refused_and_not_run(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            import os
            return os.system, (f"touch {marker}",)

    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Payload(), b"labels": []}, f)
    with pytest.raises(DataError, match="asks for (posix|os|nt).system"):
        sources.resolve(str(folder))
    assert not marker.exists()


def test_a_truncated_binary_batch_is_a_one_line_error(tmp_path, capsys):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    np.zeros(3073 * 2 - 5, np.uint8).tofile(folder / "data_batch_1.bin")
    with pytest.raises(DataError, match="not a whole number of 3073-byte CIFAR records"):
        sources.resolve(str(folder))
    assert main(["evaluate", str(tmp_path / "m.onnx"), "--data", str(folder)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_a_folder_without_the_split_asked_for_says_so(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    np.zeros(3073, np.uint8).tofile(folder / "data_batch_1.bin")
    with pytest.raises(DataError, match="no test files test_batch.bin"):
        sources.resolve(f"{folder}:test")


def test_a_folder_with_both_layouts_asks_for_one(cifar10, tmp_path):
    root, _, _ = cifar10
    import shutil

    for form in ("py", "bin"):
        shutil.copytree(root / form / f"cifar-10-batches-{form}",
                        tmp_path / f"cifar-10-batches-{form}")
    with pytest.raises(DataError, match="holds 2 CIFAR folders .* give the path of one"):
        sources.resolve(str(tmp_path))


def test_missing_training_batches_are_warned_about(cifar10, caplog):
    """The fixture's folders hold data_batch_1 and _2 of the five: read, with a warning."""
    root, (x, _), _ = cifar10
    with caplog.at_level("WARNING"):
        got_x, _, _ = _read(str(root / "bin"))
    assert len(got_x) == len(x)
    assert any("3 of its 5 train batches are missing (data_batch_3.bin" in r.getMessage()
               for r in caplog.records)


def test_batches_pickled_with_the_newest_protocol_are_read(tmp_path):
    x, y = _images(3, 5)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({"data": x.reshape(3, -1), "labels": y.tolist()}, f,
                    protocol=pickle.HIGHEST_PROTOCOL)
    got_x, got_y, classes = _read(str(folder))
    np.testing.assert_array_equal(got_x, x / np.float32(255))
    np.testing.assert_array_equal(got_y, y)
    assert classes is None
