"""Repair after the cut: fold the removed channels' mean contribution into biases.

Exported graphs usually have BatchNorm folded into the convs, so nothing re-centres a
layer whose inputs lost channels. A consumer's output o receives ``sum_c W[o, c] * x_c``;
replacing a removed ``x_c`` by its mean ``m_c`` over the data keeps that term on average:
``b[o] += sum_{c removed} m_c * (the part of W that reads c, summed over what c spans)``.
Each consumer's rule states its exact form (``OpRule.bias_delta``: Conv exact at padded
borders, ConvTranspose, Gemm with ``alpha / beta``); MatMul consumers have no bias and
are left as they are.

``m_c`` is the mean of the consumer's input over images and all non-channel axes (for a
Gemm after Flatten, per feature).

Least-squares reconstruction (``reconstruct``, the default ``--repair lsq``) goes one step
further, in the spirit of channel-pruning reconstruction (He et al. 2017, ThiNet): the
layers are visited in topological order, and every Conv and ConvTranspose (group 1) and
Gemm from the first consumer of a removed channel on gets new weights and bias fitted so
that its output on the *pruned* network's inputs matches the *original* network's output
on the data (a ConvTranspose as the stride-1 Conv of its stride-spread input with the
flipped kernel, ``repair_rows.as_conv_weight``):

    min over W', b'   sum_rows || x_kept W' + b' - y ||^2 + lam || W' - W_kept ||^2

(rows: images x sampled output positions; x_kept: the kept input channels' patch
columns; y: the original pre-activation output). The ridge pulls towards the original
weights, so with few rows the fit stays close to them; lam is chosen per layer on held-out
images from ``lam = s * tr(G) / dim`` for s in 1e-4 .. 10 (G the centred Gram matrix): the
largest lam within 5% of the best held-out error, and a fit that does not beat the mean
repair on the held-out images is not used. Later layers see the already repaired earlier
ones, so errors do not pile up. Layers with more than ``max_dim`` weight columns (e.g. a
25088-input FC) keep the mean repair. The refit can grow weights a lot where few channels
are left (an FC over 24 pooled features: largest weight 1.3 -> 52); fine-tuning clips
gradient norms for that reason.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx

from . import batch
from .batching import feeds, rows as batch_rows, tensors
from .ops import ROLE_IN
from .ops.base import attr
from .repair_rows import as_conv_weight, input_rows, rows_out
from .teacher import run_rows
from .verify import make_session

logger = logging.getLogger(__name__)


def channel_means(model: onnx.ModelProto, values: dict[str, int], batches) -> dict[str, np.ndarray]:
    """Mean of each value along its channel axis (`values`: name -> axis) over `batches`
    (run in chunks of the model's batch size where its input fixes one)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    known = {o.name for o in exposed.graph.output}
    exposed.graph.output.extend(onnx.ValueInfoProto(name=v) for v in values if v not in known)
    session = make_session(exposed, "mean probe")
    names = list(values)
    sums: dict[str, np.ndarray] = {}
    count = 0
    for x in batches:
        got = run_rows(session, x, "mean probe")
        by_name = dict(zip([o.name for o in session.get_outputs()], got))
        for name in names:
            v = np.moveaxis(by_name[name].astype(np.float64), values[name], 0)
            sums[name] = sums.get(name, 0) + v.reshape(v.shape[0], -1).mean(axis=1) * batch_rows(x)
        count += batch_rows(x)
    return {name: sums[name] / max(count, 1) for name in names}


def probe_batch(view, values, size: int) -> int:
    """Images per run of the mean probe: fewer than `size` where the maps it exposes
    (twice: onnxruntime's copy and the returned one) would pass BATCH_BYTES a batch (a
    320-px U-Net's 25 maps, for a batch of 36)."""
    per_image = 2 * sum(_image_bytes(view)(v) for v in values)
    return batch.within(view.model, size, per_image, BATCH_BYTES)


def values_to_measure(analysis, kept) -> dict[str, int]:
    return {p.value: analysis.axes[p.value] for p in analysis.params
            if p.role == ROLE_IN and p.value in kept}


def bias_deltas(analysis, kept: dict[str, np.ndarray],
                means: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Bias change of every consumer (original output indexing) for the removed inputs."""
    nodes = {n.name: n for n in analysis.view.nodes}
    deltas: dict[str, np.ndarray] = {}
    for p in analysis.params:
        if p.role != ROLE_IN or p.value not in kept or p.value not in means:
            continue
        width = len(means[p.value])
        removed = np.setdiff1d(np.arange(width), kept[p.value])
        node = nodes[p.node]
        delta = None if len(removed) == 0 else analysis.rules[node.name].bias_delta(
            node, analysis.view.const(p.param), removed, means[p.value][removed], p,
            analysis.view.shape(p.value))
        if delta is None:
            logger.debug("no bias repair for %s (%s)", node.name, node.op_type)
            continue
        deltas[node.name] = deltas.get(node.name, 0) + delta
    return deltas


LAMBDA_SCALES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # increasing: later = closer to W
STAGED_BYTES = 1 << 30  # keep the pruned net's live activations for all images up to this
BATCH_BYTES = 1 << 29   # one batch's activations (live, and the layers' outputs kept) at most


def _image_bytes(view):
    """float32 bytes of one image's slice of a value (0 where the shape is unknown)."""
    def size_of(name: str) -> int:
        shape = view.shape(name)
        return 4 * int(np.prod(shape[1:])) if shape else 0
    return size_of
ERROR_SLACK = 1.05   # accept up to 5% more held-out error for a stronger ridge


def _fit_nodes(analysis, kept) -> list:
    """Nodes whose rule says they can be refitted (Conv, ConvTranspose: group 1, 2-D,
    explicit pads; Gemm: transA 0) from the first consumer of a removed channel on, in
    topological order."""
    consumers = {p.node for p in analysis.params if p.role == ROLE_IN and p.value in kept}
    nodes, started = [], False
    for node in analysis.view.nodes:
        started = started or node.name in consumers
        if not started or not analysis.rules[node.name].refittable(node, analysis.view):
            continue
        if analysis.view.const(node.input[1]).size:
            nodes.append(node)
    return nodes


class _Moments:
    """Row count, sums and cross products of (a, y) rows: enough for any centred ridge fit."""

    def __init__(self, a, y):
        self.n, self.sa, self.sy = len(a), a.sum(axis=0), y.sum(axis=0)
        self.aa, self.ay = a.T @ a, a.T @ y

    def __add__(self, other):
        out = object.__new__(_Moments)
        out.n, out.sa, out.sy = self.n + other.n, self.sa + other.sa, self.sy + other.sy
        out.aa, out.ay = self.aa + other.aa, self.ay + other.ay
        return out

    def centred(self):
        am, ym = self.sa / self.n, self.sy / self.n
        g = self.aa - self.n * np.outer(am, am)
        r = self.ay - self.n * np.outer(am, ym)
        return am, ym, g, r


def _ridge(a, y, theta0, train, test):
    """Ridge regression towards theta0 (lam picked on held-out rows); (theta, bias, gain).

    gain = held-out error of the mean-only fit (theta0 with a refitted bias) divided by
    that of the chosen fit (> 1: the fit helps). One pass over the rows builds the
    moments of both parts; the final fit on all rows reuses them."""
    fit_part, test_part = _Moments(a[train], y[train]), _Moments(a[test], y[test])
    am, ym, g, r = fit_part.centred()
    s, v = np.linalg.eigh(g)
    scale = max(np.trace(g) / len(g), 1e-12)
    fits = []
    for lam in LAMBDA_SCALES:
        lam_abs = lam * scale
        theta = v @ ((v.T @ (r + lam_abs * theta0)) / (np.maximum(s, 0) + lam_abs)[:, None])
        fits.append((theta, ym - am @ theta))

    def error(theta, bias):
        return float(((a[test] @ theta + bias - y[test]) ** 2).sum())

    errors = np.array([error(t, b) for t, b in fits])
    # the strongest ridge (closest to the original weights) within ERROR_SLACK of the best
    best = max(i for i in range(len(fits)) if errors[i] <= ERROR_SLACK * errors.min())
    base = error(theta0, (y[train] - a[train] @ theta0).mean(axis=0))
    am, ym, g, r = (fit_part + test_part).centred()
    lam_abs = LAMBDA_SCALES[best] * max(np.trace(g) / len(g), 1e-12)
    theta = np.linalg.solve(g + lam_abs * np.eye(len(g)), r + lam_abs * theta0)
    return theta, ym - am @ theta, base / max(errors[best], 1e-30)


def _sample_positions(view, nodes, n_img: int, rows: int, rng) -> dict:
    """node -> (the output positions sampled for each image, (N, p), or None for a 2-D
    output; the image of each row): about `rows` rows per layer."""
    plans = {}
    for node in nodes:
        shape = view.shape(node.output[0])
        if len(shape) == 4:
            count = int(np.prod(shape[2:]))
            p = min(count, max(1, -(-rows // n_img)))
            pos = np.stack([rng.choice(count, p, replace=False) for _ in range(n_img)])
        else:
            pos, p = None, 1
        plans[node.name] = (pos, np.repeat(np.arange(n_img), p))
    return plans


def _batch_size(view, work, nodes, size: int) -> int:
    """Images per pass of the refit: fewer than `size` where a batch would hold more than
    BATCH_BYTES (the target pass keeps every fitted layer's whole output for its batch)."""
    size_of = _image_bytes(view)
    per_image = work.peak_live(size_of) + sum(size_of(n.output[0]) for n in nodes)
    return batch.within(view.model, size, per_image, BATCH_BYTES)


def _target_rows(original, input_name: str, nodes, plans: dict, batches) -> dict[str, list]:
    """node -> the original network's output rows at the sampled positions, per batch."""
    import torch

    targets: dict[str, list] = {n.name: [] for n in nodes}
    with torch.no_grad():
        for start, x in batches:
            out = original.run(feeds(x, input_name), [n.output[0] for n in nodes])
            for node in nodes:
                pos = plans[node.name][0]
                sl = None if pos is None else pos[start:start + batch_rows(x)]
                targets[node.name].append(rows_out(out[node.output[0]], sl).float().cpu())
    return targets


def _refit(node, w: np.ndarray, kept_in: np.ndarray, max_dim: int, rows_of, y: np.ndarray,
           train: np.ndarray, test: np.ndarray):
    """The ridge fit of one layer (module docstring): its weight `w` (float64, the node's
    own layout) restricted to the kept input channels, refitted to the targets `y` on the
    rows ``rows_of(conv weight shape)``. Returns (new weight in the node's layout, output
    bias, Gemm beta), or None where the layer keeps the mean repair (too many columns, a
    non-finite fit, or no held-out gain)."""
    transposed = node.op_type == "ConvTranspose"
    w = as_conv_weight(w) if transposed else w                    # (O, C, kh, kw) for both
    conv = node.op_type in ("Conv", "ConvTranspose")
    alpha = 1.0 if conv else float(attr(node, "alpha", 1.0))
    beta = 1.0 if conv else float(attr(node, "beta", 1.0))
    trans_b = bool(attr(node, "transB", 0))
    k = int(np.prod(w.shape[2:])) if conv else 1
    cols = (kept_in[:, None] * k + np.arange(k)).ravel()
    if len(cols) > max_dim:
        logger.debug("repair: %s keeps the mean repair (%d columns)", node.name, len(cols))
        return None
    if conv:
        flat = w.reshape(w.shape[0], -1)                          # (O, C*k)
    else:
        flat = w if trans_b else w.T                              # (N_out, K)
    theta0 = alpha * flat[:, cols].T                              # (cols, O)
    theta, bias, gain = _ridge(rows_of(w.shape), y, theta0, train, test)
    if not np.all(np.isfinite(theta)) or gain <= 1.0:
        return None
    new_flat = np.zeros_like(flat)
    new_flat[:, cols] = theta.T / alpha
    new_w = new_flat.reshape(w.shape) if conv else (new_flat if trans_b else new_flat.T)
    return (as_conv_weight(new_w) if transposed else new_w), bias, beta


class _Batches:
    """The repair images in batches of `size` on `device` (iterating gives (start, x)), and
    the pruned net's values on them (``values``): one staged pass of `work` per batch when
    its activations fit in memory (each layer's inputs then come from the already
    refitted layers before it), else a fresh pass up to each value asked for."""

    def __init__(self, work, view, images, size: int, device):
        self.work, self.images, self.size, self.device = work, images, size, device
        self.input_name = view.input_names[0]
        self.steppers = None
        if work.peak_live(_image_bytes(view)) * len(images) <= STAGED_BYTES:
            self.steppers = [work.stepper(feeds(x, self.input_name)) for _, x in self]

    def __iter__(self):
        for start in range(0, len(self.images), self.size):
            yield start, tensors(self.images[start:start + self.size], self.device)

    def values(self, name: str):
        """`name`'s value on each batch, from `work` as it is now."""
        if self.steppers is not None:
            return (step.advance_to(name) for step in self.steppers)
        return (self.work.run(feeds(x, self.input_name), [name])[name] for _, x in self)


def _own_weights(masked: onnx.ModelProto) -> dict[str, tuple[str, str]]:
    """Node name -> (weight, bias) names in the masked model, for the nodes whose weight
    and bias no other node reads (a shared one cannot take one layer's fit)."""
    uses: dict[str, int] = {}
    for n in masked.graph.node:
        for name in n.input:
            uses[name] = uses.get(name, 0) + 1
    return {n.name: (n.input[1], n.input[2]) for n in masked.graph.node
            if len(n.input) > 2 and uses.get(n.input[1], 0) <= 1
            and uses.get(n.input[2], 0) <= 1}


def _apply(view, node, fit, w_param, b_param) -> tuple[np.ndarray, np.ndarray]:
    """Write one layer's fit (``_refit``: weight, bias, scale) into the working module's
    parameters; return the new weight and the change of the output bias for the cut."""
    import torch

    new_w, bias, beta = fit
    base = view.const(view.input(node, 2)) if view.input(node, 2) else None
    base_out = np.zeros(len(bias)) if base is None else beta * np.broadcast_to(
        base.reshape(-1) if base.size == len(bias) else base, (len(bias),))
    with torch.no_grad():
        w_param.copy_(torch.as_tensor(new_w, dtype=w_param.dtype))
        b_param.copy_(torch.as_tensor(bias / beta, dtype=b_param.dtype).view(b_param.shape))
    return new_w.astype(np.float32), bias - base_out


def reconstruct(analysis, kept: dict[str, np.ndarray], deltas: dict[str, np.ndarray],
                images, device="cpu", rows: int = 16384, max_dim: int = 4096,
                batch_size: int = 64, seed: int = 0):
    """Least-squares repair (see the module docstring).

    Returns ``(weights, deltas)``: (node, 1) -> new weight (original shape; removed input
    channels 0), and node -> output-bias change, both for ``surgery.cut`` / ``mask``."""
    import torch

    from . import surgery
    from .progress import track
    from .torch_backend import OnnxModule, resolve_device

    view = analysis.view
    nodes = _fit_nodes(analysis, kept)
    if not nodes or len(images) < 4:
        return {}, deltas
    given, deltas = set(deltas), dict(deltas)
    for node in nodes:  # every fitted node gets its own bias input in the masked model
        deltas.setdefault(node.name, np.zeros(view.shape(node.output[0])[1]))
    device = resolve_device(device)
    masked = surgery.mask(analysis, kept, deltas)
    fittable = _own_weights(masked)
    work = OnnxModule(masked, device=device).eval()
    batch_size = _batch_size(view, work, nodes, batch_size)
    original = OnnxModule(view.model, device=device).eval()
    rng = np.random.default_rng(seed)
    n_img = len(images)
    held_out = np.zeros(n_img, dtype=bool)
    held_out[rng.permutation(n_img)[: max(1, n_img // 5)]] = True

    plans = _sample_positions(view, nodes, n_img, rows, rng)

    data = _Batches(work, view, images, batch_size, device)
    targets = _target_rows(original, view.input_names[0], nodes, plans, iter(data))
    weights: dict[tuple[str, int], np.ndarray] = {}
    for node in track(nodes, "repairing", len(nodes), logger):
        if node.name not in fittable:
            continue
        w_param, b_param = (work.params[work.param_key(name)] for name in fittable[node.name])
        in_value = node.input[0]
        kept_in = kept.get(in_value, np.arange(view.shape(in_value)[1]))

        def rows_of(shape, in_value=in_value, kept_in=kept_in, node=node):
            return input_rows(node, data.values(in_value), plans[node.name][0], batch_size,
                              shape, kept_in)

        y = torch.cat(targets.pop(node.name)).double().numpy()
        img = plans[node.name][1]
        fit = _refit(node, w_param.detach().double().cpu().numpy(), kept_in, max_dim, rows_of,
                     y, np.flatnonzero(~held_out[img]), np.flatnonzero(held_out[img]))
        if fit is None:
            continue
        weights[(node.name, 1)], deltas[node.name] = _apply(view, node, fit, w_param, b_param)
    for node in nodes:  # the bias inputs added for the fit stay only where it was used
        if node.name not in given and (node.name, 1) not in weights:
            del deltas[node.name]
    logger.info("repair: refitted %d of %d layers on %d images", len(weights), len(nodes),
                n_img)
    return weights, deltas
