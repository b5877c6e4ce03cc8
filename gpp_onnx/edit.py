"""Graph editing: add nodes and weights under fresh names, insert a subgraph on a value,
replace nodes, and finish with a sorted, checked model.

An ``Editor`` changes one model in place (``Editor.copy(model)`` edits a copy). Names
are unique across node names, value names, initializers and graph inputs/outputs:
``fresh("grow1.b3x3")`` returns the name itself when it is free, else ``grow1.b3x3.1``,
``grow1.b3x3.2``, ...

Inserting a subgraph on a value ``v`` (``insert_on``): the caller's ``build(editor, v)``
adds nodes that read ``v`` and returns their output ``y``; every node that read ``v``
before (not the new ones) then reads ``y``:

    before:  P -> v -> {C1, C2}          after:  P -> v -> S -> y -> {C1, C2}

A graph output keeps its name, so a graph output cannot be the value inserted on.

``finish`` sorts the nodes topologically (``compat.sort_nodes``), drops nodes
and initializers nothing reads any more, clears value_info (shapes change with an edit;
``GraphView`` probes them again with onnxruntime), gives every node a unique name and,
with ``check``, runs the full ONNX checker and opens an onnxruntime session. It returns
an ``Edited``: the model, whether anything changed, and a fresh ``GraphView`` of it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .compat import sort_nodes
from .errors import InputError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Edited:
    """What an edit produced (``changed``: whether the graph differs from the input)."""
    model: onnx.ModelProto
    changed: bool
    input_shape: object = None

    @property
    def view(self):
        """A new GraphView of the edited model (its shapes are probed again)."""
        from .graph import GraphView

        return GraphView(self.model, self.input_shape)


def unique_name(taken: set[str], base: str, tag: str = "") -> str:
    """`base` if it is not in `taken`, else `base.<tag>k` for the first free k; the name
    returned is added to `taken`."""
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}.{tag}{k}"
    taken.add(name)
    return name


class Editor:
    """Add, insert and replace nodes of `model` (edited in place) under fresh names."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.changed = False
        g = model.graph
        self._taken = ({n.name for n in g.node if n.name}
                       | {o for n in g.node for o in n.output if o}
                       | {t.name for t in g.initializer}
                       | {v.name for v in [*g.input, *g.output]})

    @classmethod
    def copy(cls, model: onnx.ModelProto) -> "Editor":
        out = onnx.ModelProto()
        out.CopyFrom(model)
        return cls(out)

    # -- names and additions -------------------------------------------------------
    def fresh(self, base: str) -> str:
        """`base` if no node, value or initializer has that name yet, else `base.k`."""
        return unique_name(self._taken, base)

    def add_initializer(self, base: str, array: np.ndarray) -> str:
        name = self.fresh(base)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
        self.changed = True
        return name

    def add_node(self, op_type: str, inputs: list[str], name: str, outputs: int = 1,
                 **attrs) -> str | list[str]:
        """Append a node named `name` (made fresh); its outputs are fresh names too.
        Returns the output name (a list when `outputs` > 1)."""
        node_name = self.fresh(name)
        # the name is reserved for both: a single output shares the node's name
        outs = ([node_name] if outputs == 1
                else [self.fresh(f"{node_name}.out{i}") for i in range(outputs)])
        self.graph.node.append(helper.make_node(op_type, list(inputs), outs, name=node_name,
                                                **attrs))
        self.changed = True
        return outs[0] if outputs == 1 else outs

    # -- rewiring --------------------------------------------------------------------
    def consumers(self, value: str) -> list[onnx.NodeProto]:
        return [n for n in self.graph.node if value in n.input]

    def rewire(self, value: str, new: str, skip: set[str] = frozenset()) -> int:
        """Every node not named in `skip` reads `new` where it read `value`; returns the
        number of inputs changed."""
        changed = 0
        for node in self.graph.node:
            if node.name in skip:
                continue
            for i, name in enumerate(node.input):
                if name == value:
                    node.input[i] = new
                    changed += 1
        self.changed |= bool(changed)
        return changed

    def insert_on(self, value: str, build: Callable[["Editor", str], str]) -> str:
        """Insert the subgraph `build(self, value)` adds on `value` (see the module
        docstring); returns its output."""
        if value in {o.name for o in self.graph.output}:
            raise InputError(f"'{value}' is a graph output - insert on a value inside the "
                             "network")
        before = len(self.graph.node)  # add_node appends: the new nodes come after
        out = build(self, value)
        new = {n.name for n in self.graph.node[before:]}
        if not new:
            raise ValueError("the subgraph added no nodes")
        self.rewire(value, out, skip=new)
        return out

    def replace(self, old: list[onnx.NodeProto], new: list[onnx.NodeProto]) -> None:
        """Remove the nodes `old` and put `new` where the first of them was."""
        nodes = list(self.graph.node)
        position = min(i for i, n in enumerate(nodes) if any(n is o for o in old))
        for node in old:
            self.graph.node.remove(node)
        for k, node in enumerate(new):
            node.name = self.fresh(node.name or node.op_type)
            self.graph.node.insert(position + k, node)
        self.changed = True

    # -- the end of an edit ----------------------------------------------------------
    def finish(self, check: bool = True, where: str = "edited model",
               input_shape=None) -> Edited:
        """Sort, drop what nothing reads, name nodes; check (checker + onnxruntime)."""
        if self.changed:
            sort_nodes(self.graph)
            drop_dead_nodes(self.model)
            del self.graph.value_info[:]
            name_nodes(self.model)
        if check:
            from . import verify

            data = verify.serialized(self.model)
            verify.check(data, where)
            verify.make_session(data, where, optimize=False)
        return Edited(self.model, self.changed, input_shape)


def drop_dead_nodes(model: onnx.ModelProto) -> None:
    """Remove nodes none of whose outputs is used (e.g. shape arithmetic left behind), and
    initializers no node reads."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    changed = True
    while changed:
        used = {name for node in graph.node for name in node.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output if o)]
        for node in dead:
            graph.node.remove(node)
        changed = bool(dead)
    used = {name for node in graph.node for name in node.input} | outputs
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every node a unique name: plans, rules and reports refer to nodes by name."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
            while node.name in seen:
                node.name += "_"
        seen.add(node.name)
