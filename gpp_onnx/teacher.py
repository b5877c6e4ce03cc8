"""The original model as teacher: what each of its outputs is, its outputs per batch, and
how closely another model follows them (fidelity).

Output kinds. An output is a *class* output when it holds class scores, K >= 2 of them
along a class axis: the probabilities / log-probabilities of a Softmax / LogSoftmax over
any axis but the batch's (then the student's loss reads that node's input, the logits; a
(N, T, K) Softmax over K is a class distribution at each of T positions, as a CTC text
recognizer's), or the model's first output when it is (N, K) (a classifier's logits, the
convention the rest of gpp-onnx follows). An output of a Sigmoid is a *binary* output:
independent probabilities (a text detector's probability map, multi-label scores), whose
loss reads the Sigmoid's input, the logits (a Sigmoid output is binary whatever its
shape). An output of integer or boolean values (an ArgMax's class index, a count) is
*discrete*: no loss can follow it, so training leaves it out, and its fidelity is the
fraction of its values equal to the original's. Every other output (boxes, embeddings, raw
scores) is a *regression* output.

Distillation targets are the teacher's outputs on the very batch being trained on,
computed by onnxruntime when the batch is drawn (:meth:`Teacher.with_targets`); nothing
holds them for the whole data set.

Fidelity of a model m to the original t on inputs X, per output o:

    relative error   e_o = sqrt( sum_X ||m_o(x) - t_o(x)||^2 / sum_X ||t_o(x)||^2 )
    top-1 agreement  a_o = mean_X [ argmax_k m_o(x)_k == argmax_k t_o(x)_k ]   (class outputs)
    agreement        mean over X and elements of [ m_o(x) == t_o(x) ]   (discrete outputs alone)

(argmax along the class axis; with several positions, the mean over x and positions,
wherever the batch axis lies), accumulated batch by batch (memory bounded by the batch).
The original against itself is e = 0, a = 1.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from .batching import feeds, padded, part, row_input, rows
from .compat import opset_version
from .errors import DataError
from .ops.base import attr
from .verify import make_session, outputs

logger = logging.getLogger(__name__)

CLASS, BINARY, REGRESSION, DISCRETE = "class", "binary", "regression", "discrete"
_FORMS = {"Softmax": "probs", "LogSoftmax": "logprobs"}


@dataclass(frozen=True)
class OutputKind:
    name: str        # the graph output
    kind: str        # CLASS | BINARY | REGRESSION | DISCRETE
    logits: str      # the value a student's loss reads (a Softmax's / Sigmoid's input,
    #                  else the output)
    form: str        # what the output holds: logits | probs | logprobs | values
    axis: int = 1    # the class axis (class outputs)


def output_kinds(analysis) -> tuple[OutputKind, ...]:
    """Each graph output of the analysed model with its kind (module docstring)."""
    view, kinds = analysis.view, []
    for i, name in enumerate(view.output_names):
        shape, last = view.shape(name), view.producer.get(name)
        node = behind_copies(view, last)
        logits = None if node is None else analysis.rules[node.name].logits_input(node)
        axis = None if shape is None else (
            _softmax_axis(node, shape, opset_version(view.model)) if logits is not None
            else 1 if i == 0 and len(shape) == 2 else None)
        moved = _moved_log_softmax_axis(view, last, shape)
        if not view.is_float(name):
            kinds.append(OutputKind(name, DISCRETE, name, "values"))
        elif moved is not None:
            kinds.append(OutputKind(name, CLASS, name, "logits", moved))
        elif node is not None and node.op_type == "Sigmoid":
            kinds.append(OutputKind(name, BINARY, node.input[0], "probs"))
        elif axis is not None and isinstance(shape[axis], int) and shape[axis] >= 2:
            form = _FORMS.get(node.op_type, "logits") if logits is not None else "logits"
            kinds.append(OutputKind(name, CLASS, logits or name, form, axis))
        else:
            kinds.append(OutputKind(name, REGRESSION, name, "values"))
    return tuple(kinds)


def behind_copies(view, node):
    """`node`, or where it is an Identity or a float Cast (tf2onnx ends its outputs in an
    Identity), the first node in front of such copies: a Softmax behind one was read as
    logits (distillation and the fisher criterion on softmax(probabilities))."""
    while node is not None and (node.op_type == "Identity" or (
            node.op_type == "Cast" and view.is_float(node.output[0]))):
        inner = view.producer.get(node.input[0])
        if inner is None:
            break
        node = inner
    return node


def trainable(kinds: Iterable[OutputKind]) -> tuple[OutputKind, ...]:
    """The outputs a loss can follow (all but the discrete ones); DataError if none is."""
    kept = tuple(k for k in kinds if k.kind != DISCRETE)
    if not kept:
        names = ", ".join(k.name for k in kinds)
        raise DataError(f"every output of the model ({names}) holds integers, which no "
                        "training loss can follow - export the model with its scores or "
                        "logits as an output, or prune it without --data (magnitude criteria)")
    return kept


def _moved_log_softmax_axis(view, node, shape) -> int | None:
    """The class axis of an output that is a LogSoftmax's log-probabilities moved by a
    Transpose (a batch-first recognizer's (N, T, K) made time-major (T, N, K) for CTC), or
    None. The output itself is then read as logits: log_softmax(log p) = log p."""
    if node is None or node.op_type != "Transpose" or shape is None:
        return None
    inner = view.producer.get(node.input[0])
    inner_shape = None if inner is None else view.shape(inner.output[0])
    if inner is None or inner.op_type != "LogSoftmax" or inner_shape is None:
        return None
    axis = _softmax_axis(inner, inner_shape, opset_version(view.model))
    perm = attr(node, "perm", list(range(len(shape)))[::-1])
    if axis is None or axis not in perm:
        return None
    moved = list(perm).index(axis)
    return moved if moved >= 1 and isinstance(shape[moved], int) and shape[moved] >= 2 else None


def _softmax_axis(node, shape: tuple, opset: int) -> int | None:
    """The axis a Softmax / LogSoftmax normalises over, or None where that is the batch
    axis or (before opset 13, which flattens from ``axis`` on) not one axis alone."""
    rank = len(shape)
    axis = attr(node, "axis", -1 if opset >= 13 else 1)
    axis = axis + rank if axis < 0 else axis
    if axis < 1 or axis >= rank or (opset < 13 and axis != rank - 1):
        return None
    return axis


def describe(kinds: Iterable[OutputKind]) -> str:
    """The distillation loss per output, in words (log line and report)."""
    loss = {CLASS: "KL on the class distribution", BINARY: "KL on each probability",
            REGRESSION: "relative squared error", DISCRETE: "none (integer values)"}
    parts = [f"{k.name}: {loss[k.kind]}" for k in kinds]
    return "; ".join(parts)


class Teacher:
    """The original model in onnxruntime: its outputs for a batch of inputs."""

    def __init__(self, model, kinds: tuple[OutputKind, ...], where: str = "original model"):
        self.session = make_session(model, where)
        self.kinds = kinds
        self.names = [o.name for o in self.session.get_outputs()]

    def outputs(self, x) -> dict[str, np.ndarray]:
        """Its outputs by name for batch `x` (``gpp_onnx.batching``)."""
        return dict(zip(self.names, run_rows(self.session, x, "original model")))

    def with_targets(self, batches: Iterable[tuple[np.ndarray, np.ndarray | None]]
                     ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """(x, y) batches -> (x, targets): the teacher's outputs under ``target_key(name)``,
        and ``y`` (the labels) where the batch has them."""
        for x, y in batches:
            targets = {target_key(name): v for name, v in self.outputs(x).items()}
            if y is not None:
                targets["y"] = y
            yield x, targets


def target_key(output: str) -> str:
    """The key of an output's teacher values in a batch's targets: apart from the labels'
    ``"y"``, which an output may be named too."""
    return "teacher:" + output


def fidelity(teacher: Teacher, model, batches: Iterable[np.ndarray],
             where: str = "pruned model") -> dict[str, dict[str, float]]:
    """Per output: relative error and (class outputs) top-1 agreement of `model` with the
    teacher on `batches` of inputs (module docstring)."""
    session = make_session(model, where)
    names = [o.name for o in session.get_outputs()]
    missing = [k.name for k in teacher.kinds if k.name not in names]
    if missing:
        raise DataError(f"{where} has no output {missing[0]} of the original; compare models "
                        "with the same outputs")
    err = {k.name: 0.0 for k in teacher.kinds}
    ref = dict(err)
    agree = {k.name: [0, 0] for k in teacher.kinds}   # values (or positions) equal, compared
    for x in batches:
        got = dict(zip(names, run_rows(session, x, where)))
        want = teacher.outputs(x)
        for k in teacher.kinds:
            m, t = got[k.name], want[k.name]
            if m.shape != t.shape:
                raise DataError(f"{where}: output {k.name} has shape {m.shape} where the "
                                f"original's has {t.shape}; compare models with the same outputs")
            if k.kind in (CLASS, DISCRETE):
                same = m.argmax(k.axis) == t.argmax(k.axis) if k.kind == CLASS else m == t
                agree[k.name][0] += int(same.sum())
                agree[k.name][1] += same.size
            if k.kind != DISCRETE:
                m, t = m.astype(np.float64), t.astype(np.float64)
                err[k.name] += float(((m - t) ** 2).sum())
                ref[k.name] += float((t ** 2).sum())
    return {k.name: _row(k, err[k.name], ref[k.name], *agree[k.name]) for k in teacher.kinds}


def run_rows(session, x, where: str) -> list[np.ndarray]:
    """The session's outputs for the rows of batch `x` (``batching``); a model with a fixed
    batch size b runs them in chunks of b (the last one zero-padded), each output's chunks
    cut and joined along its batch axis: its first axis of size b (a time-major (T, b, K)
    output's axis 1), else axis 0."""
    spec = row_input(session.get_inputs(), x)
    fixed, n = spec.shape[0] if spec.shape else None, rows(x)
    if not isinstance(fixed, int) or fixed < 1 or fixed == n:
        return outputs(session, feeds(x, spec.name), where)
    parts, axes = [], None
    for start in range(0, n, fixed):
        chunk = part(x, slice(start, start + fixed))
        got = outputs(session, feeds(padded(chunk, fixed), spec.name), where)
        axes = axes or [next((a for a, d in enumerate(g.shape) if d == fixed), 0) for g in got]
        parts.append([np.take(g, np.arange(rows(chunk)), a) for g, a in zip(got, axes)])
    return [np.concatenate(p, a) for p, a in zip(zip(*parts), axes)]


def _row(kind: OutputKind, err: float, ref: float, equal: int, compared: int) -> dict:
    share = equal / compared if compared else 1.0
    if kind.kind == DISCRETE:
        return {"agreement": share}
    row = {"relative_error": float(np.sqrt(err / max(ref, 1e-30)))}
    if kind.kind == CLASS:
        row["top1_agreement"] = share
    return row


def identical_rows(rows: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The original's fidelity to itself, with the measures of `rows`: error 0, agreement 1."""
    return {out: {m: 0.0 if m == "relative_error" else 1.0 for m in row}
            for out, row in rows.items()}
