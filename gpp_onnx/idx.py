"""The IDX file format (MNIST's): a big-endian header (two zero bytes, a dtype code, the
number of dimensions, then each dimension as a 32-bit integer) followed by the raw array.
Read memory-mapped when uncompressed, decompressed once when gzipped."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from .errors import DataError

_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """An IDX array: memory-mapped if uncompressed, else decompressed once (raw dtype)."""
    try:
        with open(path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
        data = gzip.decompress(path.read_bytes()) if gz else None
        with open(path, "rb") as f:
            head = data[:4] if gz else f.read(4)
            if len(head) < 4 or head[:2] != b"\0\0" or head[2] not in _DTYPES:
                raise DataError(f"{path}: not an IDX file (bad magic number); give MNIST-format "
                                "files")
            ndim, dtype = head[3], np.dtype(_DTYPES[head[2]])
            dims_bytes = data[4:4 + 4 * ndim] if gz else f.read(4 * ndim)
        size = len(data) if gz else path.stat().st_size
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read {path}: {err}; re-download or fix the file") from None
    offset = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", dims_bytes) if len(dims_bytes) == 4 * ndim else None
    if dims is None or size - offset != int(np.prod(dims)) * dtype.itemsize:
        raise DataError(f"{path}: IDX data does not fit its header {dims}; file truncated?")
    if gz:
        return np.frombuffer(data, dtype, offset=offset).reshape(dims)
    if int(np.prod(dims)) == 0:
        return np.zeros(dims, dtype)
    return np.memmap(path, dtype, "r", offset, dims)
