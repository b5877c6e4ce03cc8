"""Image data for gpp-onnx: a dataset that reads, scales and resizes its images on demand,
batch by batch (:mod:`gpp_onnx.batching`), so memory is bounded by a batch, not by the data
set (numpy only).

Sources for :func:`load_dataset` (``DataSpec.source``; an existing path wins over a name; how
each is read lazily is in :mod:`gpp_onnx.sources`):
* ImageFolder directory: one sub-folder per class, classes sorted by folder name (label = rank),
  images (png, jpg, jpeg, bmp, gif, tif, tiff, webp, ppm, pgm, pbm) below each; read by Pillow.
* ``.npz``: arrays ``x`` (N,H,W | N,H,W,C | N,C,H,W; uint8, ints or floats), ``y`` (N class
  indices), optionally ``classes`` (names).
* IDX images file, MNIST layout ``*-images-idx3-ubyte[.gz]``, labels beside it as
  ``*-labels-idx1-ubyte[.gz]``; or a directory holding such a pair (``DIR:test`` for ``t10k``).
* ``fashion-mnist[:test]``: Debian's copy in /usr/share/datasets/fashion-mnist (default: train).
* ``digits``: scikit-learn's bundled 8x8 digits, the embedded default (:data:`DEFAULT_SOURCE`).

Inputs that are not images (another rank), and the inputs of a model that takes several,
come from an ``.npz`` taken as it is (:mod:`gpp_onnx.arrays`).

Without labels (a folder of images with no class sub-folders, an ``.npz`` with only ``x``,
an IDX images file alone, or any source with ``DataSpec.labels=False``) the dataset's ``y``
is None: label-free pruning distils the original model's outputs instead.

Each batch goes decode -> [0, 1] -> resize -> replicate channels -> ``(x - mean[c]) / std[c]``.
Scaling (torchvision's ToTensor convention): uint8 / 255, larger 16-bit values / 65535, floats
in (1, 255] / 255, digits / 16, decided once per source. Grayscale is replicated for a
C-channel model; colour for a one-channel model is an error. Other sizes are resized
bilinearly (half-pixel centres like torch's ``interpolate(..., align_corners=False)``, no
antialias) unless ``resize=False``, which makes them an error. Both errors, unreadable files
and bad labels are raised by :func:`load_dataset`, before any batch is read. Subsets and
splits are index views of the same pixel store; nothing holds the preprocessed set.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from .batching import iter_batches
from .errors import DataError
from .report import plural
from .image_files import IMAGE_EXTENSIONS, FilePixels
from .sources import (FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, ArrayPixels, check_source,
                      resolve)

log = logging.getLogger(__name__)

DEFAULT_SOURCE = "digits"
MAX_CLASSES = 1 << 20   # labels are class indices: one past this is a corrupt value
__all__ = ["DEFAULT_SOURCE", "FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "IMAGE_EXTENSIONS",
           "DataSpec", "Dataset", "Images", "check_labels", "check_source", "iter_batches",
           "load_dataset", "resize_bilinear", "split"]


@dataclass(frozen=True)
class DataSpec:
    """Where the data comes from and what input the model takes (C, H, W, normalisation);
    ``workers``: processes that prepare batches (None: by source, see :func:`load_dataset`)."""
    source: str
    channels: int
    height: int
    width: int
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    resize: bool = True
    limit: int | None = None
    seed: int = 0
    workers: int | None = None
    labels: bool | None = None     # True: required, False: ignored, None: used if present
    layout: str = "NCHW"           # the model input's layout: NCHW or NHWC
    pixels: bool = False           # the input takes uint8 pixels 0..255 (cast in the graph)

    def __post_init__(self) -> None:
        if min(self.channels, self.height, self.width) < 1:
            raise DataError(f"input {self.channels}x{self.height}x{self.width}: sizes must be > 0")
        if self.limit is not None and self.limit < 1:
            raise DataError(f"--limit {self.limit} must be a positive number of samples")
        if self.workers is not None and self.workers < 0:
            raise DataError(f"--workers {self.workers} must be 0 (none) or more")
        for name in ("mean", "std"):
            values = getattr(self, name)
            values = None if values is None else tuple(map(float, values))
            object.__setattr__(self, name, values)
            if values is not None and len(values) not in (1, self.channels):
                which = "1 value" if self.channels == 1 else f"1 or {self.channels} values"
                raise DataError(f"--{name} has {len(values)} values but the model takes "
                                f"{self.channels} channel(s); give {which}")
            if values is not None and not np.isfinite(values).all():
                raise DataError(f"--{name} {','.join(map(str, values))} must be finite "
                                "numbers, e.g. 0.5")
        if self.std is not None and min(self.std) <= 0:
            raise DataError(f"--std {self.std} must be all positive")
        if self.pixels and (self.mean is not None or self.std is not None):
            raise DataError("the model takes uint8 pixels and normalises them itself - leave "
                            "out --mean and --std")


@dataclass(frozen=True, eq=False)
class Images:
    """A dataset's images as the model takes them, prepared when indexed: ``x[i]``, ``x[a:b]``,
    ``x[idx]`` (and ``x[idx, ...]``) return float32 (n, C, H, W) arrays; ``index`` maps
    positions to the pixel store, so ``take`` is a view and nothing else is kept."""
    pixels: ArrayPixels | FilePixels
    spec: DataSpec
    index: np.ndarray

    @classmethod
    def from_array(cls, x: np.ndarray, source: str = "memory") -> Images:
        """Images already prepared (float, N,C,H,W): read as they are."""
        x = np.asarray(x, np.float32)
        if x.ndim != 4 or min(x.shape[1:]) < 1:
            raise DataError(f"{source}: x must be (N,C,H,W), got {x.shape}; reshape the array")
        return cls(ArrayPixels(x, 1.0, source), DataSpec(source, *x.shape[1:]),
                   np.arange(len(x)))

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        c, h, w = self.spec.channels, self.spec.height, self.spec.width
        return (len(self), h, w, c) if self.spec.layout == "NHWC" else (len(self), c, h, w)

    def take(self, idx: Sequence[int] | np.ndarray) -> Images:
        return replace(self, index=self.index[np.asarray(idx)])

    def __getitem__(self, key) -> np.ndarray:
        key, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        pos = self.index[key]
        x = self._prepare(np.atleast_1d(pos))
        return x[0][rest] if np.ndim(pos) == 0 else x[(slice(None), *rest)]

    def __array__(self, *args, **kwargs):
        raise TypeError("Images are read on demand: index them (x[a:b], x[idx]); x[:] reads "
                        "all of them")

    def _prepare(self, pos: np.ndarray) -> np.ndarray:
        spec = self.spec
        blocks = [_adapt(block, spec, self.pixels) for block in self.pixels.read(pos)]
        if not blocks:
            return np.zeros((0, *self.shape[1:]), self.dtype)
        x = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
        if spec.mean is not None:
            x = x - np.asarray(spec.mean, np.float32).reshape(1, -1, 1, 1)
        if spec.std is not None:
            x = x / np.asarray(spec.std, np.float32).reshape(1, -1, 1, 1)
        if spec.layout == "NHWC":
            x = x.transpose(0, 2, 3, 1)
        if spec.pixels:
            return np.ascontiguousarray(np.clip(np.rint(x * 255), 0, 255), np.uint8)
        return np.ascontiguousarray(x, np.float32)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if self.spec.pixels else np.float32)


@dataclass(frozen=True, eq=False)
class Dataset:
    """Images, labelled or not: ``x`` (:class:`Images`, or an (N,C,H,W) float array taken as
    it is), ``y`` (N,) int64 class indices into ``classes``, or None without labels (then
    ``classes`` is empty); ``workers`` prepare batches in :func:`iter_batches` (0: in this
    process)."""
    x: Images
    y: np.ndarray | None
    classes: tuple[str, ...]
    source: str
    workers: int = 0

    def __post_init__(self) -> None:
        x = self.x if hasattr(self.x, "take") else Images.from_array(self.x, self.source)
        y = None if self.y is None else np.asarray(self.y, np.int64)
        if y is not None and y.ndim != 1:
            raise DataError(f"{self.source}: y must be (N,), got {y.shape}; reshape the labels")
        if y is not None and len(x) != len(y):
            raise DataError(f"{self.source}: {len(x)} images but {len(y)} labels; give one each")
        classes = () if y is None else tuple(map(str, self.classes))
        for name, value in (("x", x), ("y", y), ("classes", classes)):
            object.__setattr__(self, name, value)

    @property
    def labelled(self) -> bool:
        return self.y is not None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, idx: Sequence[int] | np.ndarray) -> Dataset:
        """The samples at ``idx`` (indices or a boolean mask): a view, same classes and source."""
        idx = np.asarray(idx)
        idx = np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.intp)
        return replace(self, x=self.x.take(idx), y=None if self.y is None else self.y[idx])


def load_dataset(spec: DataSpec) -> Dataset:
    """Resolve ``spec.source``, check it, and return a view of the ``limit`` subset that
    prepares images for the model input on demand. Labels, channels, sizes (from headers for
    image files) and pixel ranges are checked here, before any batch is read."""
    raw = resolve(spec.source, labels=spec.labels is not False, channels=spec.channels)
    y, idx = select(raw, spec.labels, spec.limit, spec.seed)
    for shape, first in raw.pixels.shapes(idx).items():
        _check_fit(shape, spec, first)
    classes = () if y is None else raw.classes or tuple(str(i) for i in range(int(y.max()) + 1))
    ds = Dataset(Images(raw.pixels, spec, idx), None if y is None else y[idx], classes,
                 raw.source, _workers(spec, raw.pixels))
    log.info("%d samples %s from %s, prepared as %s per batch%s", len(ds),
             f"of {ds.num_classes} classes" if ds.labelled
             else "(labels not used)" if spec.labels is False else "without labels", ds.source,
             ds.x.shape[1:], f" by {plural(ds.workers, 'worker process')}" if ds.workers else "")
    return ds


def select(raw, labels: bool | None, limit: int | None, seed: int
           ) -> tuple[np.ndarray | None, np.ndarray]:
    """The labels to use (None: without) and the indices of the ``limit`` subset
    (class-stratified with labels, at random without); labels checked."""
    n_x, where, y = len(raw.pixels), raw.source, raw.y if labels is not False else None
    if y is None and labels:
        raise DataError(f"{where}: no labels (no class sub-folders, no array 'y' or no IDX "
                        "labels file); give labelled data (a sub-folder per class, an .npz "
                        "with y, an IDX labels file) - of the commands, only prune and "
                        "compare work without labels")
    if n_x == 0:
        raise DataError(f"{where}: the dataset is empty; give some images")
    if y is not None:
        return y, _check_labels_of(raw, y, limit, seed)
    if limit is not None and limit < n_x:
        return None, np.sort(np.random.default_rng(seed).permutation(n_x)[:limit])
    return None, np.arange(n_x)


def _check_labels_of(raw, y: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """Labels fit the images and name two classes or more; the ``limit`` subset's indices."""
    where = raw.source
    if len(raw.pixels) != len(y):
        raise DataError(f"{where}: {len(raw.pixels)} images but {len(y)} labels; give one "
                        "label each")
    if y.min() < 0:
        raise DataError(f"{where}: negative label {y.min()}; labels must be class indices")
    if raw.classes is None and y.max() >= MAX_CLASSES:
        # the classes are named 0..max: one corrupt label (-1 stored as uint32) named 4.3
        # billion of them and ran out of memory before the labels met the model's outputs
        raise DataError(f"{where}: label {y.max()} is no class index (over {MAX_CLASSES} "
                        "classes); fix or drop the labels that large (-1 stored unsigned?)")
    if raw.classes is not None and y.max() >= len(raw.classes):
        raise DataError(f"{where}: label {y.max()} but {len(raw.classes)} class names; the "
                        "labels or the names are wrong - fix the .npz's y or classes, or "
                        "download the data set again")
    if len(present := np.unique(y)) < 2:
        raise DataError(f"{where}: only one class (label {present[0]}); give two classes or more")
    if limit is None or limit >= len(y):
        return np.arange(len(y))
    idx = _stratified_pick(y, limit, seed)
    if len(np.unique(y[idx])) < 2:
        raise DataError(f"{where}: --limit {limit} keeps only one class; raise it")
    return idx


def _workers(spec: DataSpec, pixels: ArrayPixels | FilePixels) -> int:
    """Decoding files pays for worker processes; slicing an array and resizing does not."""
    if spec.workers is not None:
        return spec.workers
    return min(4, (os.cpu_count() or 1) - 1) if isinstance(pixels, FilePixels) else 0


def split(ds: Dataset, val_fraction: float, seed: int = 0, reserve: int = 1
          ) -> tuple[Dataset, Dataset]:
    """Deterministic class-stratified (train, val) split of index views; every class keeps
    `reserve` train samples, or all it has where it has no more (without labels: a seeded
    random split)."""
    if not 0 < val_fraction < 1:
        raise DataError(f"validation fraction {val_fraction} must be strictly between 0 and 1")
    n_val = min(max(int(round(len(ds) * val_fraction)), 1), len(ds) - 1)
    if not ds.labelled:
        if n_val < 1:
            raise DataError(f"{ds.source}: too few samples to split; give two images or more")
        val_idx = np.sort(np.random.default_rng(seed).permutation(len(ds))[:n_val])
        return ds.subset(np.setdiff1d(np.arange(len(ds)), val_idx)), ds.subset(val_idx)
    val_idx = _stratified_pick(ds.y, n_val, seed, reserve=reserve) if n_val > 0 else []
    if len(val_idx) == 0:
        raise DataError(f"{ds.source}: too few samples to split; give two or more of a class")
    return ds.subset(np.setdiff1d(np.arange(len(ds)), val_idx)), ds.subset(val_idx)


def check_labels(ds: Dataset, num_outputs: int) -> None:
    """Raise DataError when a label has no matching model output (label >= num_outputs)."""
    if not ds.labelled:
        return
    top = int(ds.y.max()) if len(ds) else -1
    if top >= num_outputs:
        raise DataError(f"{ds.source}: label {top} needs at least {top + 1} model outputs but the "
                        f"model has {num_outputs}; use data whose classes match the model")
    if ds.num_classes != num_outputs:
        log.warning("%s: %d classes for %d model outputs", ds.source, ds.num_classes, num_outputs)


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


def _check_fit(shape: tuple[int, ...], spec: DataSpec, where: str) -> None:
    """Images of (C, H, W) ``shape`` can be adapted to the model input, else DataError."""
    channels, height, width = shape
    if channels != spec.channels and channels != 1 and (channels, spec.channels) != (4, 3):
        raise DataError(f"{where}: images have {channels} channels but the model takes "
                        f"{spec.channels}; give grayscale or {spec.channels}-channel images")
    if (height, width) != (spec.height, spec.width) and not spec.resize:
        raise DataError(f"{where}: images are {height}x{width} but the model takes "
                        f"{spec.height}x{spec.width}; drop --no-resize (images are then "
                        "resized) or give images of that size")


def _adapt(x: np.ndarray, spec: DataSpec, pixels) -> np.ndarray:
    """Match the model's size (bilinear resize) and channel count (replicating grayscale,
    dropping the alpha of RGBA arrays as it is dropped from RGBA image files)."""
    _check_fit(x.shape[1:], spec, getattr(pixels, "source", "image file"))
    if x.shape[1] == 4 and spec.channels == 3:
        x = x[:, :3]
    if x.shape[2:] != (spec.height, spec.width):
        x = resize_bilinear(x, spec.height, spec.width)
    if x.shape[1] != spec.channels:
        x = np.repeat(x, spec.channels, axis=1)
    return x


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
    rng = np.random.default_rng(seed)
    # the remainder goes to the largest fractions; fewer than one per class are spread at
    # random (in class order, --limit 50 of 100 equal classes took classes 0-49 only)
    order = (rng.permutation(len(labels)) if n < np.count_nonzero(cap)
             else np.arange(len(labels)))
    extra[order[np.argsort((extra - quota)[order], kind="stable")[: rest - int(extra.sum())]]] += 1
    picks = [rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(labels, take + extra)]
    return np.sort(np.concatenate(picks)).astype(np.int64)
