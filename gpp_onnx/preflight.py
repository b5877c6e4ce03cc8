"""Checks that fail before the work: what a run will write and read is usable, so a
mistake costs a one-line error (exit 2) and not a finished analysis that cannot be saved.

* every output folder exists (or can be created) and takes a file: the same temporary file
  the atomic save writes is created there and deleted;
* the output's disk has room for about the input model's size (its external data too);
* the data source exists and is readable (its pixels are read later, batch by batch).
Nothing is left behind.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from . import files
from .data import check_source
from .errors import InputError


def check_output(src: Path | None, dst: Path, size: int = 0) -> None:
    """The model output ``dst``: named, not the input, writable, with room for it (the
    input model's size with its external data, or `size` bytes for a model given in
    memory, src None)."""
    if dst.suffix == "":
        raise InputError(f"output {dst} has no extension - name it like model.pruned.onnx")
    if src is not None:
        inputs = files.stored_files(src)
        # the model, its report, and the weights file a model over 2 GB is saved with
        for out in (dst, dst.with_suffix(".report.json"), dst.parent / (dst.name + ".data")):
            hit = next((f for f in inputs if _same_file(out, f)), None)
            if hit is not None:
                what = "the input model" if _same_file(hit, src) else \
                    f"the input model's external data file ({hit.name})"
                kind = "report" if out.suffix == ".json" else "weights file"
                written = "" if out == dst else f" (its {kind} {out.name})"
                raise InputError(f"output {dst}{written} would overwrite {what} - choose "
                                 "another path with -o; gpp-onnx never overwrites its input")
    folder = check_writable(dst)
    report = dst.with_suffix(".report.json")
    if report.is_dir():
        raise InputError(f"cannot write the report {report}: it is a folder - move it, or "
                         "choose another path with -o")
    need = files.file_size(src) if src is not None and src.is_file() else size
    free = shutil.disk_usage(folder).free
    if free < need:
        raise InputError(f"only {_size(free)} free in {folder} for an output of up to "
                         f"{_size(need)} - free some space or choose another -o")


def _size(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _same_file(a: Path, b: Path) -> bool:
    """`a` and `b` name the same file (the same path once resolved, or a hard link)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_side_output(path: Path, flag: str, src: Path | None, dst: Path | None = None,
                      data: str | None = None) -> None:
    """A second file a run writes (`flag`'s: a plan, a profile) is neither one of the
    input model's files, nor the `data` file, nor the model output or its report; then
    check_writable."""
    taken = [*(files.stored_files(src) if src is not None else [])]
    if data is not None and Path(data).expanduser().is_file():
        taken.append(Path(data).expanduser())
    if dst is not None:
        taken += [dst, dst.with_suffix(".report.json")]
    hit = next((f for f in taken if _same_file(path, f)), None)
    if hit is not None:
        raise InputError(f"{flag} {path} would overwrite {hit} - give it a path of its own; "
                         "gpp-onnx never overwrites its input or its other outputs")
    check_writable(path)


def check_writable(path: Path) -> Path:
    """The existing folder that ``path`` will be written in (its own, or the nearest existing
    one above it, which the save creates folders in); InputError unless it takes a file."""
    if path.is_dir():
        raise InputError(f"cannot write {path}: it is a folder - name a file in it, e.g. "
                         f"{path / 'model.onnx'}")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"cannot write {path}: {folder} is not a folder - choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise InputError(f"cannot write {path}: {folder} is not writable ({reason}) - choose "
                         "another output path or fix the folder's permissions") from None
    os.close(fd)
    os.unlink(probe)
    return folder


def check_data(source: str | None, dst: Path | None = None) -> None:
    """The data source exists and is readable (DataError otherwise), and the model output
    `dst` and its report would not overwrite it; None: no data."""
    if source is None:
        return
    check_source(source)
    data = Path(source).expanduser()
    if dst is not None and data.is_file():
        check_not_over(dst, data, "data")


def check_not_over(dst: Path, path: Path, what: str) -> None:
    """The model output `dst` and its report would not overwrite `path`, a file the run
    reads (`what`: the data, the plan)."""
    for out in (dst, dst.with_suffix(".report.json")):
        if _same_file(out, path):
            raise InputError(f"output {out} would overwrite the {what} {path} - choose "
                             "another path with -o; gpp-onnx never overwrites its input")
