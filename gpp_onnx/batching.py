"""A dataset's batches: in order or shuffled by seed, one process's share of each in a
distributed run, prepared in this process or, for decoded files, by torch DataLoader
workers a few batches ahead (:func:`iter_batches`; ``gpp_onnx.data`` exports it).

A batch's ``x`` is one array for a model with one input, or a :class:`Feeds` for a model
with several (:class:`gpp_onnx.arrays.Inputs`): each input's array, one row per sample,
except the inputs without a batch axis (a scalar, a recurrent net's initial state), fed
the same array in every batch. Code that runs a batch takes both through the helpers
below (rows, parts, padding, feeds, tensors), never ``len(x)``, which counts a dict's
inputs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np

from .errors import DataError, GppError

if TYPE_CHECKING:
    from .data import Dataset


class Feeds(dict):
    """A batch of a model with several inputs: {input name: array (numpy or torch)};
    ``whole``: the inputs fed their whole array (no rows to take)."""

    def __init__(self, values, whole=frozenset()):
        super().__init__(values)
        self.whole = frozenset(whole)

    def per_row(self, fn) -> Feeds:
        """`fn` applied to each input's rows, the whole inputs as they are."""
        return Feeds({k: v if k in self.whole else fn(v) for k, v in self.items()},
                     self.whole)

    def each(self, fn) -> Feeds:
        return Feeds({k: fn(v) for k, v in self.items()}, self.whole)


def row_input(inputs, x):
    """Of a session's `inputs`, the first that batch `x` (or ``Inputs``) gives rows of: its
    dim 0 is the batch."""
    whole = getattr(x, "whole", ())
    return next(i for i in inputs if i.name not in whole)


def rows(x) -> int:
    """The samples in batch `x`."""
    if isinstance(x, Feeds):
        return len(next(v for k, v in x.items() if k not in x.whole))
    return len(x)


def part(x, key):
    """Rows `key` (a slice or indices) of batch `x`."""
    return x.per_row(lambda v: v[key]) if isinstance(x, Feeds) else x[key]


def padded(x, n: int):
    """Batch `x` with zero rows appended up to `n` rows (a model that fixes its batch)."""
    def pad(a):
        return np.concatenate([a, np.zeros((n - len(a), *a.shape[1:]), a.dtype)])
    return x.per_row(pad) if isinstance(x, Feeds) else pad(x)


def feeds(x, name: str) -> dict:
    """Batch `x` as a run's inputs by name: `x` for the input `name` where it is one array
    (numpy or torch), else as it is."""
    return dict(x) if isinstance(x, dict) else {name: x}


def tensors(x, device=None):
    """Batch `x` as torch tensors on `device` (the same structure)."""
    import torch

    def one(a):
        t = torch.from_numpy(a) if isinstance(a, np.ndarray) else a
        return t if device is None else t.to(device)
    return x.each(one) if isinstance(x, Feeds) else one(x)


def arrays(x):
    """Batch `x` of torch tensors as numpy arrays (the same structure)."""
    return x.each(lambda v: v.numpy()) if isinstance(x, Feeds) else x.numpy()


def module_inputs(x):
    """Batch `x` of tensors as ``OnnxModule.run``'s inputs: by name, or the one input."""
    return x if isinstance(x, dict) else [x]


def iter_batches(ds: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0,
                 part: tuple[int, int] = (0, 1)
                 ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Yield (x, y) numpy batches of at most ``batch_size`` (y None without labels),
    prepared as they are needed
    (by ``ds.workers`` processes, a few batches ahead, when it has any); shuffled
    deterministically by seed. ``part=(i, k)``: of each batch of n, only the i-th of k
    contiguous shares, ``[n*i//k, n*(i+1)//k)``, is prepared and yielded (one process of
    a distributed run); batches with fewer than k images are skipped on every share."""
    if batch_size < 1:
        raise DataError(f"batch size {batch_size} must be at least 1")
    order = np.random.default_rng(seed).permutation(len(ds)) if shuffle else np.arange(len(ds))
    chunks = [order[start:start + batch_size] for start in range(0, len(ds), batch_size)]
    i, k = part
    if k > 1:
        chunks = [c[len(c) * i // k: len(c) * (i + 1) // k] for c in chunks if len(c) >= k]
    if ds.workers > 0 and len(chunks) > 1:
        yield from _with_workers(ds, chunks)
        return
    for chunk in chunks:
        yield ds.x[chunk], None if ds.y is None else ds.y[chunk]


@dataclass(frozen=True, eq=False)
class _Batches:
    """Map-style view for torch's DataLoader: one item is one whole batch, as a tensor so
    that it comes back through shared memory instead of a pickle."""
    ds: Dataset

    def __getitem__(self, chunk: np.ndarray):
        try:
            return tensors(self.ds.x[chunk]), chunk
        except GppError as err:  # sent back as itself, not as the worker's traceback
            return err, chunk


def _as_is(batch):
    return batch


def _with_workers(ds: Dataset, chunks: list[np.ndarray]):
    from torch.utils.data import DataLoader

    loader = DataLoader(_Batches(ds), sampler=chunks, batch_size=None, collate_fn=_as_is,
                        num_workers=ds.workers, prefetch_factor=2)
    for x, chunk in loader:
        if isinstance(x, GppError):
            raise x
        yield arrays(x), None if ds.y is None else ds.y[chunk]
