"""Image files: which files of a folder are images (as torchvision's ImageFolder finds
them), their header (channels, size) and their pixels as float32 in [0, 1]. 8-bit files
are divided by 255, 16-bit ones by 65535 (their format's range), 32-bit integers by 65535
or their maximum; grayscale modes give one channel, every other mode RGB (alpha dropped)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff",
                              ".webp", ".ppm", ".pgm", ".pbm"})
_WARNED: set[str] = set()  # warnings about a folder already given this run


def warn_once(message: str, *args) -> None:
    """A warning about a data folder, given once a run although the folder is listed more
    than once (a free input size reads it before the data is loaded)."""
    text = message % args
    if text not in _WARNED:
        _WARNED.add(text)
        log.warning("%s", text)
_SCAN_CHUNK = 1 << 24  # pixel values per chunk when scanning an array's range


@dataclass(frozen=True, eq=False)
class FilePixels:
    """Image files, decoded one by one when read (C is 1 for grayscale, else 3)."""
    paths: tuple[Path, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def shapes(self, pos: np.ndarray) -> dict[tuple[int, ...], str]:
        """Each distinct (C, H, W) among the files at ``pos``, with the first file that has it;
        reads only headers, so an unreadable file fails here, before the work."""
        found: dict[tuple[int, ...], str] = {}
        for i in pos:
            found.setdefault(probe(self.paths[i]), str(self.paths[i]))
        return found

    def read(self, pos: np.ndarray) -> Iterator[np.ndarray]:
        """The files at ``pos`` one by one, each decoded when the last has been taken (and
        resized), so a batch of large photos never sits in memory at full size."""
        return (read_image(self.paths[i]) for i in pos)


def pil():
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading image files needs Pillow; run `pip install pillow`") from None
    return Image


def channels(mode: str) -> int:
    return 1 if mode[0] in "IF" or mode in ("1", "L", "LA", "La") else 3


def probe(path: Path) -> tuple[int, int, int]:
    """(C, H, W) of an image file from its header."""
    image = pil()
    try:
        with image.open(path) as img:
            return channels(img.mode), img.size[1], img.size[0]
    except OSError as err:
        raise DataError(f"cannot read image {path}: {err}; fix or remove the file") from None
    except image.DecompressionBombError as err:
        raise _too_large(path, err) from None


def _too_large(path: Path, err: Exception) -> DataError:
    """Pillow refuses images of over twice its MAX_IMAGE_PIXELS (179 M pixels)."""
    return DataError(f"cannot read image {path}: {str(err).rstrip('.')}; scale it down (the "
                     "model takes far fewer pixels) or remove it")


def read_image(path: Path) -> np.ndarray:
    """One image file as (1, C, H, W) float32 in [0, 1]."""
    image = pil()
    try:
        with image.open(path) as img:
            if img.mode[0] in "IF":  # 16/32-bit integer or float pixels
                arr = np.asarray(img)
                # 16-bit files by their format's range, whatever their brightest pixel;
                # 32-bit integers (no range of their own) likewise up to 65535
                scale = 65535.0 if img.mode.startswith("I;16") else unit_scale(
                    arr[None], str(path)) if img.mode[0] == "F" else float(
                    max(65535, arr.max(initial=0)))
                if img.mode == "I" and arr.min(initial=0) < 0:
                    raise DataError(f"{path}: negative pixel values; store images as 8- or "
                                    "16-bit")
                arr = arr.astype(np.float32) / np.float32(scale)
            else:
                mode = "L" if channels(img.mode) == 1 else "RGB"
                arr = np.asarray(img.convert(mode), np.float32) / np.float32(255)
    except OSError as err:
        raise DataError(f"cannot read image {path}: {err}; fix or remove the file") from None
    except image.DecompressionBombError as err:
        raise _too_large(path, err) from None
    return (arr[:, :, None] if arr.ndim == 2 else arr).transpose(2, 0, 1)[None]


def images_under(folder: Path, root: Path) -> list[Path]:
    """The image files below the class folder `folder` of the data folder `root`, sorted,
    as torchvision's ImageFolder finds them: symlinked folders followed (once each), hidden
    files and folders left out (Jupyter's .ipynb_checkpoints copies, macOS's ._ AppleDouble
    files). A link back into the data folder outside this class (or above it) is skipped
    with a warning: its images would count again, under this class's label."""
    found, seen = [], set()
    data, own = Path(os.path.realpath(root)), Path(os.path.realpath(folder))
    for top, dirs, files in os.walk(folder, followlinks=True):
        real = Path(os.path.realpath(top))
        if real in seen:  # a link back up this class's tree
            dirs[:] = []
            continue
        if (real.is_relative_to(data) and not real.is_relative_to(own)) or \
                (data.is_relative_to(real) and real != own):
            warn_once("%s: skipped, it links back into the data folder %s (its images "
                      "would count again as class '%s')", top, root, folder.name)
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(top) / f for f in files if not f.startswith(".")
                  and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(p for p in found if p.is_file())


def unit_scale(x: np.ndarray, source: str) -> float:
    """The divisor that maps ``x``'s pixels to [0, 1], from a scan chunk by chunk (so a
    memory map is never copied whole); uint8 needs no scan. Floats are 0..255 pixels when
    they are whole numbers up to 255 (as images converted from uint8 are); values with
    fractions, such as features, are taken as they are."""
    if x.dtype.kind not in "iubf":
        raise DataError(f"{source}: pixels have dtype {x.dtype}; store x as uint8 or float")
    if x.dtype == np.uint8 or x.dtype.kind == "b":
        return 255.0 if x.dtype == np.uint8 else 1.0
    if x.ndim == 0 or len(x) == 0:       # nothing to scale; an empty set is refused later
        return 1.0
    flat, lo, hi, whole = x.reshape(len(x), -1), np.inf, -np.inf, True
    step = max(1, _SCAN_CHUNK // max(flat.shape[1], 1))
    for start in range(0, len(flat), step):
        chunk = np.asarray(flat[start:start + step])
        if x.dtype.kind == "f" and not np.isfinite(chunk).all():
            raise DataError(f"{source}: NaN or infinite pixel values; clean or drop those images")
        if chunk.size:
            lo, hi = min(lo, float(chunk.min())), max(hi, float(chunk.max()))
            whole = whole and x.dtype.kind == "f" and bool((chunk == np.round(chunk)).all())
    if x.dtype.kind in "iu":
        if lo < 0:
            raise DataError(f"{source}: negative pixel values; store pixels as uint8 or [0, 1]")
        return 255.0 if hi <= 255 else float(max(hi, 65535))
    if lo >= 0 and 1 < hi <= 255 and whole:
        log.info("%s: float pixels of whole values in [0, %g] divided by 255", source, hi)
        return 255.0
    if lo >= 0 and 1 < hi <= 255:
        log.warning("%s: float values in [%g, %g] with fractions taken as they are, not as "
                    "0..255 pixels (those are whole numbers) - if they are pixels, divide x "
                    "by 255 first", source, lo, hi)
        return 1.0
    if lo < 0 or hi > 1:
        log.warning("%s: float pixels in [%g, %g] taken as already normalised", source, lo, hi)
    return 1.0
