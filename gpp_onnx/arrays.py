"""Model inputs that are not images (audio features, embeddings, tabular rows), and the
inputs of a model that takes several: an ``.npz`` holding one sample per row, taken as it is.

For a model input of shape (N, d_1, ..., d_k) of any rank but 4 (images go through
:mod:`gpp_onnx.data`), ``x`` must be (N, d_1, ..., d_k): no scaling, resizing or
normalisation is applied, since nothing says what a feature's range should be. ``y``
(class indices) is optional, as for images. Rows are read per batch from the (memory-
mapped where stored uncompressed) array, so memory is bounded by the batch.

A model with several inputs (:func:`load_inputs`) takes one array per input, stored under
the input's name (``numpy.savez(path, image=..., im_info=..., y=labels)``), each (N, ...)
with the per-sample shape the input takes, of any rank, taken as it is too: which input is
an image, and how it is scaled, is the model's business. An input without a batch axis
(a scalar such as a sample rate, or one whose first size is fixed while the others'
batch is free, such as a recurrent net's initial state) takes one array of exactly its
shape, fed whole with every batch. Float inputs are fed float32 (a float16 input is cast
at the run), integer and boolean inputs the type they declare.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from .batching import Feeds, rows
from .data import Dataset, select
from .errors import DataError
from .npz import is_npz, read_npz, read_npz_arrays
from .sources import ArrayPixels, Raw, as_labels, check_source

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
    if not is_npz(path):
        raise DataError(f"input '{input_name}' takes {dims} numbers per sample, not images - "
                        "give an .npz whose x is (N, " + ", ".join(map(str, dims)) + ")")
    x, y, names = read_npz(path)
    if tuple(x.shape[1:]) != tuple(dims):
        raise DataError(f"{path}: x holds samples of shape {tuple(x.shape[1:])} but input "
                        f"'{input_name}' takes {tuple(dims)}; store x as (N, "
                        + ", ".join(map(str, dims)) + ")")
    if x.dtype.kind not in "iubf":
        raise DataError(f"{path}: x has dtype {x.dtype}; store numbers (float or int)")
    check_finite(x, f"{path}: x")
    y = None if labels is False else y        # labels not used are not checked either
    raw = Raw(None if y is None else as_labels(y, str(path)), ArrayPixels(x, 1.0, str(path)),
              str(path), None if names is None else tuple(map(str, names)))
    y, idx = select(raw, labels, limit, seed)
    classes = () if y is None else raw.classes or tuple(str(i) for i in range(int(y.max()) + 1))
    ds = Dataset(Arrays(x, idx, str(path)), None if y is None else y[idx], classes, str(path))
    log.info("%d samples %s from %s, %s numbers each, taken as they are", len(ds),
             f"of {ds.num_classes} classes" if ds.labelled else "without labels", path, dims)
    return ds


@dataclass(frozen=True, eq=False)
class Inputs:
    """Rows of several inputs' arrays, read when indexed: ``x[a:b]`` and ``x[idx]`` return
    ``Feeds`` {input name: rows}, each in the type its input takes, the ``whole`` inputs'
    arrays whole."""
    arrays: dict[str, np.ndarray]
    dtypes: dict[str, np.dtype]
    index: np.ndarray
    source: str
    whole: frozenset = frozenset()

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, int]:
        """(samples, numbers per sample over all inputs): the size memory budgets read."""
        return len(self), sum(int(np.prod(a.shape[1:])) for k, a in self.arrays.items()
                              if k not in self.whole)

    @property
    def spec(self) -> tuple:
        """Each input's name, per-sample shape and type (what the processes of a
        distributed run agree on)."""
        return tuple((k, a.shape if k in self.whole else a.shape[1:], str(self.dtypes[k]))
                     for k, a in self.arrays.items())

    def take(self, idx: Sequence[int] | np.ndarray) -> Inputs:
        return replace(self, index=self.index[np.asarray(idx)])

    def __getitem__(self, key) -> Feeds:
        pos = np.atleast_1d(self.index[key])
        return Feeds({k: np.array(a, self.dtypes[k]) if k in self.whole  # a copy: writable
                      else np.asarray(a[pos], self.dtypes[k]) for k, a in self.arrays.items()},
                     self.whole)

    def __array__(self, *args, **kwargs):
        raise TypeError("Inputs are read on demand: index them (x[a:b], x[idx])")


def load_inputs(source: str, specs, labels: bool | None, limit: int | None = None,
                seed: int = 0, whole: frozenset | None = None) -> Dataset:
    """An ``.npz`` source's rows for each of a model's inputs (`specs`: the model's
    ``graph.InputSpec`` list, shapes concrete, or those the data holds; `whole`: the
    model's inputs fed whole, ``whole_inputs`` of `specs` by default)."""
    path, arrays, dtypes, whole, y, classes = read_inputs(source, specs, whole)
    for name, a in arrays.items():
        check_finite(a, f"{path}: {name}")
    names = [s.name for s in specs]
    first = next(n for n in names if n not in whole)
    if "y" in names:
        if labels:
            raise DataError(f"{path}: the model's input 'y' takes the array y, so the .npz "
                            "holds no labels - use a command that works without labels "
                            "(prune, compare)")
        y = classes = None
    classes = None if "classes" in names else classes     # an input's array, not names
    y = None if labels is False else y
    raw = Raw(None if y is None else as_labels(y, str(path)),
              ArrayPixels(arrays[first], 1.0, str(path)),
              str(path), None if classes is None else tuple(map(str, classes)))
    y, idx = select(raw, labels, limit, seed)
    classes = () if y is None else raw.classes or tuple(str(i) for i in range(int(y.max()) + 1))
    ds = Dataset(Inputs(arrays, dtypes, idx, str(path), whole), None if y is None else y[idx],
                 classes, str(path))
    log.info("%d samples %s from %s for %d inputs (%s), taken as they are", len(ds),
             f"of {ds.num_classes} classes" if ds.labelled else "without labels", path,
             len(names), ", ".join(f"{k} {tuple(a.shape)} whole" if k in whole
                                   else f"{k} {tuple(a.shape[1:])}" for k, a in arrays.items()))
    return ds


SCAN_ROWS_BYTES = 64 << 20   # how much of an array one step of the NaN scan reads


def check_finite(a: np.ndarray, where: str) -> None:
    """DataError where float array `a` holds NaN or infinite values (scanned a few rows at a
    time, so a memory map is never read whole): they reach scoring, the repair's least
    squares and the fidelity figures, which then fail or print nan."""
    if a.dtype.kind != "f" or a.size == 0:
        return
    flat = a.reshape(1, -1) if a.ndim == 0 else a.reshape(len(a), -1)
    step = max(1, SCAN_ROWS_BYTES // max(flat.shape[1] * a.dtype.itemsize, 1))
    for start in range(0, len(flat), step):
        bad = ~np.isfinite(np.asarray(flat[start:start + step])).all(axis=1)
        if bad.any():
            raise DataError(f"{where} holds NaN or infinite values (sample "
                            f"{start + int(np.argmax(bad))}); clean or drop those samples")


def whole_inputs(specs) -> frozenset:
    """The inputs of `specs` fed whole (module docstring): the scalars, and those whose
    first size is fixed where another input's is free (the batch), or, where every input
    fixes it, differs from the batch's (the largest: a (1, K) state beside images an
    export fixed at batch 4)."""
    ranked = [s for s in specs if len(s.shape)]
    if any(s.free_batch for s in ranked):
        return frozenset(s.name for s in specs if not s.shape or not s.free_batch)
    batch = max((s.shape[0] for s in ranked), default=None)
    return frozenset(s.name for s in specs if not s.shape or s.shape[0] != batch)


def read_inputs(source: str, specs, whole: frozenset | None = None) -> tuple:
    """(path, {input: array as stored}, {input: the type it is fed}, the inputs fed whole,
    y or None, class names or None) of an ``.npz`` for the inputs `specs`; DataError where
    an input's array is missing or does not fit it (reads array headers, no rows, where
    they are stored uncompressed)."""
    names = [s.name for s in specs]
    usage = "numpy.savez(path, " + ", ".join(
        f"{n}=..." if n.isidentifier() else f"**{{'{n}': ...}}" for n in names) + ", y=labels)"
    check_source(source)
    path = Path(source).expanduser()
    if not is_npz(path):
        raise DataError(f"--data {source} is not an .npz but must hold the model's inputs "
                        f"{', '.join(names)} - give an .npz with one array per input, "
                        f"named as the inputs: {usage}, or images for one input and "
                        "--feed NAME=VALUES for the others")
    arrays, y, classes = read_npz_arrays(path, tuple(names), f"store one array per input, "
                                         f"named as the inputs: {usage}")
    dtypes, rows = {}, {}
    whole = whole_inputs(specs) if whole is None else whole & set(names)
    if len(whole) == len(specs):
        raise DataError(f"none of the model's inputs ({', '.join(names)}) has a batch axis, "
                        "so no data set can be fed in batches - prune it without --data")
    for spec in specs:
        a, want = arrays[spec.name], tuple(spec.shape[1:])
        if spec.name in whole:
            if tuple(a.shape) != tuple(spec.shape):
                raise DataError(f"{path}: {spec.name} has shape {tuple(a.shape)} but input "
                                f"'{spec.name}' has no batch axis and takes {tuple(spec.shape)}"
                                " whole (fed with every batch); store one array of that shape")
        elif a.ndim != len(spec.shape) or tuple(a.shape[1:]) != want:
            raise DataError(f"{path}: {spec.name} holds samples of shape {tuple(a.shape[1:])} "
                            f"but input '{spec.name}' takes {want}; store it as (N, "
                            + ", ".join(map(str, want)) + ")")
        kind = np.dtype(spec.dtype).kind
        if a.dtype.kind not in ("iub" if kind in "iub" else "iubf"):
            raise DataError(f"{path}: {spec.name} has dtype {a.dtype} but input '{spec.name}' "
                            f"takes {np.dtype(spec.dtype).name}; store "
                            + ("integers" if kind in "iub" else "numbers"))
        dtypes[spec.name] = np.dtype(np.float32) if kind == "f" else np.dtype(spec.dtype)
        if spec.name not in whole:
            rows[spec.name] = len(a)
    if len(set(rows.values())) > 1:
        raise DataError(f"{path}: the inputs' arrays hold different numbers of samples ("
                        + ", ".join(f"{k} {n}" for k, n in rows.items())
                        + "); give each input one row per sample")
    return path, arrays, dtypes, whole, y, classes


@dataclass(frozen=True, eq=False)
class Fed:
    """A data set's rows for some inputs of a model with several (``x``: images or arrays
    for the input `name`, or ``Inputs``) and the same values for the others (--feed:
    ``constants``, per-sample rows (1, ...) repeated for each sample, or the whole inputs'
    arrays): indexed, a ``Feeds`` of every input."""
    x: object
    name: str
    constants: dict[str, np.ndarray]
    whole: frozenset

    def __len__(self) -> int:
        return len(self.x)

    @property
    def index(self) -> np.ndarray:
        return self.x.index

    @property
    def shape(self) -> tuple[int, int]:
        """(samples, numbers per sample over all inputs): the size memory budgets read."""
        fed = sum(v.size for k, v in self.constants.items() if k not in self.whole)
        return len(self), int(np.prod(self.x.shape[1:])) + fed

    @property
    def spec(self) -> tuple:
        return (getattr(self.x, "spec", self.x.shape[1:]),
                tuple((k, v.shape, v.tobytes()) for k, v in self.constants.items()))

    def take(self, idx: Sequence[int] | np.ndarray) -> Fed:
        return replace(self, x=self.x.take(idx))

    def __getitem__(self, key) -> Feeds:
        got = self.x[key]
        feeds = Feeds(got, got.whole) if isinstance(got, Feeds) else Feeds({self.name: got})
        n = rows(feeds)
        for k, v in self.constants.items():
            feeds[k] = v.copy() if k in self.whole else np.repeat(v, n, axis=0)
        return Feeds(feeds, feeds.whole | (self.whole & set(self.constants)))

    def __array__(self, *args, **kwargs):
        raise TypeError("Fed inputs are read on demand: index them (x[a:b], x[idx])")


def constants_for(specs, feeds, whole: frozenset) -> dict[str, np.ndarray]:
    """--feed values as arrays for the inputs they name (`specs`: the model's): an input fed
    whole takes its whole shape, another one sample's, as (1, ...); one value fills it."""
    by_name = {s.name: s for s in specs}
    pairs = tuple(feeds.items() if isinstance(feeds, dict) else feeds)
    names = [name for name, _ in pairs]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        raise DataError(f"--feed gives '{twice}' twice - give each input one --feed")
    out = {}
    for name, values in pairs:
        spec = by_name.get(name)
        if spec is None:
            raise DataError(f"--feed names '{name}', which is not an input of the model - its "
                            f"inputs are {', '.join(by_name)}")
        shape = tuple(spec.shape) if name in whole else (1, *spec.shape[1:])
        size = int(np.prod(shape))
        values = np.asarray(values, np.float64)
        if values.size not in (1, size):
            raise DataError(f"--feed {name} has {values.size} values but input '{name}' takes "
                            f"{shape[1:] if name not in whole else shape}"
                            f"{' per sample' if name not in whole else ''}: give {size} "
                            "(or one for all)")
        kind = np.dtype(spec.dtype).kind
        if kind in "iub" and not np.all(values == np.round(values)):
            raise DataError(f"--feed {name}: input '{name}' takes {np.dtype(spec.dtype).name} "
                            "values; give whole numbers")
        info = np.finfo(spec.dtype) if kind == "f" else np.iinfo(spec.dtype) \
            if kind in "iu" else None
        if not np.all(np.isfinite(values)) or info is not None and (
                values.min() < info.min or values.max() > info.max):
            span = "" if info is None else f" from {info.min:g} to {info.max:g}"
            raise DataError(f"--feed {name}: input '{name}' takes {np.dtype(spec.dtype).name} "
                            f"values{span}; give finite numbers in that range")
        dtype = np.float32 if kind == "f" else spec.dtype
        # all of them in the input's layout, or one for every element (a scalar input too)
        values = values.reshape(shape if values.size == size else ())
        out[name] = np.broadcast_to(values, shape).astype(dtype)
    return out
