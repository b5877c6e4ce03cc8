"""Bring a model onnxruntime runs into the form gpp-onnx works on, without changing
what it computes.

* **Node order.** The ONNX checker wants nodes in topological order; onnxruntime sorts
  them itself, and fp16 converters append their Cast nodes at the end of the list.
  ``sort_nodes`` is a stable topological sort (networkx, ties broken by the original
  position, so a sorted graph keeps its order). Every sort in gpp-onnx goes through it.
* **Old opsets.** A model below opset 11 is upgraded to ``TARGET_OPSET`` with
  ``onnx.version_converter``. The converter maps Upsample-9 / Resize-10 to Resize-11
  with Resize-11's defaults (``half_pixel`` coordinates, ``round_prefer_floor``), while
  the old ops compute ``x_in = x_out / scale`` (``asymmetric``) and take the ``floor``
  for nearest; those attributes are set explicitly so the upgraded Resize computes what
  the old op did. ``Loaded.check_unchanged`` then compares the upgraded (and the
  normalised) model with the model as read, both run by onnxruntime, before pruning.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import networkx as nx
import onnx
from onnx import helper

from . import verify
from .errors import InputError

logger = logging.getLogger(__name__)

MIN_OPSET = 11     # gpp-onnx's channel rules start here; older models are upgraded
TARGET_OPSET = 17  # what they are upgraded to (the opset the builders and zoo tests use)


@dataclass(frozen=True)
class Loaded:
    """A model as gpp-onnx works on it, and what loading changed to get there."""
    model: onnx.ModelProto       # sorted, upgraded: what the pipeline prunes and writes
    as_read: onnx.ModelProto     # the file's model (nodes sorted): the upgrade's reference
    opset_read: int
    sorted_nodes: bool           # the file's nodes were out of topological order

    @property
    def opset(self) -> int:
        return opset_version(self.model)

    @property
    def upgraded(self) -> bool:
        return self.opset != self.opset_read

    @property
    def notes(self) -> tuple[str, ...]:
        notes = []
        if self.upgraded:
            notes.append(f"upgraded from opset {self.opset_read} to {self.opset}")
        if self.sorted_nodes:
            notes.append("nodes sorted topologically")
        return tuple(notes)

    def to_dict(self) -> dict:
        """The report's "loading" entry."""
        return {"opset_read": self.opset_read, "opset": self.opset, "upgraded": self.upgraded,
                "nodes_sorted": self.sorted_nodes, "notes": list(self.notes)}

    def check_unchanged(self, normalized: onnx.ModelProto, feeds: dict,
                        tol: verify.Tolerance, normalized_outputs: list | None = None) -> None:
        """The upgrade and normalisation must not change what the file computes.
        `normalized_outputs`: the normalised model's outputs on `feeds` (unoptimised), when
        the caller has them."""
        reference = verify.run(self.as_read, feeds, "input model")
        if self.upgraded:
            got = verify.run(self.model, feeds, "upgraded model")
            err = verify.relative_error(got, reference)
            if not err < tol.value:
                raise InputError(f"upgrading from opset {self.opset_read} to {self.opset} "
                                 f"changed the model's outputs (relative error {err:.1e}) - "
                                 f"export the model at opset {MIN_OPSET} or newer")
        if normalized_outputs is None:
            normalized_outputs = verify.run(normalized, feeds, "normalised model")
        verify.check_equivalent(normalized_outputs, reference, "normalised model",
                                "the input model", tol)


def opset_version(model: onnx.ModelProto) -> int:
    """The default-domain opset (0 when the model imports none)."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def _reads(node: onnx.NodeProto) -> set[str]:
    """Values a node reads: its inputs and the outer-scope names its subgraphs use."""
    names = {name for name in node.input if name}
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for graph in graphs:
            for inner in graph.node:
                names |= _reads(inner)
    return names


def sort_nodes(graph: onnx.GraphProto) -> bool:
    """Sort `graph.node` topologically in place (stable); return whether the order changed.

    Raise InputError when the nodes form a cycle."""
    nodes = list(graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    deps = nx.DiGraph()
    deps.add_nodes_from(range(len(nodes)))
    for i, node in enumerate(nodes):
        deps.add_edges_from((producer[name], i) for name in _reads(node)
                            if name in producer and producer[name] != i)
    try:
        order = list(nx.lexicographical_topological_sort(deps))
    except nx.NetworkXUnfeasible:
        cycle = [nodes[u].name or nodes[u].op_type for u, _ in nx.find_cycle(deps)]
        raise InputError(f"the graph has a cycle through nodes {cycle[:4]} - an ONNX model "
                         "must be acyclic; export it again") from None
    if order == list(range(len(nodes))):
        return False
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)
    return True


def upgrade_opset(model: onnx.ModelProto, where: str = "model") -> onnx.ModelProto:
    """`model` converted to TARGET_OPSET; raise InputError when the converter fails."""
    source = opset_version(model)
    staged = onnx.ModelProto()
    staged.CopyFrom(model)
    # IR < 4 wants every initializer listed as a graph input, which the converter's
    # new constants are not; the target opset needs a newer IR anyway.
    target_ir = helper.find_min_ir_version_for([helper.make_opsetid("", TARGET_OPSET)])
    staged.ir_version = max(staged.ir_version, target_ir)
    try:
        upgraded = onnx.version_converter.convert_version(staged, TARGET_OPSET)
        _keep_old_resize_semantics(upgraded)
        onnx.checker.check_model(upgraded)
    except Exception as err:
        text = " ".join(str(err).split())[:160] or type(err).__name__
        raise InputError(f"{where} uses opset {source} and onnx's version converter cannot "
                         f"upgrade it to opset {TARGET_OPSET} ({text}) - export the model "
                         f"at opset {MIN_OPSET} or newer") from None
    logger.info("upgraded %s from opset %d to %d (onnx.version_converter)", where, source,
                TARGET_OPSET)
    return upgraded


def _keep_old_resize_semantics(model: onnx.ModelProto) -> None:
    """Resize nodes without a coordinate mode came from Upsample-9 / Resize-10."""
    for node in model.graph.node:
        if node.op_type != "Resize" or node.domain not in ("", "ai.onnx"):
            continue
        names = {a.name for a in node.attribute}
        if "coordinate_transformation_mode" in names:
            continue
        node.attribute.append(helper.make_attribute("coordinate_transformation_mode",
                                                    "asymmetric"))
        if "nearest_mode" not in names:
            node.attribute.append(helper.make_attribute("nearest_mode", "floor"))
