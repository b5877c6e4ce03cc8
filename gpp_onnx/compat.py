"""Bring a model onnxruntime runs into the form gpp-onnx works on, without changing
what it computes.

* **Node order.** The ONNX checker wants nodes in topological order; onnxruntime sorts
  them itself, and fp16 converters append their Cast nodes at the end of the list.
  ``sort_nodes`` is a stable topological sort (ties broken by the original position,
  so a sorted graph keeps its order). Every sort in gpp-onnx goes through it.
* **Old opsets.** A model below opset 11 is upgraded to ``TARGET_OPSET`` with
  ``onnx.version_converter``. The converter maps Upsample-9 / Resize-10 to Resize-11
  with Resize-11's defaults (``half_pixel`` coordinates, ``round_prefer_floor``), while
  the old ops compute ``x_in = x_out / scale`` (``asymmetric``) and take the ``floor``
  for nearest; those attributes are set explicitly so the upgraded Resize computes what
  the old op did. ``Loaded.check_unchanged`` then compares the upgraded (and the
  normalised) model with the model as read, both run by onnxruntime, before pruning.
"""
from __future__ import annotations

import heapq
import logging
import sys
from collections import Counter
from dataclasses import dataclass

import numpy as np
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
                        tol: verify.Tolerance, normalized_outputs=None,
                        arrays=None) -> None:
        """The upgrade and normalisation must not change what the file computes: proven
        from the graphs where normalising only folded constants' Identity nodes
        (``same_computation``), else both models run on `feeds`.
        `normalized_outputs`: the normalised model's outputs on `feeds` (unoptimised), or
        a function that gives them, when the caller has them; `arrays(name)`: the
        normalised model's initializer values, when the caller holds them (e.g.
        ``GraphView.const``)."""
        if not self.upgraded and same_computation(self.model, normalized, arrays):
            logger.info("normalised model: the input's graph with constants' Identity nodes "
                        "folded (same nodes, same weights), so it computes the same")
            return
        try:
            reference = _run(self.as_read, feeds, "input model")
        except verify.VerificationError as err:
            if not self.upgraded:
                raise
            raise InputError(f"onnxruntime cannot run the model as read at opset "
                             f"{self.opset_read}, so its upgrade cannot be checked "
                             f"({str(err).split('(', 1)[-1].rstrip(')')}) - export the model at "
                             f"opset {MIN_OPSET} or newer") from None
        if self.upgraded:
            got = _run(self.model, feeds, "upgraded model")
            err = verify.relative_error(got, reference)
            if not err < tol.value:
                raise InputError(f"upgrading from opset {self.opset_read} to {self.opset} "
                                 f"changed the model's outputs (relative error {err:.1e}) - "
                                 f"export the model at opset {MIN_OPSET} or newer")
        if normalized_outputs is None:
            normalized_outputs = verify.run(normalized, feeds, "normalised model")
        elif callable(normalized_outputs):
            normalized_outputs = normalized_outputs()
        verify.check_equivalent(normalized_outputs, reference, "normalised model",
                                "the input model", tol)


def _run(model: onnx.ModelProto, feeds: dict, where: str) -> list:
    """`verify.run`, in chunks of the batch the model's input fixes (``batch``: the
    normalised model may take any batch)."""
    from . import batch

    return batch.run_in_chunks(lambda f: verify.run(model, f, where), feeds,
                               batch.fixed(model))


def same_computation(original: onnx.ModelProto, normalized: onnx.ModelProto,
                     arrays=None) -> bool:
    """True when `normalized` provably computes what `original` does without running
    either: the same inputs, outputs, opsets and functions; the same nodes (op, domain,
    inputs, outputs, attributes; names and order aside) except Identity nodes of constants
    that became initializers; every initializer equal (type, dims, bytes) to the original
    one of its name or, for a folded Identity, to the constant it copied. Anything else
    (folded arithmetic, rewritten nodes) is False: the caller then runs both models.
    `arrays(name)`: `normalized`'s initializer values when the caller holds them (compared
    without reading its tensors' bytes again)."""
    a, b = original.graph, normalized.graph
    init_a = {t.name: t for t in a.initializer}
    init_b = {t.name: t for t in b.initializer}
    if (_opsets(original) != _opsets(normalized) or _serialized(original.functions)
            != _serialized(normalized.functions)
            or _serialized(v for v in a.input if v.name not in init_a)
            != _serialized(v for v in b.input if v.name not in init_b)
            or _serialized(a.output) != _serialized(b.output)):
        return False
    copied = {}  # a folded Identity's output -> the original initializer it copies
    for node in a.node:
        if (node.op_type == "Identity" and node.domain in ("", "ai.onnx")
                and node.output[0] in init_b and node.output[0] not in init_a):
            source = copied.get(node.input[0], node.input[0])
            if source in init_a:
                copied[node.output[0]] = source
    kept = Counter(_node_key(n) for n in a.node if n.output[0] not in copied)
    if kept != Counter(_node_key(n) for n in b.node):
        return False
    return all(name in init_a or name in copied for name in init_b) and all(
        _same_tensor(init_a[copied.get(name, name)], t, arrays) for name, t in init_b.items())


def _opsets(model: onnx.ModelProto) -> set[tuple[str, int]]:
    return {(i.domain or "ai.onnx", i.version) for i in model.opset_import}


def _serialized(messages) -> list[bytes]:
    return [m.SerializeToString(deterministic=True) for m in messages]


def _node_key(node: onnx.NodeProto) -> tuple:
    attrs = sorted((a.name, a.SerializeToString(deterministic=True)) for a in node.attribute)
    return (node.domain or "ai.onnx", node.op_type, tuple(node.input), tuple(node.output),
            tuple(attrs))


def _same_tensor(a: onnx.TensorProto, b: onnx.TensorProto, arrays=None) -> bool:
    """Equal type, dims and stored values (every field but name and doc string). Where
    `a` holds raw bytes and `arrays` gives `b`'s value, the bytes are compared with it.
    Tensors of one name and doc string are compared as messages (in C, no bytes copied
    into Python: 0.03 s against 0.3 s for a 400 MB weight)."""
    if a.name == b.name and a.doc_string == b.doc_string:
        return a == b
    skip = {"name", "doc_string"}
    value = arrays(b.name) if arrays is not None and a.HasField("raw_data") else None
    if value is not None and sys.byteorder == "little":
        meta = [f for f in ("data_type", "dims", "data_location", "external_data")
                if _field(a, f) != _field(b, f)]
        return not meta and b.HasField("raw_data") and _same_bytes(a.raw_data, value)
    fa = [(fd.name, v) for fd, v in a.ListFields() if fd.name not in skip]
    fb = [(fd.name, v) for fd, v in b.ListFields() if fd.name not in skip]
    return len(fa) == len(fb) and all(
        na == nb and _field_value(va) == _field_value(vb) for (na, va), (nb, vb) in zip(fa, fb))


def _field(t: onnx.TensorProto, name: str):
    return _field_value(getattr(t, name))


def _field_value(v):
    return v if isinstance(v, (bytes, str, int, float)) else list(v)


def _same_bytes(raw: bytes, value: np.ndarray, chunk: int = 1 << 22) -> bool:
    """`raw` equals the bytes of `value` (compared as 8-byte words, a chunk at a time)."""
    mine = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
    if len(raw) != mine.size:
        return False
    theirs = np.frombuffer(raw, np.uint8)
    words = mine.size // 8 * 8
    a, b = theirs[:words].view(np.uint64), mine[:words].view(np.uint64)
    return all(np.array_equal(a[i:i + chunk], b[i:i + chunk]) for i in range(0, a.size, chunk)
               ) and np.array_equal(theirs[words:], mine[words:])


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

    Kahn's algorithm taking the lowest-positioned ready node first (what networkx's
    ``lexicographical_topological_sort`` does, without building its graph on every load).
    Raise InputError when the nodes form a cycle."""
    nodes = list(graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    users: list[set[int]] = [set() for _ in nodes]
    waiting = [0] * len(nodes)
    for i, node in enumerate(nodes):
        for j in {producer[name] for name in _reads(node) if name in producer} - {i}:
            users[j].add(i)
            waiting[i] += 1
    ready = [i for i, n in enumerate(waiting) if n == 0]
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in users[i]:
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, j)
    if len(order) < len(nodes):
        raise InputError(f"the graph has a cycle through nodes {_cycle(nodes, users)[:4]} - "
                         "an ONNX model must be acyclic; export it again")
    if order == list(range(len(nodes))):
        return False
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)
    return True


def _cycle(nodes, users: list[set[int]]) -> list[str]:
    import networkx as nx

    deps = nx.DiGraph()
    deps.add_edges_from((i, j) for i, js in enumerate(users) for j in js)
    return [nodes[u].name or nodes[u].op_type for u, _ in nx.find_cycle(deps)]


def free_negative_dims(model: onnx.ModelProto) -> list[str]:
    """Sizes declared as a number <= 0 become named free sizes, in place; returns the
    values changed. Old paddle2onnx writes -1 for a free size (PaddleOCR 2.x models):
    onnxruntime runs such a file, but onnx's shape inference takes -1 as a size, so the
    version converter's shapes, the declared-output check and the full checker of the
    written model all failed on shapes computed from it ((-1, 1, 32, 32) for a
    320x320 DB detector's map). The value_info of those values is dropped (inferred
    again)."""
    changed = []
    g = model.graph
    for v in list(g.input) + list(g.output):
        dims = v.type.tensor_type.shape.dim if v.type.HasField("tensor_type") else []
        bad = [i for i, d in enumerate(dims) if d.HasField("dim_value") and d.dim_value <= 0]
        for i in bad:
            dims[i].Clear()
            dims[i].dim_param = f"{v.name}_dim{i}"
        if bad:
            changed.append(v.name)
    keep = [v for v in g.value_info
            if not any(d.HasField("dim_value") and d.dim_value <= 0
                       for d in v.type.tensor_type.shape.dim)]
    if len(keep) != len(g.value_info):
        del g.value_info[:]
        g.value_info.extend(keep)
    return changed


def explicit_default_axes(model: onnx.ModelProto) -> list[str]:
    """Give each MeanVarianceNormalization without ``axes`` its default, ``[0, 2, 3]``, in
    place; returns those nodes' names. The same computation, but onnx's full checker
    expands the op's function body with a Constant of no value when the attribute is
    left out, so every model holding one was pruned and then refused at the end
    ("pruned model fails the ONNX checker"), though onnxruntime runs it."""
    named = []
    for node in model.graph.node:
        if node.op_type == "MeanVarianceNormalization" and node.domain in ("", "ai.onnx") \
                and not any(a.name == "axes" for a in node.attribute):
            node.attribute.append(helper.make_attribute("axes", [0, 2, 3]))
            named.append(node.name or node.output[0])
    return named


def upgrade_opset(model: onnx.ModelProto, where: str = "model") -> onnx.ModelProto:
    """`model` converted to TARGET_OPSET; raise InputError when the converter fails."""
    source = opset_version(model)
    staged = onnx.ModelProto()
    staged.CopyFrom(model)
    # IR < 4 wants every initializer listed as a graph input, which the converter's
    # new constants are not; the target opset needs a newer IR anyway.
    target_ir = helper.find_min_ir_version_for([helper.make_opsetid("", TARGET_OPSET)])
    staged.ir_version = max(staged.ir_version, target_ir)
    _decompose_image_scalers(staged)
    _spatial_batchnorm_on_vectors(staged)
    gone = sorted({n.op_type for n in staged.graph.node
                   if n.domain in ("", "ai.onnx") and not onnx.defs.has(n.op_type)})
    if gone:
        raise InputError(f"{where} uses opset {source} and its experimental op "
                         f"{', '.join(gone)}, which no opset from {MIN_OPSET} on has - write it "
                         "with standard ops (e.g. Mul and Add) or export the model at opset "
                         f"{MIN_OPSET} or newer")
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


def _decompose_image_scalers(model: onnx.ModelProto) -> None:
    """ImageScaler (experimental until opset 9: ``scale * x + bias[c]``, the preprocessing
    of the model zoo's opset 7/8 classics) has no schema the converter knows: it becomes
    Mul and Add of constants, in place."""
    nodes = []
    for node in model.graph.node:
        if node.op_type != "ImageScaler" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        scale = np.array(attrs.get("scale", 1.0), np.float32)
        stem = node.output[0]
        scaled = f"{stem}__scaled" if attrs.get("bias") else stem
        model.graph.initializer.append(onnx.numpy_helper.from_array(scale, f"{stem}__scale"))
        nodes.append(helper.make_node("Mul", [node.input[0], f"{stem}__scale"], [scaled],
                                      name=f"{node.name or stem}_scale"))
        if attrs.get("bias"):
            bias = np.array(attrs["bias"], np.float32).reshape(1, -1, 1, 1)
            model.graph.initializer.append(onnx.numpy_helper.from_array(bias, f"{stem}__bias"))
            nodes.append(helper.make_node("Add", [scaled, f"{stem}__bias"], [stem],
                                          name=f"{node.name or stem}_bias"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _spatial_batchnorm_on_vectors(model: onnx.ModelProto) -> None:
    """BatchNormalization with spatial=0 (before opset 9; CNTK writes it after a dense
    layer) whose statistics are vectors normalises an (N, C) input, where per activation is
    per channel: spatial=1 computes the same, and the converter only upgrades that."""
    ranks = {t.name: len(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        spatial = [a for a in node.attribute if a.name == "spatial"]
        if spatial and spatial[0].i == 0 and len(node.input) == 5 \
                and all(ranks.get(name) == 1 for name in node.input[1:]):
            spatial[0].i = 1


def _keep_old_resize_semantics(model: onnx.ModelProto) -> None:
    """Resize nodes without a coordinate mode came from Upsample-9 / Resize-10. The
    converter's ``roi`` (read only by tf_crop_and_resize, optional from opset 13) goes:
    it is no weight of the model's, but would be counted as parameters."""
    dropped = set()
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
        if TARGET_OPSET >= 13 and len(node.input) > 1 and node.input[1]:
            dropped.add(node.input[1])
            node.input[1] = ""
    read = {name for node in model.graph.node for name in node.input}
    for i in reversed(range(len(model.graph.initializer))):
        if model.graph.initializer[i].name in dropped - read:
            del model.graph.initializer[i]
