"""Where images come from: a source resolved to its labels (None when it has none) and a
pixel store that reads images on demand, so memory is bounded by a batch and not by the
data set. Unlabelled sources: a folder of images without class sub-folders, an ``.npz``
without ``y``, an IDX images file without its labels file beside it.

* IDX (MNIST layout): an uncompressed file is memory-mapped; a ``.gz`` one is decompressed
  once to its raw pixels (uint8 for MNIST, 47 MB for Fashion-MNIST's 60k train images).
* ``.npz`` (npz.py): ``x`` is memory-mapped when stored uncompressed (``numpy.savez``);
  ``numpy.savez_compressed`` cannot be mapped, so its raw ``x`` is read once. ``y`` and
  ``classes`` are small and read whole.
* CIFAR-10/100, python or binary layout (cifar.py): a split's batches are read into
  memory once (150 MB of uint8 for CIFAR-10's 50k training images).
* ImageFolder: file paths are listed once and each file's header is probed up front
  (readable, channels, size); pixels are decoded when a batch asks for them.

Scaling to [0, 1] is decided once per array source from its dtype and value range
(uint8 / 255, larger integers / 65535 or their maximum, floats in (1, 255] / 255), so every
batch of a source is scaled alike; a 16-bit image file is divided by 65535 (its format's
range, so two files of one folder are scaled alike), a 32-bit one by 65535 or its maximum.
"""
from __future__ import annotations

import logging
import os
import re
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import cifar
from .errors import DataError
from .idx import read_idx
from .npz import is_npz, read_npz
from .image_files import (IMAGE_EXTENSIONS, FilePixels, images_under, pil, probe, unit_scale,
                          warn_once)

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_IDX_IMAGES = re.compile(r"images[-._]idx\d[-._]ubyte(\.gz)?$", re.IGNORECASE)
_SPLITS = {"train": ("train",), "test": ("t10k", "test")}


@dataclass(frozen=True, eq=False)
class ArrayPixels:
    """Raw pixels (N,C,H,W), possibly a read-only memory map; ``scale`` maps them to [0, 1]."""
    array: np.ndarray
    scale: float
    source: str

    def __len__(self) -> int:
        return len(self.array)

    def shapes(self, pos: np.ndarray) -> dict[tuple[int, ...], str]:
        return {tuple(self.array.shape[1:]): self.source}

    def read(self, pos: np.ndarray) -> list[np.ndarray]:
        """The images at ``pos`` as one float32 (n,C,H,W) block in [0, 1]."""
        x = np.asarray(self.array[pos], dtype=np.float32)
        return [x / np.float32(self.scale) if self.scale != 1 else x]


@dataclass(frozen=True, eq=False)
class Raw:
    """A resolved source: labels (None: the source has none), a pixel store, class names
    (None: 0..K-1)."""
    y: np.ndarray | None
    pixels: ArrayPixels | FilePixels
    source: str
    classes: tuple[str, ...] | None = None


def native_shape(source: str) -> tuple[int, int, int]:
    """(C, H, W) of the source's images as stored (an image folder: its first image's).
    Labels are not read: a run that ignores them (``--no-labels``, ``compare``) must not be
    refused for labels it never uses (an .npz's per-position y of a text recognizer)."""
    pixels = resolve(source, labels=False).pixels
    if isinstance(pixels, ArrayPixels):
        return tuple(int(d) for d in pixels.array.shape[1:])
    return probe(pixels.paths[0])


def check_source(source: str) -> None:
    """Raise DataError unless ``source`` names an existing, readable source; reads no pixels."""
    kind, path, _ = _locate(source)
    if kind == "fashion-mnist" and not FASHION_MNIST_DIR.is_dir():
        raise DataError(f"Fashion-MNIST not found in {FASHION_MNIST_DIR}; install it with "
                        "`apt-get install dataset-fashion-mnist` or pass the IDX files' path")
    if path is not None and not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise DataError(f"data source {path} is not readable; fix its permissions or copy it")


def has_labels(source: str, inputs: tuple[str, ...] = ()) -> bool:
    """Whether ``source`` comes with labels; reads names and headers, no pixels (an IDX
    directory resolves its pair). `inputs`: the names of a model's several inputs, whose
    arrays an .npz holds under those names; an input named y takes the array y, so it
    holds no labels then."""
    kind, path, split_name = _locate(source)
    if kind == "npz":
        try:
            with zipfile.ZipFile(path) as zf:
                return "y.npy" in zf.namelist() and "y" not in inputs
        except (OSError, zipfile.BadZipFile) as err:
            raise DataError(f"cannot read {path}: {err}; save it with "
                            "numpy.savez(path, x=images, y=labels)") from None
    if kind == "idx":
        return bool(_labels_beside(path)[1])
    if kind == "dir":
        if cifar.find(path) is not None or any(p.is_dir() and not p.name.startswith(".")
                                               for p in path.iterdir()):
            return True
        return any(_IDX_IMAGES.search(p.name) for p in path.iterdir()) and \
            _load_idx_dir(path, None).y is not None
    if kind == "dir-split":
        return _load_split(path, split_name).y is not None
    return True


def resolve(source: str, labels: bool = True, channels: int | None = None) -> Raw:
    """Labels and a pixel store for ``source`` (an existing path wins over a built-in name);
    `labels` False: labels are not read (an .npz's y, an IDX labels file), so labels a run
    ignores cannot stop it, and an image folder's images are all taken, in class folders
    or not; `channels`: the model's, which tells an .npz's channel axis where 1, 3 or 4
    do not."""
    kind, path, split_name = _locate(source)
    if kind == "dir":
        return _load_idx_dir(path, None, labels) or _load_cifar(path, "train") or \
            _load_image_folder(path, labels)
    if kind == "npz":
        return _load_npz(path, labels, channels)
    if kind == "idx":
        return _load_idx(path, labels)
    if kind == "cifar-file":
        x, y = cifar.read_file(path)
        return Raw(y, ArrayPixels(x, 255.0, str(path)), str(path))
    if kind == "dir-split":
        return _load_split(path, split_name, labels)
    return _load_builtin(kind, split_name)


def _load_split(folder: Path, split_name: str, labels: bool = True) -> Raw:
    """``FOLDER:train`` / ``FOLDER:test`` of an IDX or CIFAR folder."""
    raw = _load_idx_dir(folder, split_name, labels) or _load_cifar(folder, split_name)
    if raw is None:
        raise DataError(f"{folder}:{split_name}: the folder holds no IDX or CIFAR files, so it "
                        "has no splits; give the folder itself")
    return raw


def _load_cifar(folder: Path, split_name: str) -> Raw | None:
    """A CIFAR-10/100 folder's split (cifar.py), or None where `folder` holds none."""
    root = cifar.find(folder)
    if root is None:
        return None
    x, y, names = cifar.load(root, split_name)
    log.info("%s: CIFAR %s split, %d images", root, split_name, len(x))
    return Raw(y, ArrayPixels(x, 255.0, f"{root}:{split_name}"), f"{root}:{split_name}", names)


def _locate(source: str) -> tuple[str, Path | None, str | None]:
    if isinstance(source, os.PathLike):   # DataOptions(Path(...)) from Python
        source = os.fspath(source)
    if not isinstance(source, str):
        raise DataError(f"data source {type(source).__name__} is not a path or a name - give "
                        "a folder, .npz, IDX file, 'fashion-mnist' or 'digits' (arrays: save "
                        "them with numpy.savez(path, x=images, y=labels))")
    path = Path(source).expanduser()
    if path.is_dir():
        return "dir", path, None
    if is_npz(path):
        return "npz", path, None
    if path.is_file() and _IDX_IMAGES.search(path.name):
        return "idx", path, None
    if path.is_file() and cifar.is_batch_file(path):
        return "cifar-file", path, None
    if path.is_file():
        raise DataError(f"{path}: unsupported file type; give an ImageFolder directory, an .npz "
                        "file (arrays x, y), an MNIST-style *-images-idx3-ubyte[.gz] file or a "
                        "CIFAR folder or batch file")
    name, _, split_name = source.lower().partition(":")
    if name in ("digits", "fashion-mnist"):
        if name == "fashion-mnist" and (split_name or "train") not in _SPLITS:
            raise DataError(f"unknown split {split_name!r}; use fashion-mnist or "
                            "fashion-mnist:test")
        return name, None, split_name or "train"
    base, _, split_name = source.rpartition(":")
    if split_name in _SPLITS and Path(base).expanduser().is_dir():
        return "dir-split", Path(base).expanduser(), split_name
    raise DataError(f"unknown data source {source!r}: no such file or directory and not a built-in "
                    "name (digits, fashion-mnist[:test]); give a data directory or file")


def as_labels(y: np.ndarray, source: str) -> np.ndarray:
    y = np.asarray(y)
    y = y[:, 0] if y.ndim == 2 and y.shape[1] == 1 else y
    if y.ndim != 1:
        raise DataError(f"{source}: labels must be 1-D class indices, got shape {y.shape}; "
                        "convert one-hot labels with y.argmax(1)")
    if y.dtype.kind not in "iubf" or y.dtype.kind == "f" and (y != np.round(y)).any():
        raise DataError(f"{source}: labels must be whole class indices; store y as integers")
    return y.astype(np.int64)


def _load_image_folder(root: Path, labels: bool = True) -> Raw:
    broken = sorted(p.name for p in root.iterdir() if p.is_symlink() and not p.exists())
    if broken:
        raise DataError(f"{root}: {broken[0]} links to nothing (a class folder missing would "
                        "shift every later class's label); fix or remove the link")
    class_dirs = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                        key=lambda p: p.name)
    loose = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
                   and p.is_file() and not p.name.startswith("."))
    if not class_dirs and loose:
        pil()
        log.info("%s: images without class sub-folders, so no labels", root)
        return Raw(None, FilePixels(tuple(loose)), str(root))
    if not class_dirs:
        raise DataError(f"{root}: no readable images (no class folders, images, IDX or CIFAR "
                        "files); give a folder of images or one sub-folder of images per class")
    if not labels:     # labels not used: every image below, in a class folder or not
        found = images_under(root, root)
        if not found:
            raise DataError(f"{root}: no readable images in it or its sub-folders; give a "
                            "folder of images")
        pil()
        return Raw(None, FilePixels(tuple(found)), str(root))
    _refuse_split_folders(root, class_dirs)
    if loose:
        warn_once("%s: %d images beside the class folders are left out (a class folder's "
                  "name is its images' label); move them into one, or pass --no-labels to "
                  "take every image without labels", root, len(loose))
    per_class = [images_under(d, root) for d in class_dirs]
    for folder, files in zip(class_dirs, per_class):
        if not files:
            raise DataError(f"class folder {folder} holds no images; add some or remove it")
    pil()
    names = [d.name for d in class_dirs]
    if all(n.isdigit() for n in names) and names != sorted(names, key=int):
        warn_once("%s: class folders named by numbers are classes in text order, as "
                  "ImageFolder takes them (class 0 '%s', 1 '%s', 2 '%s', ...), not in number "
                  "order - if the model's classes follow the numbers, pad the names with "
                  "zeros (01, 02, ..., 10)", root, *(names + ["", ""])[:3])
    labels = np.repeat(np.arange(len(class_dirs)), [len(files) for files in per_class])
    paths = tuple(p for files in per_class for p in files)
    return Raw(labels.astype(np.int64), FilePixels(paths), str(root),
               tuple(d.name for d in class_dirs))


SPLIT_NAMES = {"train", "training", "val", "valid", "validation", "test", "testing", "eval",
               "dev"}


def _refuse_split_folders(root: Path, class_dirs: list[Path]) -> None:
    """A dataset's root (train/<class>/..., val/<class>/...) given for one of its splits
    would be read as the classes 'train' and 'val'; refused, naming the split to give."""
    names = [d.name for d in class_dirs]
    if not all(n.lower() in SPLIT_NAMES for n in names):
        return
    def splits(folder: Path) -> bool:  # sub-folders and no image of its own
        inside = [p for p in folder.iterdir() if not p.name.startswith(".")]
        return any(p.is_dir() for p in inside) and not any(
            p.suffix.lower() in IMAGE_EXTENSIONS for p in inside)

    if all(splits(d) for d in class_dirs):
        first = next((d for d in class_dirs if d.name.lower().startswith("train")), class_dirs[0])
        raise DataError(f"{root} holds the split folders {', '.join(names)}, each with class "
                        f"folders: give one split, e.g. --data {first}")


def _load_npz(path: Path, labels: bool = True, channels: int | None = None) -> Raw:
    x, y, names = read_npz(path)
    y = y if labels else None
    x = x[:, None] if x.ndim == 3 else x
    usual = (1, 3, 4) if channels is None else (channels,)
    if x.ndim == 4 and x.shape[1] not in usual and x.shape[3] not in usual:
        usual = (1, 3, 4)
    if x.ndim != 4 or (x.shape[1] not in usual and x.shape[3] not in usual):
        which = "1, 3 or 4" + ("" if channels in (None, 1, 3, 4)
                               else f" (or the model's {channels})")
        raise DataError(f"{path}: cannot tell the channel axis of x {x.shape}; store x as N,H,W "
                        f"or N,H,W,C or N,C,H,W with {which} channels")
    x = x if x.shape[1] in usual else x.transpose(0, 3, 1, 2)
    classes = tuple(map(str, names)) if names is not None else None
    labels = None if y is None else as_labels(y, str(path))
    return Raw(labels, ArrayPixels(x, unit_scale(x, str(path)), str(path)), str(path), classes)


def _labels_beside(path: Path) -> tuple[str, list[Path]]:
    """The labels file's name for an IDX images file, and the copies of it found beside."""
    base = re.sub(r"images([-._])idx\d(.*?)(\.gz)?$", r"labels\1idx1\2", path.name, flags=re.I)
    return base, [p for p in (path.parent / base, path.parent / (base + ".gz")) if p.is_file()]


def _load_idx(path: Path, labels: bool = True) -> Raw:
    base, found = _labels_beside(path) if labels else ("", [])
    images = read_idx(path)
    if images.ndim != 3:
        raise DataError(f"{path}: IDX images must be N,H,W, got {images.shape}; give MNIST layout")
    if not found and labels:
        log.info("%s: no labels file %s[.gz] beside it, so no labels", path, base)
    labels = as_labels(read_idx(found[0]), str(path)) if found else None
    pixels = ArrayPixels(images[:, None], unit_scale(images, str(path)), str(path))
    return Raw(labels, pixels, str(path))


def _load_idx_dir(folder: Path, split_name: str | None, labels: bool = True) -> Raw | None:
    """The IDX pair in ``folder`` (the only one, else the split's); None if it holds none."""
    unique: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):  # a plain file sorts before its .gz twin: keep it
        if p.is_file() and _IDX_IMAGES.search(p.name):
            unique.setdefault(re.sub(r"\.gz$", "", p.name, flags=re.IGNORECASE).lower(), p)
    files = list(unique.values())
    if not files:
        return None
    if split_name is None and len(files) == 1:
        return _load_idx(files[0], labels)
    matches = [p for p in files if p.name.lower().startswith(_SPLITS[split_name or "train"])]
    if len(matches) != 1:
        raise DataError(f"{folder}: {len(matches)} {split_name or 'train'} IDX images files among "
                        f"{[p.name for p in files]}; give the path of one images file")
    return _load_idx(matches[0], labels)


def _load_builtin(name: str, split_name: str) -> Raw:
    """``fashion-mnist`` (Debian's files, train or test split) or ``digits`` (scikit-learn)."""
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
    return Raw(bunch.target.astype(np.int64), ArrayPixels(bunch.images[:, None], 16.0, "digits"),
               "digits", tuple(map(str, bunch.target_names)))
