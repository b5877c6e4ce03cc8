"""An Inception module grown on a feature map, computing what the base computed.

On a value ``v`` with C channels (activation ``act`` of the host conv block, see
``host.host_activation``) the module is

    b1 = act?(Conv1x1_{C->C}(v))                                  identity branch
    b2 = act(Conv3x3_{w2->w2}(act(Conv1x1_{C->w2}(v))))
    b3 = act(Conv3x3(act(Conv3x3(act(Conv1x1_{C->w3}(v))))))     the 5x5 as two 3x3
    b4 = act(Conv1x1_{C->w4}(MaxPool3x3,stride 1,pad 1(v)))
    y  = Concat(b1, b2, b3, b4)        (C + w2 + w3 + w4 channels, v's first)

and every consumer of ``v`` reads ``y`` instead, its weights extended with zeros for
the ``w2 + w3 + w4`` extra channels (``host.extension_plan``).

Why it computes what the base computes, before any training:

* ``b1``'s conv starts as the identity (``W[i, j] = [i == j]``, bias 0), so its conv
  output is ``v`` exactly (one product by 1, the rest by 0).
* The activation after it must be the identity on the values ``v`` takes. ``v`` is an
  output of ``act``, so that holds when ``act`` is idempotent, ``act(act(x)) = act(x)``:
  ReLU (``v >= 0``, ReLU(v) = v) and Clip (``lo <= v <= hi``). Max/average pools,
  Dropout and Identity between the activation and ``v`` keep its range. For any other
  host activation (LeakyReLU, SiLU, HardSwish, Sigmoid, ...; or none, after a linear
  conv or BatchNormalization) ``act(v) != v`` in general, so ``b1`` has no activation:
  a linear 1x1 that starts as the identity and stays trainable. The other branches use
  the host's activation (ReLU where the host has none).
* The extra channels reach only weights that are 0, so the consumers compute what they
  computed on ``v``. The extra branches themselves start with He-normal weights (biases
  0), not zeros: with both their output weights and the consumers' new weights at 0,
  every gradient of either is 0 (each is multiplied by the other) and the branches
  would never learn. One zero side keeps the function; the random side gives the
  consumers' new weights a gradient from the first step.

``insert_module`` checks the grown model (ONNX checker, onnxruntime) and that its outputs
match the base's (relative error below 1e-5 on random inputs) before returning it.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import onnx

from .. import verify
from ..edit import Editor
from ..errors import InputError, VerificationError
from ..graph import GraphView
from ..logits import exposing, saturated_inputs
from .host import RELU, Activation, Position, extended, extension_plan

logger = logging.getLogger(__name__)

PRESERVE_TOLERANCE = 1e-5
BRANCHES = ("1x1", "3x3", "3x3dbl", "pool")


@dataclass(frozen=True)
class Widths:
    """Output widths of the 1x1->3x3, 1x1->3x3->3x3 and pool->1x1 branches (their 1x1
    reduce layers have the same width). None: C/2, C/4, C/4 of the input's C channels,
    rounded up to a multiple of 8 (onnxruntime's blocked conv layout), at least 8."""
    b3x3: int | None = None
    b3x3dbl: int | None = None
    pool: int | None = None

    def resolved(self, channels: int) -> tuple[int, int, int]:
        def default(f: float) -> int:
            return max(8, 8 * math.ceil(channels * f / 8))

        got = (self.b3x3 or default(0.5), self.b3x3dbl or default(0.25),
               self.pool or default(0.25))
        if min(got) < 1:
            raise InputError(f"--branch-widths {','.join(map(str, got))} must be positive")
        return got


@dataclass(frozen=True)
class Module:
    """One inserted module: where, how wide, which activation."""
    index: int
    at: str
    output: str
    channels: int                 # input channels C (the identity branch's width)
    widths: tuple[int, int, int]
    height: int
    width: int
    activation: str               # the branches' activation
    identity_activation: bool     # whether the identity branch ends in it
    error: float                  # grown vs base right after insertion (relative)

    @property
    def out_channels(self) -> int:
        return self.channels + sum(self.widths)

    def branch_channels(self) -> dict[str, tuple[int, int]]:
        """Each branch's [start, stop) slice of the module's output channels."""
        sizes = (self.channels, *self.widths)
        starts = np.cumsum((0,) + sizes)
        return {b: (int(starts[i]), int(starts[i + 1])) for i, b in enumerate(BRANCHES)}


class _Builder:
    """Adds one module's nodes through an Editor."""

    def __init__(self, editor: Editor, prefix: str, act: Activation, rng):
        self.ed, self.prefix, self.act, self.rng = editor, prefix, act, rng

    def conv(self, x: str, c_in: int, c_out: int, k: int, name: str,
             weight: np.ndarray | None = None, activate: bool = True) -> str:
        if weight is None:
            std = math.sqrt(2.0 / (c_in * k * k))
            weight = (self.rng.standard_normal((c_out, c_in, k, k)) * std).astype(np.float32)
        node = f"{self.prefix}.{name}"
        w = self.ed.add_initializer(f"{node}.weight", weight)
        b = self.ed.add_initializer(f"{node}.bias", np.zeros(c_out, np.float32))
        y = self.ed.add_node("Conv", [x, w, b], node, kernel_shape=[k, k], pads=[k // 2] * 4,
                             strides=[1, 1])
        return self.activation(y, f"{node}.act") if activate else y

    def activation(self, x: str, name: str) -> str:
        return self.ed.add_node(self.act.op, [x, *self.act.const_inputs], name,
                                **dict(self.act.attrs))

    def module(self, v: str, c: int, widths: tuple[int, int, int], identity_act: bool) -> str:
        w2, w3, w4 = widths
        eye = np.eye(c, dtype=np.float32).reshape(c, c, 1, 1)
        b1 = self.conv(v, c, c, 1, "1x1", weight=eye, activate=identity_act)
        b2 = self.conv(self.conv(v, c, w2, 1, "3x3.reduce"), w2, w2, 3, "3x3")
        b3 = self.conv(v, c, w3, 1, "3x3dbl.reduce")
        b3 = self.conv(self.conv(b3, w3, w3, 3, "3x3dbl.a"), w3, w3, 3, "3x3dbl.b")
        pooled = self.ed.add_node("MaxPool", [v], f"{self.prefix}.pool", kernel_shape=[3, 3],
                                  strides=[1, 1], pads=[1, 1, 1, 1])
        b4 = self.conv(pooled, c, w4, 1, "pool.1x1")
        return self.ed.add_node("Concat", [b1, b2, b3, b4], f"{self.prefix}.concat", axis=1)


def insert_module(model: onnx.ModelProto, pos: Position, widths: Widths, index: int,
                  seed: int = 0, input_shape=None, view: GraphView | None = None
                  ) -> tuple[onnx.ModelProto, Module]:
    """`model` with module number `index` inserted at `pos` (checked, function-preserving
    within 1e-5). `view`: a GraphView of `model` when the caller has one."""
    view = view or GraphView(model, input_shape)
    sizes = widths.resolved(pos.channels)
    extension = extension_plan(view, pos.value, sum(sizes))
    act = pos.activation or RELU
    identity_act = pos.activation is not None and pos.activation.idempotent
    editor = Editor.copy(model)
    builder = _Builder(editor, _free_prefix(model, index), act,
                       np.random.default_rng(seed + index))
    out = editor.insert_on(pos.value, lambda ed, v: builder.module(v, pos.channels, sizes,
                                                                   identity_act))
    _extend_consumers(editor, view, extension)
    grown = editor.finish(where=f"model grown at '{pos.value}'", input_shape=input_shape)
    error = _check_preserved(view, grown.model, pos.value)
    module = Module(index, pos.value, out, pos.channels, sizes, pos.height, pos.width, act.op,
                    identity_act, error)
    logger.info("module %d at '%s' (%d channels, %dx%d): branches 1x1 %d, 3x3 %d, 3x3dbl "
                "%d, pool %d; outputs match the base (relative error %.1e)", index, pos.value,
                pos.channels, pos.height, pos.width, pos.channels, *sizes, error)
    return grown.model, module


def _free_prefix(model: onnx.ModelProto, index: int) -> str:
    """``grow<k>`` for the first k >= index no node name uses yet (a grown model grown
    again keeps its modules' names apart)."""
    used = {n.name.split(".", 1)[0] for n in model.graph.node}
    while f"grow{index}" in used:
        index += 1
    return f"grow{index}"


def _extend_consumers(editor: Editor, view: GraphView, extension) -> None:
    nodes = {n.name: n for n in editor.graph.node}
    for step in extension.widen:
        node = nodes[step.node]
        old = node.input[step.index]
        node.input[step.index] = editor.add_initializer(f"{old}.grown",
                                                        extended(view.const(old), step))
    for step in extension.reshapes:
        node = nodes[step.node]
        target = view.const(node.input[1]).copy()
        target[1] += step.extra
        node.input[1] = editor.add_initializer(f"{node.input[1]}.grown", target)


def _check_preserved(view: GraphView, grown: onnx.ModelProto, at: str) -> float:
    feeds = view.check_feeds()
    # the logits in front of a final Softmax/Sigmoid too: a saturated output hides them
    extra = [name for name in saturated_inputs(grown) if name in view.producer]
    base = verify.run(exposing(view.detached, extra), feeds, "base model")
    err = verify.relative_error(
        verify.run(exposing(verify.session_source(grown), extra), feeds, "grown model"), base)
    if not err < PRESERVE_TOLERANCE:
        raise VerificationError(f"the model grown at '{at}' does not compute what the base "
                                f"computes (relative error {err:.1e} >= "
                                f"{PRESERVE_TOLERANCE:.0e}); nothing was written - please "
                                "report this model")
    return err
