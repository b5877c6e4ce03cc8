"""Model inputs that are not images (audio features, embeddings, tabular rows): an ``.npz``
whose ``x`` holds one sample per row, taken as it is.

For a model input of shape (N, d_1, ..., d_k) of any rank but 4 (images go through
:mod:`gpp_onnx.data`), ``x`` must be (N, d_1, ..., d_k): no scaling, resizing or
normalisation is applied, since nothing says what a feature's range should be. ``y``
(class indices) is optional, as for images. Rows are read per batch from the (memory-
mapped where stored uncompressed) array, so memory is bounded by the batch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from .data import Dataset, select
from .errors import DataError
from .sources import ArrayPixels, Raw, as_labels, check_source, read_npz

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Arrays:
    """Rows of an array as float32, read when indexed: ``x[a:b]``, ``x[idx]``."""
    array: np.ndarray
    index: np.ndarray
    source: str
    dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.array.shape[1:])

    def take(self, idx: Sequence[int] | np.ndarray) -> Arrays:
        return replace(self, index=self.index[np.asarray(idx)])

    def __getitem__(self, key) -> np.ndarray:
        key, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        rows = np.asarray(self.array[np.atleast_1d(self.index[key])], np.float32)
        return rows[0][rest] if np.ndim(self.index[key]) == 0 else rows[(slice(None), *rest)]

    def __array__(self, *args, **kwargs):
        raise TypeError("Arrays are read on demand: index them (x[a:b], x[idx])")


def load_arrays(source: str, dims: tuple[int, ...], input_name: str, labels: bool | None,
                limit: int | None = None, seed: int = 0) -> Dataset:
    """An ``.npz`` source's rows for a model input of per-sample shape `dims`."""
    check_source(source)
    path = Path(source).expanduser()
    if not (path.is_file() and path.suffix.lower() == ".npz"):
        raise DataError(f"input '{input_name}' takes {dims} numbers per sample, not images - "
                        "give an .npz whose x is (N, " + ", ".join(map(str, dims)) + ")")
    x, y, names = read_npz(path)
    if tuple(x.shape[1:]) != tuple(dims):
        raise DataError(f"{path}: x holds samples of shape {tuple(x.shape[1:])} but input "
                        f"'{input_name}' takes {tuple(dims)}; store x as (N, "
                        + ", ".join(map(str, dims)) + ")")
    if x.dtype.kind not in "iubf":
        raise DataError(f"{path}: x has dtype {x.dtype}; store numbers (float or int)")
    y = None if labels is False else y        # labels not used are not checked either
    raw = Raw(None if y is None else as_labels(y, str(path)), ArrayPixels(x, 1.0, str(path)),
              str(path), None if names is None else tuple(map(str, names)))
    y, idx = select(raw, labels, limit, seed)
    classes = () if y is None else raw.classes or tuple(str(i) for i in range(int(y.max()) + 1))
    ds = Dataset(Arrays(x, idx, str(path)), None if y is None else y[idx], classes, str(path))
    log.info("%d samples %s from %s, %s numbers each, taken as they are", len(ds),
             f"of {ds.num_classes} classes" if ds.labelled else "without labels", path, dims)
    return ds
