"""Recurrent layers (LSTM, GRU, RNN) with ONNX semantics, as a time loop of torch ops.

Per direction d, with ``W = W[d]``, ``R = R[d]``, ``B[d] = [Wb, Rb]`` and gate blocks of H
rows in ONNX order (LSTM i, o, f, c; GRU z, r, h):

    LSTM  i = s(x Wi' + h Ri' + Pi c + b_i)   f = s(x Wf' + h Rf' + Pf c + b_f)
          c' = f c + i tanh(x Wc' + h Rc' + b_c)   o = s(x Wo' + h Ro' + Po c' + b_o)
          h' = o tanh(c')
    GRU   z = s(x Wz' + h Rz' + b_z)   r = s(x Wr' + h Rr' + b_r)
          n = tanh(x Wh' + (r h) Rh' + Rbh + Wbh)     (linear_before_reset = 0)
          n = tanh(x Wh' + r (h Rh' + Rbh) + Wbh)     (linear_before_reset = 1)
          h' = (1 - z) n + z h
    RNN   h' = tanh(x Wi' + h Ri' + Wbi + Rbi)

(s: sigmoid; b_g = Wb_g + Rb_g). The input projection ``x W' + Wb`` is computed for all
steps at once; the recurrence loops over time (backwards for ``reverse`` and for the
second direction of ``bidirectional``). With ``sequence_lens`` a batch row stops at its
length: its state stays, its Y rows beyond the length are 0. ``layout = 1`` (batch
first) is transposed in and out. Only the default activations are run; other
activations, ``clip`` and ``input_forget`` are refused when the module is built.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops import Node, register

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
_ACTIVATIONS = {"LSTM": ["sigmoid", "tanh", "tanh"], "GRU": ["sigmoid", "tanh"], "RNN": ["tanh"]}
_DIRECTIONS = ("forward", "reverse", "bidirectional")


def _check(node: Node) -> None:
    direction = node.attr("direction", "forward")
    if direction not in _DIRECTIONS:
        raise node.fail(f"direction '{direction}' is not one of {_DIRECTIONS}")
    default = _ACTIVATIONS[node.op_type] * (2 if direction == "bidirectional" else 1)
    acts = node.attr("activations")
    if acts is not None and [a.lower() for a in acts] != default:
        raise node.fail(f"activations {acts} are not supported; the torch backend runs the "
                        f"default activations {default} only")
    if node.attr("clip") is not None:
        raise node.fail("clip is not supported; export the recurrent layer without clipping")
    if node.attr("input_forget", 0):
        raise node.fail("input_forget = 1 is not supported; export with input_forget = 0")


def _lstm_cell(gx, h, c, r, rb, p):
    gates = gx + F.linear(h, r, rb)
    i, o, f, g = gates.chunk(4, dim=-1)
    if p is not None:
        pi, po, pf = p.chunk(3)
        i, f = i + pi * c, f + pf * c
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    if p is not None:
        o = o + po * c
    return torch.sigmoid(o) * torch.tanh(c), c


def _gru_cell(gx, h, r, rb, linear_before_reset: bool):
    hidden = h.shape[-1]
    rb_zr, rb_h = (None, None) if rb is None else (rb[:2 * hidden], rb[2 * hidden:])
    z, reset = torch.sigmoid(gx[:, :2 * hidden] + F.linear(h, r[:2 * hidden], rb_zr)).chunk(2, -1)
    if linear_before_reset:
        n = torch.tanh(gx[:, 2 * hidden:] + reset * F.linear(h, r[2 * hidden:], rb_h))
    else:
        n = torch.tanh(gx[:, 2 * hidden:] + F.linear(reset * h, r[2 * hidden:], rb_h))
    return (1 - z) * n + z * h


def _direction(node: Node, gx, r, rb, h, c, p, lengths, reverse: bool):
    """One direction over all steps: (Y (seq, batch, H), last h, last c)."""
    steps = range(gx.shape[0] - 1, -1, -1) if reverse else range(gx.shape[0])
    ys = [None] * gx.shape[0]
    for t in steps:
        if node.op_type == "LSTM":
            h_new, c_new = _lstm_cell(gx[t], h, c, r, rb, p)
        elif node.op_type == "GRU":
            h_new, c_new = _gru_cell(gx[t], h, r, rb, node.attr("linear_before_reset", 0)), c
        else:
            h_new, c_new = torch.tanh(gx[t] + F.linear(h, r, rb)), c
        if lengths is None:
            h, c, ys[t] = h_new, c_new, h_new
        else:
            live = (t < lengths)[:, None]
            h, c = torch.where(live, h_new, h), torch.where(live, c_new, c)
            ys[t] = torch.where(live, h_new, torch.zeros_like(h_new))
    return torch.stack(ys), h, c


def recurrent(node: Node, x, w, r, b=None, seq_lens=None, h0=None, c0=None, p=None):
    layout = node.attr("layout", 0)
    if layout:
        x = x.transpose(0, 1)
        h0 = None if h0 is None else h0.transpose(0, 1)
        c0 = None if c0 is None else c0.transpose(0, 1)
    batch, hidden = x.shape[1], r.shape[-1]
    width = GATES[node.op_type] * hidden
    lengths = None if seq_lens is None else seq_lens.to(device=x.device, dtype=torch.int64)
    zeros = x.new_zeros(batch, hidden)
    ys, hs, cs = [], [], []
    for d in range(w.shape[0]):
        wb, rb = (None, None) if b is None else (b[d, :width], b[d, width:])
        gx = F.linear(x, w[d], wb)
        reverse = d == 1 or node.attr("direction", "forward") == "reverse"
        y, h, c = _direction(node, gx, r[d], rb, zeros if h0 is None else h0[d],
                             zeros if c0 is None else c0[d], None if p is None else p[d],
                             lengths, reverse)
        ys.append(y), hs.append(h), cs.append(c)
    y, y_h, y_c = torch.stack(ys, 1), torch.stack(hs), torch.stack(cs)
    if layout:
        y, y_h, y_c = y.permute(2, 0, 1, 3), y_h.transpose(0, 1), y_c.transpose(0, 1)
    return (y, y_h, y_c) if node.op_type == "LSTM" else (y, y_h)


register("LSTM", "GRU", "RNN", check=_check)(recurrent)
