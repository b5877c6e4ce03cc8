"""Reading ``.npz`` files: the arrays asked for, each memory-mapped where it is stored
uncompressed (``numpy.savez``: the member's bytes are located through its zip local
header), else read once (``numpy.savez_compressed``); ``y`` and ``classes`` are small and
read whole."""
from __future__ import annotations

import logging
import struct
import zipfile
from pathlib import Path

import numpy as np

from .errors import DataError

log = logging.getLogger(__name__)


def is_npz(source) -> bool:
    """Whether `source` names an existing ``.npz`` file."""
    path = Path(source).expanduser()
    return path.is_file() and path.suffix.lower() == ".npz"


def npz_names(source) -> tuple[str, ...]:
    """The arrays of `source` where it is a readable .npz, else () (its loader says why)."""
    if not is_npz(source):
        return ()
    try:
        with np.load(Path(source).expanduser(), allow_pickle=False) as archive:
            return tuple(archive.files)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return ()


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(x as stored, memory-mapped where it can be; y or None; class names or None)."""
    found, y, names = read_npz_arrays(path, ("x",), "save images as x, labels as y")
    return found["x"], y, names


def read_npz_arrays(path: Path, wanted: tuple[str, ...], fix: str
                    ) -> tuple[dict[str, np.ndarray], np.ndarray | None, np.ndarray | None]:
    """The arrays `wanted` (as stored, memory-mapped where they can be), y or None, class
    names or None; DataError naming the arrays missing and `fix` where some are."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [w for w in wanted if w not in archive.files]
            if missing:
                found = ", ".join(sorted(archive.files)) or "none"
                raise DataError(f"{path}: no array {', '.join(map(repr, missing))} (found: "
                                f"{found}); {fix}")
            y = archive["y"] if "y" in archive.files else None
            names = archive["classes"] if "classes" in archive.files else None
            arrays = {}
            with zipfile.ZipFile(path) as zf:
                members = set(zf.namelist())
                for w in wanted:
                    member = w + ".npy"
                    arrays[w] = _npz_member_map(path, zf.getinfo(member)) \
                        if member in members else None
            for w in wanted:
                if arrays[w] is None:
                    log.info("%s: %s is compressed, so it is read into memory; numpy.savez "
                             "(uncompressed) lets it be memory-mapped", path, w)
                    arrays[w] = archive[w]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise DataError(f"cannot read {path}: {err}; save it with "
                        "numpy.savez(path, x=images, y=labels)") from None
    return arrays, y, names


def _npz_member_map(path: Path, info: zipfile.ZipInfo) -> np.ndarray | None:
    """A read-only memory map of an uncompressed .npy member, or None if it cannot be mapped."""
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if local[:4] != b"PK\x03\x04":
            return None
        f.seek(info.header_offset + 30 + sum(struct.unpack("<HH", local[26:30])))
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            return None
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if dtype.hasobject or int(np.prod(shape)) == 0:
        return None
    return np.memmap(path, dtype, "r", offset, shape, order="F" if fortran else "C")
