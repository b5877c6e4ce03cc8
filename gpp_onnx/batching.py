"""A dataset's batches: in order or shuffled by seed, one process's share of each in a
distributed run, prepared in this process or, for decoded files, by torch DataLoader
workers a few batches ahead (:func:`iter_batches`; ``gpp_onnx.data`` exports it)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np

from .errors import DataError, GppError

if TYPE_CHECKING:
    from .data import Dataset


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
        import torch

        try:
            return torch.from_numpy(self.ds.x[chunk]), chunk
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
        yield x.numpy(), None if ds.y is None else ds.y[chunk]
