"""Labelled image data for gpp-onnx: loading, checking, adapting and batching (numpy only).

Sources for :func:`load_dataset` (``DataSpec.source``; an existing path wins over a name):
* ImageFolder directory: one sub-folder per class, classes sorted by folder name (label = rank),
  images (png, jpg, jpeg, bmp, gif, tif, tiff, webp, ppm, pgm, pbm) below each; read by Pillow.
* ``.npz``: arrays ``x`` (N,H,W | N,H,W,C | N,C,H,W; uint8, ints or floats), ``y`` (N class
  indices), optionally ``classes`` (names).
* IDX images file, MNIST layout ``*-images-idx3-ubyte[.gz]``, labels beside it as
  ``*-labels-idx1-ubyte[.gz]``; or a directory holding such a pair (``DIR:test`` for ``t10k``).
* ``fashion-mnist[:test]``: Debian's copy in /usr/share/datasets/fashion-mnist (default: train).
* ``digits``: scikit-learn's bundled 8x8 digits, the embedded default (:data:`DEFAULT_SOURCE`).

Scaling (torchvision's ToTensor convention): pixels become float32 in [0, 1] (uint8 / 255, larger
16-bit values / 65535, floats in (1, 255] / 255, digits / 16), then ``(x - mean[c]) / std[c]`` if
given. Grayscale is replicated for a C-channel model; colour for a one-channel model is an error.
Other sizes are resized bilinearly (half-pixel centres like torch's ``interpolate(...,
align_corners=False)``, no antialias) unless ``resize=False``, which makes them an error.
"""
from __future__ import annotations

import gzip
import logging
import re
import struct
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from gpp_onnx.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_SOURCE = "digits"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff",
                              ".webp", ".ppm", ".pgm", ".pbm"})
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_IMAGES = re.compile(r"images[-._]idx\d[-._]ubyte(\.gz)?$", re.IGNORECASE)
_SPLITS = {"train": ("train",), "test": ("t10k", "test")}


@dataclass(frozen=True, eq=False)
class Dataset:
    """Labelled images: x (N,C,H,W) float32, y (N,) int64 class indices into ``classes``."""
    x: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...]
    source: str

    def __post_init__(self) -> None:
        x, y = np.ascontiguousarray(self.x, np.float32), np.asarray(self.y, np.int64)
        if x.ndim != 4 or y.ndim != 1:
            raise DataError(f"{self.source}: x must be (N,C,H,W) and y (N,), got {x.shape} and "
                            f"{y.shape}; reshape the arrays")
        if len(x) != len(y):
            raise DataError(f"{self.source}: {len(x)} images but {len(y)} labels; give one each")
        for name, value in (("x", x), ("y", y), ("classes", tuple(map(str, self.classes)))):
            object.__setattr__(self, name, value)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: Sequence[int] | np.ndarray) -> Dataset:
        """The samples at ``idx`` (indices or a boolean mask), same classes and source."""
        idx = np.asarray(idx)
        return Dataset(self.x[idx], self.y[idx], self.classes, self.source)


@dataclass(frozen=True)
class DataSpec:
    """Where the data comes from and what input the model takes (C, H, W, normalisation)."""
    source: str
    channels: int
    height: int
    width: int
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    resize: bool = True
    limit: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.channels, self.height, self.width) < 1:
            raise DataError(f"input {self.channels}x{self.height}x{self.width}: sizes must be > 0")
        if self.limit is not None and self.limit < 1:
            raise DataError(f"--limit {self.limit} must be a positive number of samples")
        for name in ("mean", "std"):
            values = getattr(self, name)
            values = None if values is None else tuple(map(float, values))
            object.__setattr__(self, name, values)
            if values is not None and len(values) not in (1, self.channels):
                raise DataError(f"--{name} has {len(values)} values but the model takes "
                                f"{self.channels} channels; give 1 or {self.channels} values")
        if self.std is not None and min(self.std) <= 0:
            raise DataError(f"--std {self.std} must be all positive")


@dataclass(frozen=True, eq=False)
class _Raw:
    """A source before decoding: labels, raw pixels (N,C,H,W) or image paths; no classes: 0..K-1."""
    y: np.ndarray
    source: str
    classes: tuple[str, ...] | None = None
    x: np.ndarray | None = None
    paths: tuple[Path, ...] = ()


def load_dataset(spec: DataSpec) -> Dataset:
    """Load ``spec.source``, check it, take the ``limit`` subset and adapt it to the model input."""
    raw = _resolve(spec.source)
    n_x, where = (len(raw.paths) if raw.x is None else len(raw.x)), raw.source
    if n_x != len(raw.y):
        raise DataError(f"{where}: {n_x} images but {len(raw.y)} labels; give one label each")
    if n_x == 0:
        raise DataError(f"{where}: the dataset is empty; give labelled images of two classes")
    if raw.y.min() < 0:
        raise DataError(f"{where}: negative label {raw.y.min()}; labels must be class indices")
    if raw.classes is not None and raw.y.max() >= len(raw.classes):
        raise DataError(f"{where}: label {raw.y.max()} but {len(raw.classes)} class names; fix y")
    if len(present := np.unique(raw.y)) < 2:
        raise DataError(f"{where}: only one class (label {present[0]}); give two classes or more")
    idx = np.arange(len(raw.y))
    if spec.limit is not None and spec.limit < len(raw.y):
        idx = _stratified_pick(raw.y, spec.limit, spec.seed)
        if len(np.unique(raw.y[idx])) < 2:
            raise DataError(f"{where}: --limit {spec.limit} keeps only one class; raise it")
    if raw.x is None:
        x = np.concatenate([_adapt(_read_image(raw.paths[i]), spec, str(raw.paths[i]))
                            for i in idx])
    else:
        x = _adapt(_to_unit_range(raw.x[idx], raw.source), spec, raw.source)
    mean = np.asarray(spec.mean or (0.0,), np.float32).reshape(1, -1, 1, 1)
    x = (x - mean) / np.asarray(spec.std or (1.0,), np.float32).reshape(1, -1, 1, 1)
    classes = raw.classes or tuple(str(i) for i in range(int(raw.y.max()) + 1))
    ds = Dataset(x, raw.y[idx], classes, raw.source)
    log.info("loaded %d samples of %d classes as %s from %s", len(ds), ds.num_classes,
             ds.x.shape[1:], ds.source)
    return ds


def split(ds: Dataset, val_fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Deterministic class-stratified (train, val) split; every class keeps a train sample."""
    if not 0 < val_fraction < 1:
        raise DataError(f"validation fraction {val_fraction} must be strictly between 0 and 1")
    n_val = min(max(int(round(len(ds) * val_fraction)), 1), len(ds) - 1)
    val_idx = _stratified_pick(ds.y, n_val, seed, reserve=1) if n_val > 0 else []
    if len(val_idx) == 0:
        raise DataError(f"{ds.source}: too few samples to split; give two or more of a class")
    return ds.subset(np.setdiff1d(np.arange(len(ds)), val_idx)), ds.subset(val_idx)


def check_labels(ds: Dataset, num_outputs: int) -> None:
    """Raise DataError when a label has no matching model output (label >= num_outputs)."""
    top = int(ds.y.max()) if len(ds) else -1
    if top >= num_outputs:
        raise DataError(f"{ds.source}: label {top} needs at least {top + 1} model outputs but the "
                        f"model has {num_outputs}; use data whose classes match the model")
    if ds.num_classes != num_outputs:
        log.warning("%s: %d classes for %d model outputs", ds.source, ds.num_classes, num_outputs)


def iter_batches(ds: Dataset, batch_size: int, shuffle: bool = False,
                 seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (x, y) numpy batches of at most ``batch_size``; shuffled deterministically by seed."""
    if batch_size < 1:
        raise DataError(f"batch size {batch_size} must be at least 1")
    order = np.random.default_rng(seed).permutation(len(ds)) if shuffle else np.arange(len(ds))
    for start in range(0, len(ds), batch_size):
        yield ds.x[order[start:start + batch_size]], ds.y[order[start:start + batch_size]]


def resize_bilinear(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of (..., H, W) to (..., height, width), half-pixel centres, no antialias."""
    def taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(np.intp)
        return lo, np.minimum(lo + 1, n_in - 1), (src - lo).astype(np.float32)
    y0, y1, wy = taps(x.shape[-2], height)
    x = x[..., y0, :] * (1 - wy)[:, None] + x[..., y1, :] * wy[:, None]
    x0, x1, wx = taps(x.shape[-1], width)
    return (x[..., x0] * (1 - wx) + x[..., x1] * wx).astype(np.float32)


def _resolve(source: str) -> _Raw:
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_idx_dir(path, None) or _load_image_folder(path)
    if path.is_file() and path.suffix.lower() == ".npz":
        return _load_npz(path)
    if path.is_file() and _IDX_IMAGES.search(path.name):
        return _load_idx(path)
    if path.is_file():
        raise DataError(f"{path}: unsupported file type; give an ImageFolder directory, an .npz "
                        "file (arrays x, y) or an MNIST-style *-images-idx3-ubyte[.gz] file")
    name, _, split_name = source.lower().partition(":")
    if name in ("digits", "fashion-mnist"):
        return _load_builtin(name, split_name or "train")
    base, _, split_name = source.rpartition(":")
    if split_name in _SPLITS and Path(base).expanduser().is_dir():
        return _load_idx_dir(Path(base).expanduser(), split_name)
    raise DataError(f"unknown data source {source!r}: no such file or directory and not a built-in "
                    "name (digits, fashion-mnist[:test]); give a data directory or file")


def _as_labels(y: np.ndarray, source: str) -> np.ndarray:
    y = np.asarray(y)
    y = y[:, 0] if y.ndim == 2 and y.shape[1] == 1 else y
    if y.ndim != 1:
        raise DataError(f"{source}: labels must be 1-D class indices, got shape {y.shape}; "
                        "convert one-hot labels with y.argmax(1)")
    if y.dtype.kind not in "iubf" or y.dtype.kind == "f" and (y != np.round(y)).any():
        raise DataError(f"{source}: labels must be whole class indices; store y as integers")
    return y.astype(np.int64)


def _stratified_pick(y: np.ndarray, n: int, seed: int, reserve: int = 0) -> np.ndarray:
    """Sorted indices of ``n`` samples, per class in proportion to its size, one each first if
    ``n`` allows; ``reserve`` samples of each class are never picked (split keeps them)."""
    labels, counts = np.unique(y, return_counts=True)
    cap = np.maximum(counts - reserve, 0)
    n = min(n, int(cap.sum()))
    take = (cap > 0).astype(np.int64) * int(n >= np.count_nonzero(cap))
    room, rest = cap - take, n - int(take.sum())
    quota = rest * room / max(int(room.sum()), 1)
    extra = np.floor(quota).astype(np.int64)
    extra[np.argsort(extra - quota, kind="stable")[: rest - int(extra.sum())]] += 1
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(labels, take + extra)]
    return np.sort(np.concatenate(picks)).astype(np.int64)


def _to_unit_range(x: np.ndarray, source: str) -> np.ndarray:
    if x.dtype.kind in "iub":
        if x.min() < 0:
            raise DataError(f"{source}: negative pixel values; store pixels as uint8 or [0, 1]")
        top = int(x.max())
        scale = 1 if x.dtype.kind == "b" else 255 if top <= 255 else max(top, 65535)
        return x.astype(np.float32) / np.float32(scale)
    if x.dtype.kind != "f":
        raise DataError(f"{source}: pixels have dtype {x.dtype}; store x as uint8 or float")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{source}: NaN or infinite pixel values; clean or drop those images")
    lo, hi = float(x.min()), float(x.max())
    if lo >= 0 and 1 < hi <= 255:
        log.info("%s: float pixels in [0, %g] divided by 255", source, hi)
        return x / np.float32(255)
    if lo < 0 or hi > 1:
        log.warning("%s: float pixels in [%g, %g] taken as already normalised", source, lo, hi)
    return x


def _adapt(x: np.ndarray, spec: DataSpec, where: str) -> np.ndarray:
    """Match the model's channel count (replicating grayscale) and size (bilinear resize)."""
    channels, (height, width) = x.shape[1], x.shape[2:]
    if channels != spec.channels and channels != 1:
        raise DataError(f"{where}: images have {channels} channels but the model takes "
                        f"{spec.channels}; give grayscale or {spec.channels}-channel images")
    if channels != spec.channels:
        x = np.repeat(x, spec.channels, axis=1)
    if (height, width) != (spec.height, spec.width) and not spec.resize:
        raise DataError(f"{where}: images are {height}x{width} but the model takes "
                        f"{spec.height}x{spec.width}; enable --resize or give images of that size")
    if (height, width) != (spec.height, spec.width):
        x = resize_bilinear(x, spec.height, spec.width)
    return x


def _read_image(path: Path) -> np.ndarray:
    """One image file as (1, C, H, W) float32 in [0, 1]; C is 1 for grayscale, else 3."""
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading image files needs Pillow; run `pip install pillow`") from None
    try:
        with Image.open(path) as img:
            if img.mode[0] in "IF":  # 16/32-bit integer or float pixels
                arr = _to_unit_range(np.asarray(img), str(path))
            else:
                gray = img.mode in ("1", "L", "LA", "La")
                arr = np.asarray(img.convert("L" if gray else "RGB"), np.float32) / np.float32(255)
    except OSError as err:
        raise DataError(f"cannot read image {path}: {err}; fix or remove the file") from None
    return (arr[:, :, None] if arr.ndim == 2 else arr).transpose(2, 0, 1)[None]


def _load_image_folder(root: Path) -> _Raw:
    class_dirs = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                        key=lambda p: p.name)
    if not class_dirs and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in root.iterdir()):
        raise DataError(f"{root}: images but no class sub-folders, so no labels; put each "
                        "class's images in its own sub-folder")
    if not class_dirs:
        raise DataError(f"{root}: the dataset is empty (no class folders, images or IDX files); "
                        "give an ImageFolder directory with one sub-folder per class")
    per_class = [sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                        and p.is_file()) for d in class_dirs]
    for folder, files in zip(class_dirs, per_class):
        if not files:
            raise DataError(f"class folder {folder} holds no images; add some or remove it")
    labels = np.repeat(np.arange(len(class_dirs)), [len(files) for files in per_class])
    return _Raw(y=labels.astype(np.int64), classes=tuple(d.name for d in class_dirs),
                source=str(root), paths=tuple(p for files in per_class for p in files))


def _load_npz(path: Path) -> _Raw:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"cannot read {path}: {err}; save it with "
                        "numpy.savez(path, x=images, y=labels)") from None
    found = ", ".join(sorted(arrays)) or "none"
    if "x" not in arrays:
        raise DataError(f"{path}: no array 'x' (found: {found}); save images as x, labels as y")
    if "y" not in arrays:
        raise DataError(f"{path}: no labels: array 'y' missing (found: {found}); save them as y")
    x = arrays["x"][:, None] if arrays["x"].ndim == 3 else arrays["x"]
    if x.ndim != 4 or (x.shape[1] not in (1, 3, 4) and x.shape[3] not in (1, 3, 4)):
        raise DataError(f"{path}: cannot tell the channel axis of x {x.shape}; store x as N,H,W "
                        "or N,H,W,C or N,C,H,W with 1, 3 or 4 channels")
    x = x if x.shape[1] in (1, 3, 4) else x.transpose(0, 3, 1, 2)
    classes = tuple(map(str, arrays["classes"])) if "classes" in arrays else None
    return _Raw(y=_as_labels(arrays["y"], str(path)), classes=classes, source=str(path), x=x)


def _read_idx(path: Path) -> np.ndarray:
    try:
        data = path.read_bytes()
        data = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read {path}: {err}; re-download or fix the file") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number); give MNIST-format files")
    ndim, offset, dtype = data[3], 4 + 4 * data[3], np.dtype(_IDX_DTYPES[data[2]])
    dims = struct.unpack(f">{ndim}I", data[4:offset]) if len(data) >= offset else None
    if dims is None or len(data) - offset != int(np.prod(dims)) * dtype.itemsize:
        raise DataError(f"{path}: IDX data does not fit its header {dims}; file truncated?")
    return np.frombuffer(data, dtype, offset=offset).reshape(dims).astype(dtype.newbyteorder("="))


def _load_idx(path: Path) -> _Raw:
    base = re.sub(r"images([-._])idx\d(.*?)(\.gz)?$", r"labels\1idx1\2", path.name, flags=re.I)
    found = [p for p in (path.parent / base, path.parent / (base + ".gz")) if p.is_file()]
    if not found:
        raise DataError(f"{path}: no labels file {base}[.gz] beside it; put it in {path.parent}")
    images, labels = _read_idx(path), _read_idx(found[0])
    if images.ndim != 3:
        raise DataError(f"{path}: IDX images must be N,H,W, got {images.shape}; give MNIST layout")
    return _Raw(y=_as_labels(labels, str(path)), source=str(path), x=images[:, None])


def _load_idx_dir(folder: Path, split_name: str | None) -> _Raw | None:
    """The IDX pair in ``folder`` (the only one, else the split's); None if it holds none."""
    unique: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):  # a plain file sorts before its .gz twin: keep it
        if p.is_file() and _IDX_IMAGES.search(p.name):
            unique.setdefault(re.sub(r"\.gz$", "", p.name, flags=re.IGNORECASE).lower(), p)
    files = list(unique.values())
    if not files:
        return None
    if split_name is None and len(files) == 1:
        return _load_idx(files[0])
    matches = [p for p in files if p.name.lower().startswith(_SPLITS[split_name or "train"])]
    if len(matches) != 1:
        raise DataError(f"{folder}: {len(matches)} {split_name or 'train'} IDX images files among "
                        f"{[p.name for p in files]}; give the path of one images file")
    return _load_idx(matches[0])


def _load_builtin(name: str, split_name: str) -> _Raw:
    """``fashion-mnist`` (Debian's files, train or test split) or ``digits`` (scikit-learn)."""
    if name == "fashion-mnist" and split_name not in _SPLITS:
        raise DataError(f"unknown split {split_name!r}; use fashion-mnist or fashion-mnist:test")
    if name == "fashion-mnist":
        raw = _load_idx_dir(FASHION_MNIST_DIR, split_name) if FASHION_MNIST_DIR.is_dir() else None
        if raw is None:
            raise DataError(f"Fashion-MNIST not found in {FASHION_MNIST_DIR}; install it with "
                            "`apt-get install dataset-fashion-mnist` or pass the IDX files' path")
        return replace(raw, classes=FASHION_MNIST_CLASSES, source=f"fashion-mnist:{split_name}")
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the 'digits' data set needs scikit-learn; run "
                        "`pip install scikit-learn`") from None
    bunch = load_digits()  # pixel values 0..16
    return _Raw(y=bunch.target.astype(np.int64), classes=tuple(map(str, bunch.target_names)),
                source="digits", x=(bunch.images[:, None] / 16.0).astype(np.float32))
