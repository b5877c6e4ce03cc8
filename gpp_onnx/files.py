"""Files on disk: the ones a model occupies (its .onnx and the external data files its
tensors name, read off the graph alone: for file sizes and for the checks that an output
never lands on an input), and how outputs are written (atomically, a run's outputs all or
none: ``Outputs``)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import EncodeError

from .errors import InputError

_TWO_GB = 2 ** 31 - 1


def stored_files(src: Path) -> list[Path]:
    """The files a model reads: the .onnx and the external data files its tensors name
    (resolved beside it). Only the graph is parsed; no tensor data is read."""
    src = Path(src)
    files = [src]
    try:
        model = onnx.load_model(str(src), load_external_data=False)
    except Exception:          # unreadable: loading reports it, with its own message
        return files
    for tensor in _tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            where = {e.key: e.value for e in tensor.external_data}.get("location")
            if where and (src.parent / where) not in files:
                files.append(src.parent / where)
    return files


def _tensors(graph):
    """Every tensor a graph holds: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _tensors(sub)


def file_size(path) -> int:
    """Bytes of a model file and of the external data files it names."""
    return sum(f.stat().st_size for f in stored_files(Path(path)) if f.is_file())


def serialize(model: onnx.ModelProto) -> bytes | None:
    """The model's protobuf bytes; None when it is too large for one protobuf (2 GB).
    (``ByteSize()`` costs as much as serialising, so the size is read off the bytes.)"""
    try:
        data = model.SerializeToString()
    except (ValueError, EncodeError):  # protobuf refuses messages over 2 GB (upb: EncodeError)
        return None
    return data if len(data) < _TWO_GB else None


def save(model: onnx.ModelProto, path: str | os.PathLike, data: bytes | None = None) -> Path:
    """Write `model` to `path` atomically (temp file in the same folder, then rename).
    `data`: the model's bytes when the caller already serialised it."""
    dest = Path(path)
    data = serialize(model) if data is None else data
    if data is None:  # over 2 GB: weights beside the model
        return _save_external(model, dest)
    return write_atomic(dest, lambda tmp: tmp.write_bytes(data))


def _save_external(model: onnx.ModelProto, dest: Path) -> Path:
    """`model` as `dest` with its weights in `dest.name + '.data'` beside it, both written
    in a fresh folder and renamed there, weights first: onnx.save appends to a data file
    already at its path (a second save to the same path, as gpp's checkpoints do, grew it
    by a whole copy each time). onnx.save also moves the weights out of `model` (external,
    no bytes); they are read back, so the caller's model keeps them."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    except OSError as err:
        raise _unwritable(dest, err) from None
    try:
        onnx.save(model, str(stage / dest.name), save_as_external_data=True,
                  location=dest.name + ".data")
        onnx.external_data_helper.load_external_data_for_model(model, str(stage))
        for f in sorted(stage.iterdir(), reverse=True):  # weights, then model
            os.chmod(f, 0o666 & ~_umask())
            os.replace(f, dest.parent / f.name)
    except OSError as err:
        raise _unwritable(dest, err) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return dest


class Outputs:
    """A run's output files, which appear together or not at all: a model, its report,
    its plan. Written inside ``with Outputs() as out:`` (``out.save``, ``out.text``), each
    goes to a hidden folder beside its path (a model with its external weights) and all
    are renamed to their paths when the block finishes; when it does not (an interrupt
    between the model and its report), none is, and the files at those paths stay as they
    were (the new model used to be removed with the one that had been at its path).
    ``out.staged(path)``: where a file written in the block lies until then."""

    def __init__(self):
        self.stages: dict[Path, Path] = {}    # path -> the hidden folder its file waits in

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, kind, value, tb) -> None:
        try:
            if kind is None:
                for dest, stage in self.stages.items():
                    for f in sorted(stage.iterdir(), reverse=True):  # weights, then model
                        _replace(f, dest.parent / f.name, dest)
        finally:
            for stage in self.stages.values():
                shutil.rmtree(stage, ignore_errors=True)

    def staged(self, path: str | os.PathLike) -> Path:
        dest = Path(path)
        return self.stages[dest] / dest.name if dest in self.stages else dest

    def _stage(self, path: str | os.PathLike) -> Path:
        dest = Path(path)
        if dest not in self.stages:
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                self.stages[dest] = Path(tempfile.mkdtemp(prefix=f".{dest.name}.",
                                                          suffix=".tmp", dir=dest.parent))
            except OSError as err:
                raise _unwritable(dest, err) from None
        return self.staged(dest)

    def save(self, model: onnx.ModelProto, path: str | os.PathLike, data: bytes | None = None
             ) -> Path:
        save(model, self._stage(path), data)
        return Path(path)

    def text(self, path: str | os.PathLike, text: str) -> Path:
        write_text(self._stage(path), text)
        return Path(path)


def _replace(src: Path, dest: Path, named: Path) -> None:
    try:
        os.replace(src, dest)
    except OSError as err:
        raise _unwritable(named, err) from None


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomic text write (reports, plans, caches)."""
    return write_atomic(Path(path), lambda tmp: tmp.write_text(text))


def write_atomic(dest: Path, write) -> Path:
    """`write(tmp)` into a temporary file in `dest`'s folder, then rename it to `dest`: a
    reader never sees a partial file, and a failed write leaves nothing behind. The disk
    filling up (or the folder going away) on the way is an InputError naming `dest`."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    except OSError as err:
        raise _unwritable(dest, err) from None
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())    # mkstemp makes 0600; a new file's usual mode
        os.replace(tmp, dest)
    except OSError as err:
        raise _unwritable(dest, err) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def _unwritable(dest: Path, err: OSError) -> InputError:
    reason = err.strerror or type(err).__name__
    return InputError(f"cannot write {dest} ({reason}) - free some space or choose another "
                      "path")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
