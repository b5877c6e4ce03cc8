"""Multi-head attention: whole heads are the channels.

Scaled dot-product attention with H heads of width d computes, per head h,

    O_h = softmax(s * Q_h K_h^T) V_h,   Q_h = X Wq[:, h*d:(h+1)*d] + bq[h*d:(h+1)*d]

(K_h, V_h alike) and the block's output is ``concat_h(O_h) Wo + bo``. Head h reads only
its own d columns of Wq, Wk, Wv (and biases) and feeds only rows ``h*d .. (h+1)*d - 1``
of Wo; the scale s, the two matmuls and the softmax act on each head separately. So
removing head h (its q/k/v projection columns, biases and its Wo rows) gives exactly the
original with those Wo rows zeroed: a head is one channel, tied across the q/k/v
projection outputs and the out-projection input. Nothing else of the block changes
except the head count in the reshape targets between them.

The block is recognised by its core, ``MatMul(q, k) -> [Mul/Div by a scalar] ->
Softmax (not over the heads) -> MatMul(., v)`` on tensors whose one batch axis of size
> 1 is the head axis (the probe runs at batch 1; a batch fixed above 1 is not followed).
From q, k and v the rule walks up through layout ops (Reshape, Transpose, (Un)Squeeze,
Gather/Slice/Split with constant indices, scaling by a scalar) to the projection
outputs, and from the output down through layout ops to the input of a Gemm/MatMul with a
constant weight. Which projection channel lands in which head is not guessed from the
exporter's pattern but *traced*: an array holding each channel's index is pushed through
the same layout ops in numpy (the probe's shapes), and read off along the head axis of
q, k and v (and, for the output side, an array holding each element's head is pushed
down to the out-projection input). The block is accepted only when every value on the
way has its heads along a single axis in equal shares, so that removing heads is a plain
slice there and each Reshape target needs one entry scaled by ``H'/H``. Targets computed
from ``Shape`` (a dynamic batch, legacy exporter) are resolved to constants by
evaluating them at batch 1 and 2: the entry that changes becomes -1.

Anything else (a head-count read by ``Shape`` into the computation, a value of the block
used outside it, masks, heads along two axes) keeps the generic rules, which block the
heads with their reasons; a recognised core whose walk fails blocks with its own reason.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx

from .base import Blocker, NodeChannels, OpRule, attr, norm_axis
from .index_trace import (LAYOUT, NotFollowed, apply_layout, const_input, data_input,
                          layout_ok, op_axes, scalar_side, single_axis)
from .shape_reads import shape_dims_read

logger = logging.getLogger(__name__)

_FORM_ERRORS = (ValueError, IndexError, KeyError, TypeError)
_SHAPE_OPS = {"Shape", "Gather", "Slice", "Cast", "Sqrt", "Div", "Mul", "Reciprocal", "Pow",
              "Unsqueeze", "Squeeze", "Concat", "Identity"}


@dataclass(eq=False)
class Block:
    heads: int
    sources: dict[str, np.ndarray]       # projection output -> head of each channel
    x: str                               # out-projection input (channels on its last axis)
    x_heads: np.ndarray                  # head of each channel of x
    closing: str                         # the node producing x
    head_axis: dict[str, int] = field(default_factory=dict)   # internal value -> head axis
    targets: dict[str, np.ndarray] = field(default_factory=dict)  # Reshape -> its target
    nodes: set[str] = field(default_factory=set)
    traced: dict = field(default_factory=dict)   # value -> (source, channel index array)
    core: tuple[str, str] = ("", "")             # the QK and AV MatMuls


class HeadRule(OpRule):
    """The rule of every node inside one recognised attention block."""

    def __init__(self, block: Block):
        self.block = block

    def analyze(self, node, ctx):
        blk = self.block
        res = NodeChannels(out_axes={o: None for o in node.output if o})
        if node.name != blk.closing:
            return res
        res.out_axes[blk.x] = len(ctx.shape(blk.x)) - 1
        bad = [p for p in blk.sources if ctx.axis(p) != len(ctx.shape(p)) - 1]
        if bad:
            reason = (f"attention projection output '{bad[0]}' does not carry channels on "
                      "its last axis")
            res.blocked += [(v, reason) for v in blk.sources if ctx.has_channels(v)]
            res.blocked.append((blk.x, reason))
            return res
        for h in range(blk.heads):
            anchor = np.flatnonzero(blk.x_heads == h)[:1]
            res.tie(blk.x, blk.x, ia=np.flatnonzero(blk.x_heads == h),
                    ib=np.repeat(anchor, int((blk.x_heads == h).sum())))
            for p, heads in blk.sources.items():
                own = np.flatnonzero(heads == h)
                res.tie(p, blk.x, ia=own, ib=np.repeat(anchor, len(own)))
        return res

    def rewrite(self, node, edit):
        blk = self.block
        kept = edit.kept(blk.x)
        if kept is None or node.name not in blk.targets:
            return
        new_heads = len(np.unique(blk.x_heads[kept]))
        target = blk.targets[node.name].copy()
        axis = blk.head_axis[node.output[0]]
        if target[axis] > 0:
            target[axis] = target[axis] // blk.heads * new_heads
        edit.set_input_const(node, 1, target.astype(np.int64))


def attention_rules(view) -> dict[str, OpRule]:
    """Node name -> rule for the nodes of every attention block of the graph.

    A core that is found but whose block cannot be followed gets a Blocker on its two
    MatMuls, so that ``analyze`` says why the heads stay."""
    rules: dict[str, OpRule] = {}
    found = []
    for node in view.nodes:
        if node.op_type != "Softmax":
            continue
        try:
            core = _core(view, node)
        except _FORM_ERRORS as err:  # a form the matcher did not expect: not attention
            logger.debug("no attention core at %s: %s", node.name, err)
            core = None
        if core is None:
            continue
        try:
            found.append(_block(view, *core))
        except (NotFollowed, *_FORM_ERRORS) as why:
            _refuse(rules, (core[0].name, core[1].name), why)
    targets = _Targets(view, [t for block in found for t in _computed(view, block)])
    for block in found:
        try:
            _resolve_targets(view, block, targets)
        except NotFollowed as why:
            _refuse(rules, block.core, why)
            continue
        rule = HeadRule(block)
        rules.update({name: rule for name in block.nodes})
    return rules


def _refuse(rules: dict, core: tuple[str, str], why: Exception) -> None:
    logger.debug("attention at %s not followed: %s", core[0], why)
    blocker = Blocker(f"attention heads not followed: {why}")
    rules.update({name: blocker for name in core})


def _core(view, softmax):
    """(QK MatMul, AV MatMul, nodes between them) around `softmax`, or None."""
    between, last = [softmax], softmax
    node = view.producer.get(softmax.input[0])
    while node is not None and node.op_type in ("Mul", "Div") and scalar_side(view, node):
        between.append(node)
        node = view.producer.get(data_input(view, node))
    if node is None or node.op_type != "MatMul" or const_input(view, node):
        return None
    out = _only_user(view, softmax.output[0])
    while out is not None and out.op_type in ("Identity", "Dropout", "Cast"):
        between.append(out)
        last, out = out, _only_user(view, out.output[0])
    if out is None or out.op_type != "MatMul" or view.producer.get(out.input[0]) is not last:
        return None
    return node, out, between


def _only_user(view, value):
    users = view.consumers.get(value, [])
    return users[0] if len(users) == 1 else None


def _block(view, qk, av, between) -> Block:
    rank = len(view.shape(qk.output[0]))
    batch_axes = [i for i in range(rank - 2) if view.shape(qk.output[0])[i] > 1]
    if len(batch_axes) != 1:
        raise NotFollowed("no single head axis among the attention matmul's batch axes")
    ha = batch_axes[0]
    heads = view.shape(qk.output[0])[ha]
    soft = between[0]
    if norm_axis(attr(soft, "axis", -1), rank) == ha:
        raise NotFollowed("Softmax normalises over the heads")
    for name in (qk.input[0], qk.input[1], av.input[1], av.output[0]):
        if len(view.shape(name)) != rank or view.shape(name)[ha] != heads:
            raise NotFollowed(f"'{name}' does not carry the {heads} heads on axis {ha}")
    block = Block(heads, {}, "", np.empty(0), "", core=(qk.name, av.name))
    block.nodes |= {qk.name, av.name} | {n.name for n in between}
    for name in (qk.input[0], qk.input[1], av.input[1]):
        _trace_up(view, block, name, ha)
    for source, heads_of in block.sources.items():
        if (heads_of < 0).any():
            raise NotFollowed(f"channels of '{source}' outside the heads")
        block.head_axis[source] = len(view.shape(source)) - 1
    for name, (source, idx) in block.traced.items():
        block.head_axis[name] = single_axis(name, block.sources[source][idx], heads)
    _trace_down(view, block, av.output[0], ha)
    for name in (qk.output[0], *[o for n in between for o in n.output]):
        block.head_axis[name] = ha
    _check_uses(view, block)
    return block


def _trace_up(view, block, value, ha) -> None:
    """Walk from a matmul operand up to its projection output; learn each channel's head."""
    chain = []
    while (node := view.producer.get(value)) is not None and node.op_type in LAYOUT \
            and layout_ok(view, node):
        chain.append((node, value))
        value = data_input(view, node)
    if not chain:
        raise NotFollowed(f"'{value}' is not reshaped into heads")
    source = value
    shape = view.shape(source)
    index = np.broadcast_to(np.arange(shape[-1]), shape)
    values = {}
    for node, out in reversed(chain):
        index = apply_layout(view, node, index, out)
        values[out] = index
    heads_of = block.sources.setdefault(source, np.full(shape[-1], -1))
    moved = np.moveaxis(index, ha, 0).reshape(block.heads, -1)
    for h, channels in enumerate(moved):
        if np.any((heads_of[channels] != -1) & (heads_of[channels] != h)):
            raise NotFollowed(f"a channel of '{source}' feeds two heads")
        heads_of[channels] = h
    block.nodes |= {n.name for n, _ in chain}
    block.traced.update({name: (source, idx) for name, idx in values.items()})


def _trace_down(view, block, value, ha) -> None:
    """Walk from the attention output down to the out-projection input."""
    shape = view.shape(value)
    heads = np.broadcast_to(np.arange(block.heads).reshape(
        [-1 if i == ha else 1 for i in range(len(shape))]), shape)
    block.head_axis[value] = ha
    while True:
        users = [u for u in view.consumers.get(value, []) if u.op_type != "Shape"]
        if len(users) != 1:
            raise NotFollowed(f"'{value}' is used by {len(users)} nodes")
        user = users[0]
        if user.op_type in ("Gemm", "MatMul") and user.input[0] == value \
                and const_input(view, user) and len(view.shape(user.input[1])) == 2:
            break
        if user.op_type not in LAYOUT or not layout_ok(view, user) \
                or data_input(view, user) != value:
            raise NotFollowed(f"the attention output reaches {user.op_type} "
                              f"'{user.name}', not a linear out-projection")
        value = user.output[0]
        heads = apply_layout(view, user, heads, value)
        block.nodes.add(user.name)
        block.head_axis[value] = single_axis(value, heads, block.heads)
        block.closing = user.name
    width = view.shape(value)[-1]
    if not block.closing or block.head_axis[value] != heads.ndim - 1:
        raise NotFollowed("the out-projection does not read the heads on its last axis")
    block.x = value
    block.x_heads = np.moveaxis(heads, -1, 0).reshape(width, -1)[:, 0].copy()


def _check_uses(view, block: Block) -> None:
    """Every value of the block is used only inside it (or by a Shape not reading its
    heads); scalings are constants or shape arithmetic that does not read the heads."""
    nodes = {n.name: n for n in view.nodes if n.name in block.nodes}
    outputs = set(view.output_names)
    for name, ha in block.head_axis.items():
        if name in outputs:
            raise NotFollowed(f"'{name}' is a model output")
        for user in view.consumers.get(name, []):
            if user.name in block.nodes or (name == block.x and user.op_type != "Shape"):
                continue
            if user.op_type == "Shape" and (ha not in (shape_dims_read(view, user) or {ha})
                                            or _only_targets(view, block, user)):
                continue
            raise NotFollowed(f"'{name}' is also used by {user.op_type} '{user.name}'")
    for node in nodes.values():
        if node.op_type in ("Gather", "Split", "Slice") and block.head_axis.get(
                node.input[0]) in op_axes(view, node, len(view.shape(node.input[0]))):
            raise NotFollowed(f"{node.op_type} '{node.name}' picks heads")
        if node.op_type in ("Mul", "Div") and not _shape_only(view, block,
                                                              scalar_side(view, node)):
            raise NotFollowed(f"the scale of {node.op_type} '{node.name}' is computed from "
                              "more than shapes that stay")


def _only_targets(view, block: Block, shape: onnx.NodeProto) -> bool:
    """True when what `shape` reads only builds targets of the block's Reshapes (which
    are replaced by constants, see _resolve_targets)."""
    stack = [shape.output[0]]
    while stack:
        value = stack.pop()
        if value in view.output_names:
            return False
        for user in view.consumers.get(value, []):
            if user.op_type == "Reshape" and user.name in block.nodes and user.input[1] == value:
                continue
            if user.op_type not in _SHAPE_OPS or user.op_type == "Shape":
                return False
            stack.extend(o for o in user.output if o)
    return True


def _shape_only(view, block: Block, name: str) -> bool:
    """True when `name` is a constant or shape arithmetic that reads no head axis."""
    stack, seen = [name], set()
    while stack:
        value = stack.pop()
        if value in seen or view.is_const(value):
            continue
        seen.add(value)
        node = view.producer.get(value)
        if node is None or node.op_type not in _SHAPE_OPS:
            return False
        if node.op_type == "Shape":
            src = node.input[0]
            if src in block.head_axis and block.head_axis[src] in (
                    shape_dims_read(view, node) or {block.head_axis[src]}):
                return False
            continue
        stack.extend(i for i in node.input if i)
    return True


class _Targets:
    """The computed Reshape targets of all blocks, evaluated once at batch 1 and 2."""

    def __init__(self, view, names: list[str]):
        self.values: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.error: NotFollowed | None = None
        if not names:
            return
        try:
            if _symbolic_dims(view):
                raise NotFollowed("computed Reshape targets with symbolic input dims other "
                                  "than the batch")
            one = _evaluate(view, names, None)
            two = _evaluate(view, names, 2) if view.dynamic_batch else one
            self.values = {n: (one[n], two[n]) for n in names}
        except NotFollowed as err:
            self.error = err

    def pair(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if self.error is not None:
            raise self.error
        return self.values[name]


def _reshapes(view, block: Block) -> list[onnx.NodeProto]:
    return [n for n in view.nodes if n.name in block.nodes and n.op_type == "Reshape"]


def _computed(view, block: Block) -> list[str]:
    return [n.input[1] for n in _reshapes(view, block) if view.const(n.input[1]) is None]


def _resolve_targets(view, block: Block, targets: _Targets) -> None:
    """Each Reshape's target as a constant; a computed one evaluated at batch 1 and 2,
    the entry that follows the batch written as -1."""
    for node in _reshapes(view, block):
        target = view.const(node.input[1])
        if target is None:
            one, two = targets.pair(node.input[1])
            if (one != two).sum() + (one == -1).sum() > 1:
                raise NotFollowed(f"the target of Reshape '{node.name}' has several "
                                  "dynamic entries")
            target = np.where(one != two, -1, one)
        copied = set(np.flatnonzero(target == 0).tolist())  # 0: copy the input's dim
        if copied & {block.head_axis[node.output[0]], block.head_axis[node.input[0]]}:
            raise NotFollowed(f"Reshape '{node.name}' copies a dim that holds heads (0 entry)")
        block.targets[node.name] = np.asarray(target, dtype=np.int64)


def _symbolic_dims(view) -> bool:
    init = set(view.init_protos)
    return any(not d.HasField("dim_value") for v in view.graph.input if v.name not in init
               for d in list(v.type.tensor_type.shape.dim)[1:])


def _evaluate(view, names: list[str], batch: int | None) -> dict[str, np.ndarray]:
    """Values of `names` for random inputs (of batch size `batch`)."""
    from ..graph import random_feeds
    from ..verify import make_session

    model = onnx.ModelProto()
    model.CopyFrom(view.model)
    del model.graph.output[:]
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(names))
    try:
        session = make_session(model, where="attention shape targets", optimize=False)
        values = session.run(list(dict.fromkeys(names)), random_feeds(view.inputs, batch))
    except Exception as err:  # onnxruntime raises its own types
        raise NotFollowed(f"computed Reshape targets fail to evaluate ({err})") from None
    return dict(zip(dict.fromkeys(names), (np.asarray(v) for v in values)))
