"""Recurrent layers: LSTM, GRU, RNN (forward, reverse, bidirectional; layout 0 or 1).

Shapes (layout 0; layout 1 swaps the seq and batch axes of X, Y, Y_h, Y_c and the
initial states' batch axis, which moves none of the channel axes below):
``X (seq, batch, I)``, ``W (D, G*H, I)``, ``R (D, G*H, H)``, ``B (D, 2*G*H)``,
``initial_h / initial_c (D, batch, H)``, ``P (D, 3*H)`` (LSTM peepholes),
``Y (seq, D, batch, H)``, ``Y_h / Y_c (D, batch, H)``; G = 4 gates for LSTM (i, o, f, c),
3 for GRU (z, r, h), 1 for RNN; D = 2 when bidirectional. Every gate block is H rows:

    gate_g(t) = f_g(X_t W_g^T + H_{t-1} R_g^T + Wb_g + Rb_g)   (W_g = W[d, g*H:(g+1)*H])

* Input feature k (X's channel axis 2) is read by column ``W[:, :, k]`` only (role in).
* Hidden unit j is one channel of both directions (they share H): element j of Y's
  axis 3 and of the states' axis 2. It is produced by rows ``g*H + j`` of W and R (role
  out), ``B[:, g*H + j]`` for its 2G bias blocks and ``P[:, g*H + j]`` (role chan), and
  read back by the recurrence through column ``R[:, :, j]`` (role in). Cell state and
  peepholes are element-wise per unit, and the GRU's reset gate multiplies unit j's
  state before column j reads it, so once column j is zero unit j reaches no other unit:
  masking that column and the unit's consumers equals removing the unit. Layout rules
  carry the units to consumers: after ``Transpose``/``Reshape`` to ``(seq, batch, D*H)``
  unit j is features ``d*H + j``.
* Initial states: a constant is sliced with the units (role chan); a computed state
  carrying channels on axis 2 is tied to them; zeros from ``ConstantOfShape`` (what the
  PyTorch exporter writes for an omitted h0, maybe sliced per layer) are dropped by surgery, as an omitted
  state is zeros; any other computed state keeps the units, with that reason.

Surgery slices the gate blocks and sets ``hidden_size``. MACs per sample:
``seq * D * G*H * I`` for W and ``seq * D * G*H * H`` for R.
"""
from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from .base import (ROLE_CHAN, ROLE_IN, ROLE_OUT, NodeChannels, OpRule, ParamSlice, attr,
                   register)

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
STATE_INPUTS = {"LSTM": (5, 6), "GRU": (5,), "RNN": (5,)}
PEEPHOLE_INPUT = 7  # LSTM only


def _gate_rows(h: int, blocks: int) -> np.ndarray:
    """(H, blocks): unit j owns index g*H + j of every gate block g."""
    return np.arange(h)[:, None] + h * np.arange(blocks)[None, :]


def _outputs(node) -> list[tuple[str, int]]:
    """Present outputs with the axis of their hidden units: Y axis 3, Y_h / Y_c axis 2."""
    return [(name, 3 if i == 0 else 2) for i, name in enumerate(node.output) if name]


_MOVERS = ("Slice", "Split", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Expand",
           "Transpose", "Gather", "Tile", "Cast")  # zeros in, zeros out


def zero_state(view, name: str) -> bool:
    """True when `name` is all zeros: a zero constant or ConstantOfShape of value 0, maybe
    reshaped, sliced or expanded (the PyTorch exporter slices one zero tensor per layer,
    tf2onnx expands a zero to a computed (batch, H) shape), or a Concat of zero tensors
    (tf2onnx stacks one per direction)."""
    prod = view.producer.get(name)
    while prod is not None and prod.op_type in _MOVERS:
        name, prod = prod.input[0], view.producer.get(prod.input[0])
    const = view.const(name)
    if const is not None:
        return not np.any(const)
    if prod is not None and prod.op_type == "Concat":
        return all(zero_state(view, v) for v in prod.input)
    if prod is None or prod.op_type != "ConstantOfShape":
        return False
    value = attr(prod, "value")
    return value is None or not np.any(numpy_helper.to_array(value))


@register("LSTM", "GRU", "RNN")
class RecurrentRule(OpRule):
    def analyze(self, node, ctx):
        x, w, r = node.input[0], node.input[1], node.input[2]
        outs = _outputs(node)
        res = NodeChannels(out_axes=dict(outs))
        if not outs:
            return res
        anchor = outs[0][0]
        for name, _ in outs[1:]:
            res.tie(anchor, name, width=ctx.shape(anchor)[res.out_axes[anchor]])
        weights = [v for v in (w, r, ctx.view.input(node, 3)) if v]
        if not all(ctx.is_const_param(v) for v in weights):
            res.blocked.append((anchor, f"{node.op_type} weights are computed, not constant"))
            if ctx.has_channels(x):
                res.blocked.append((x, f"{node.op_type} weights are computed, not constant"))
            return res
        h = ctx.shape(r)[2]
        gates = GATES[node.op_type]
        rows = _gate_rows(h, gates)
        res.params += [ParamSlice(node.name, 1, w, 1, anchor, ROLE_OUT, index=rows),
                       ParamSlice(node.name, 2, r, 1, anchor, ROLE_OUT, index=rows),
                       ParamSlice(node.name, 2, r, 2, anchor, ROLE_IN)]
        if ctx.view.input(node, 3):
            res.params.append(ParamSlice(node.name, 3, node.input[3], 1, anchor, ROLE_CHAN,
                                         index=_gate_rows(h, 2 * gates)))
        peep = ctx.view.input(node, PEEPHOLE_INPUT) if node.op_type == "LSTM" else None
        if peep:
            if ctx.is_const_param(peep):
                res.params.append(ParamSlice(node.name, PEEPHOLE_INPUT, peep, 1, anchor,
                                             ROLE_CHAN, index=_gate_rows(h, 3)))
            else:
                res.blocked.append((anchor, "LSTM peepholes are computed, not constant"))
        self._states(node, ctx, res, anchor)
        if ctx.axis(x) == 2:
            res.params.append(ParamSlice(node.name, 1, w, 2, x, ROLE_IN))
        elif ctx.has_channels(x):
            res.blocked.append((x, f"{node.op_type} reads input features on axis 2, but "
                                   f"they arrive on axis {ctx.axis(x)}"))
        return res

    @staticmethod
    def _states(node, ctx, res: NodeChannels, anchor: str) -> None:
        for index in STATE_INPUTS[node.op_type]:
            state = ctx.view.input(node, index)
            if not state:
                continue
            if ctx.is_const_param(state):
                res.params.append(ParamSlice(node.name, index, state, 2, anchor, ROLE_CHAN))
            elif ctx.axis(state) == 2:
                res.tie(state, anchor, width=ctx.width(state))
            elif zero_state(ctx.view, state):
                continue
            else:
                why = ("is a model input" if state in ctx.view.input_names
                       else "is computed and gpp-onnx cannot shrink it")
                res.blocked.append((anchor, f"{node.op_type} initial state '{state}' {why}"))
                if ctx.has_channels(state):
                    res.blocked.append((state, f"{node.op_type} reads states on axis 2"))

    def rewrite(self, node, edit):
        outs = _outputs(node)
        kept = edit.kept(outs[0][0]) if outs else None
        if kept is None:
            return
        edit.set_attr(node, "hidden_size", len(kept))
        for index in STATE_INPUTS[node.op_type]:
            state = edit.view.input(node, index)
            if state and not edit.view.is_const(state) and edit.kept(state) is None \
                    and zero_state(edit.view, state):
                node.input[index] = ""  # an omitted state is zeros
        while not node.input[-1]:
            del node.input[-1]

    def weight_slots(self, node):
        return (1, 2, 3, PEEPHOLE_INPUT) if node.op_type == "LSTM" else (1, 2, 3)

    def macs(self, node, view):
        w, r = view.shape(node.input[1]), view.shape(node.input[2])
        x = view.shape(node.input[0])
        if w is None or r is None or x is None:
            return {}
        seq = x[1] if attr(node, "layout", 0) else x[0]
        return {1: int(seq * np.prod(w)), 2: int(seq * np.prod(r))}
