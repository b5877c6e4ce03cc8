"""The files a model occupies on disk: its .onnx and the external data files its tensors
name. Read off the graph alone (no tensor data is loaded); used for file sizes and for
the checks that an output never lands on an input."""
from __future__ import annotations

from pathlib import Path

import onnx


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
