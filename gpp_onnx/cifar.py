"""The CIFAR-10 and CIFAR-100 layouts as their authors distribute them, in both forms:

* python: ``cifar-10-batches-py/`` (``data_batch_1`` .. ``data_batch_5``, ``test_batch``,
  ``batches.meta``) and ``cifar-100-python/`` (``train``, ``test``, ``meta``), each file a
  pickled dict of ``data`` (N x 3072 uint8, the 1024 red, green then blue values of a 32x32
  image, row-major) and ``labels`` (CIFAR-100: ``fine_labels`` and ``coarse_labels``);
* binary: ``cifar-10-batches-bin/`` (``data_batch_1.bin`` .. ``data_batch_5.bin``,
  ``test_batch.bin``, ``batches.meta.txt``) and ``cifar-100-binary/`` (``train.bin``,
  ``test.bin``, ``fine_label_names.txt``), each record one label byte (CIFAR-100: the
  coarse, then the fine label) followed by the 3072 pixel bytes.

A source is the folder (its training split; ``FOLDER:test`` for the test split), a folder
holding one of those folders (torchvision's ``root``), or one batch file. CIFAR-100 uses
the fine labels (100 classes). The pickles are read with an unpickler that builds only
dicts, lists, strings, numbers and numpy arrays, so a file from elsewhere cannot run code.
"""
from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np

from .errors import DataError

log = logging.getLogger(__name__)

SIDE = 32
PIXELS = 3 * SIDE * SIDE
FOLDERS = ("cifar-10-batches-py", "cifar-10-batches-bin", "cifar-100-python",
           "cifar-100-binary")
# split -> the files of each layout, in order (absent training batches are skipped)
_PY10 = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
_BIN10 = {s: tuple(f + ".bin" for f in files) for s, files in _PY10.items()}
_PY100 = {"train": ("train",), "test": ("test",)}
_BIN100 = {"train": ("train.bin",), "test": ("test.bin",)}
_SAFE = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
         ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
         ("numpy._core.multiarray", "scalar"), ("builtins", "bytearray"),
         ("_codecs", "encode"),  # protocol 2 writes bytes through it
         ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE:
            return super().find_class(module, name)
        raise DataError(f"{self.path}: a CIFAR batch holds only arrays and lists, this one "
                        f"asks for {module}.{name}; give the files as distributed")


def layout(folder: Path) -> tuple[str, dict] | None:
    """("python" or "binary", split -> file names) for a CIFAR folder, else None. The
    CIFAR-100 files' plain names (``train``, ``test``) count only beside their names file."""
    names = {p.name for p in folder.iterdir() if p.is_file()}
    for kind, splits, beside in (("python", _PY10, ()), ("binary", _BIN10, ()),
                                 ("python", _PY100, ("meta",)),
                                 ("binary", _BIN100, ("fine_label_names.txt",
                                                      "coarse_label_names.txt"))):
        if any(f in names for files in splits.values() for f in files) and (
                not beside or names.intersection(beside)):
            return kind, splits
    return None


def find(folder: Path) -> Path | None:
    """`folder` itself if it holds a CIFAR layout, or its one CIFAR sub-folder."""
    if layout(folder) is not None:
        return folder
    found = [folder / name for name in FOLDERS
             if (folder / name).is_dir() and layout(folder / name) is not None]
    if len(found) > 1:
        raise DataError(f"{folder} holds {len(found)} CIFAR folders "
                        f"({', '.join(p.name for p in found)}); give the path of one of them")
    return found[0] if found else None


def is_batch_file(path: Path) -> bool:
    """Whether `path` is named like a CIFAR batch file (its folder need not be CIFAR's)."""
    return any(path.name in files for splits in (_PY10, _BIN10) for files in splits.values()) \
        or (path.name in ("train", "test", "train.bin", "test.bin")
            and layout(path.parent) is not None)


def load(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...] | None]:
    """(x (N, 3, 32, 32) uint8, y int64, class names) of `split` in a CIFAR folder."""
    kind, splits = layout(folder)
    files = [folder / f for f in splits[split] if (folder / f).is_file()]
    if not files:
        raise DataError(f"{folder}: no {split} files {', '.join(splits[split])}; give the "
                        "folder as distributed (or FOLDER:train / FOLDER:test)")
    if len(files) < len(splits[split]):
        missing = [f for f in splits[split] if not (folder / f).is_file()]
        log.warning("%s: %d of its %d %s batches are missing (%s); reading the %d there",
                    folder, len(missing), len(splits[split]), split, ", ".join(missing),
                    len(files))
    parts = [read_file(p) for p in files]
    x = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    y = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    return x, y, class_names(folder, kind, splits is _PY100 or splits is _BIN100)


def read_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file: (x (N, 3, 32, 32) uint8, y int64)."""
    hundred = path.name in ("train", "test", "train.bin", "test.bin")
    if path.suffix == ".bin":
        return _read_binary(path, 2 if hundred else 1)
    return _read_pickle(path, hundred)


def _read_binary(path: Path, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, np.uint8)
    record = label_bytes + PIXELS
    if raw.size == 0 or raw.size % record:
        raise DataError(f"{path}: {raw.size} bytes is not a whole number of {record}-byte "
                        "CIFAR records; the file is truncated or not a CIFAR batch")
    rows = raw.reshape(-1, record)
    return (rows[:, label_bytes:].reshape(-1, 3, SIDE, SIDE),
            rows[:, label_bytes - 1].astype(np.int64))


def _read_pickle(path: Path, hundred: bool) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            unpickler = _Unpickler(f, encoding="latin1")
            unpickler.path = path
            batch = unpickler.load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as err:
        raise DataError(f"cannot read {path} as a CIFAR batch: {err}; give the files as "
                        "distributed") from None
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in dict(batch).items()} \
        if isinstance(batch, dict) else {}
    key = "fine_labels" if hundred else "labels"
    if "data" not in batch or key not in batch:
        raise DataError(f"{path}: a CIFAR batch needs 'data' and '{key}', it has "
                        f"{sorted(batch)}; give the files as distributed")
    try:
        x, y = np.asarray(batch["data"]), np.asarray(batch[key], np.int64)
    except (ValueError, TypeError) as err:
        raise DataError(f"{path}: its '{key}' are not class ids ({err}); give the files as "
                        "distributed") from None
    if y.ndim != 1 or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != PIXELS or \
            len(x) != len(y):
        raise DataError(f"{path}: data {x.shape} {x.dtype} with {len(y)} labels is not "
                        f"N x {PIXELS} uint8 with N labels; give the files as distributed")
    return x.reshape(-1, 3, SIDE, SIDE), y


def class_names(folder: Path, kind: str, hundred: bool) -> tuple[str, ...] | None:
    """The class names the layout ships (None where its names file is missing)."""
    if kind == "binary":
        path = folder / ("fine_label_names.txt" if hundred else "batches.meta.txt")
        if not path.is_file():
            return None
        names = [line.strip() for line in path.read_text(errors="replace").splitlines()]
        return tuple(n for n in names if n) or None
    path = folder / ("meta" if hundred else "batches.meta")
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            unpickler = _Unpickler(f, encoding="latin1")
            unpickler.path = path
            meta = unpickler.load()
        names = meta.get(b"fine_label_names" if hundred else b"label_names") or meta.get(
            "fine_label_names" if hundred else "label_names")
        return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError,
            DataError):
        return None
