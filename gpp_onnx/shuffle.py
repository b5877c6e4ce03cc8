"""Channel shuffles (ShuffleNet, exporters' ``channel_shuffle``) written as
``Reshape(N,g,C/g,H,W) -> Transpose(0,2,1,3,4) -> Reshape(N,C,H,W)`` become one
``Gather(axis=1, indices=pi)`` with ``pi[j*g+i] = i*(C/g)+j``: the same permutation, as one
op whose channels the analysis follows one by one. Part of normalising (``model.py``)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .edit import Editor, drop_dead_nodes


def shuffles_to_gather(model: onnx.ModelProto) -> int:
    """Reshape(N,g,C/g,H,W) -> Transpose(0,2,1,3,4) -> Reshape(N,C,H,W) => Gather(axis 1),
    replaced through the graph editor (``edit.Editor``); returns the number replaced."""
    editor = Editor(model)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    replaced = 0
    for last in list(graph.node):
        chain = _shuffle_chain(last, producer, users, inits, outputs)
        if chain is None:
            continue
        first, transpose, groups, per_group = chain
        perm = np.arange(groups * per_group).reshape(groups, per_group).T.ravel()
        base = last.name or last.output[0]
        idx_name = editor.add_initializer(f"{base}.shuffle_indices", perm.astype(np.int64))
        gather = helper.make_node("Gather", [first.input[0], idx_name], [last.output[0]],
                                  name=f"{base}.shuffle", axis=1)
        editor.replace([first, transpose, last], [gather])
        replaced += 1
    if replaced:
        drop_dead_nodes(model)
    return replaced


def _shape_entries(name: str, producer, inits) -> list | None:
    """Entries of a Reshape target: a constant, or a Concat of one-element pieces whose
    dynamic pieces (e.g. the batch size read by Shape) are None."""
    if name in inits:
        return [int(v) for v in numpy_helper.to_array(inits[name]).ravel()]
    node = producer.get(name)
    if node is None or node.op_type != "Concat":
        return None
    entries = []
    for piece in node.input:
        value = numpy_helper.to_array(inits[piece]).ravel() if piece in inits else None
        if value is not None and value.size != 1:
            return None
        entries.append(None if value is None else int(value[0]))
    return entries


def _shuffle_chain(last, producer, users, inits, outputs):
    if last.op_type != "Reshape":
        return None
    transpose = producer.get(last.input[0])
    if transpose is None or transpose.op_type != "Transpose":
        return None
    perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
    first = producer.get(transpose.input[0])
    if perm != [0, 2, 1, 3, 4] or first is None or first.op_type != "Reshape":
        return None
    if any(users.get(v, 0) != 1 or v in outputs for v in (first.output[0], transpose.output[0])):
        return None
    s1 = _shape_entries(first.input[1], producer, inits)
    s2 = _shape_entries(last.input[1], producer, inits)
    if s1 is None or s2 is None or len(s1) != 5 or len(s2) != 4:
        return None
    if None in s1[1:] or None in s2[1:] or s1[1] <= 0 or s1[2] <= 0:
        return None
    if s2[1] not in (-1, s1[1] * s1[2]) or s1[3:] != s2[2:]:
        return None
    return first, transpose, s1[1], s1[2]
