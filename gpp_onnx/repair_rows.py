"""The rows of the least-squares repair's problems (``repair.reconstruct``): a layer's
input and output at the sampled positions, gathered without unfolding whole maps.

A Conv's row is the patch its kernel reads at one output position (channel-major, as
``F.unfold`` orders it); a ConvTranspose's, the patch of the equivalent stride-1 Conv over
its stride-spread input (``as_conv_weight``); a Gemm's, its input row as it is.
"""
from __future__ import annotations

import numpy as np

from .ops.base import attr
from .ops.conv import torch_pads


def _pick(flat, positions):
    """Rows (B*p, C) of ``flat`` (B, C, L) at positions (B, p) along L."""
    import torch

    idx = torch.as_tensor(positions, device=flat.device)
    picked = torch.gather(flat, 2, idx[:, None, :].expand(-1, flat.shape[1], -1))
    return picked.permute(0, 2, 1).reshape(-1, flat.shape[1])


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _patches(padded, positions, kernel, stride, dilation):
    """Rows (B*p, C*kh*kw) of the patches a 2-D convolution of `padded` (B, C, H, W) reads
    at output positions (B, p), flattened along its output width; channel-major within a
    row, as ``F.unfold`` orders them. Only the sampled positions are gathered."""
    import torch

    (kh, kw), (sh, sw), (dh, dw) = kernel, _pair(stride), _pair(dilation)
    b, c = padded.shape[:2]
    out_w = (padded.shape[3] - dw * (kw - 1) - 1) // sw + 1
    dev = padded.device
    pos = torch.as_tensor(positions, device=dev)
    ys = (pos // out_w)[:, :, None, None] * sh + dh * torch.arange(kh, device=dev)[:, None]
    xs = (pos % out_w)[:, :, None, None] * sw + dw * torch.arange(kw, device=dev)
    img = torch.arange(b, device=dev)[:, None, None, None]
    patches = padded.permute(0, 2, 3, 1)[img, ys, xs]              # (B, p, kh, kw, C)
    return patches.permute(0, 1, 4, 2, 3).reshape(-1, c * kh * kw)


def _rows_conv(node, x, w_shape, positions):
    """Patch rows (B*p, C*kh*kw) of conv input x at the given output positions (B, p)."""
    import torch.nn.functional as F

    return _patches(F.pad(x, torch_pads(node, 2)), positions, tuple(w_shape[2:]),
                    attr(node, "strides", 1), attr(node, "dilations", 1))


def as_conv_weight(w: np.ndarray) -> np.ndarray:
    """A ConvTranspose weight (C, O, kh, kw) as the weight of the equivalent Conv over the
    stride-spread input, (O, C, kh, kw) with the kernel flipped; its own inverse."""
    return np.ascontiguousarray(np.flip(w, (2, 3)).transpose(1, 0, 2, 3))


def _rows_conv_transpose(node, x, w_shape, positions):
    """Patch rows (B*p, C*kh*kw) of a ConvTranspose's input at output positions (B, p): the
    input spread by the strides (zeros between), padded by the kernel's reach less the
    pads (plus output_padding at the end), read like a stride-1 Conv with dilation d."""
    import torch.nn.functional as F

    (sh, sw), (dh, dw) = _pair(attr(node, "strides", 1)), _pair(attr(node, "dilations", 1))
    top, left, bottom, right = attr(node, "pads", [0] * 4)
    oh, ow = attr(node, "output_padding", [0, 0])
    kh, kw = w_shape[2:]
    b, c, h, w = x.shape
    spread = x.new_zeros((b, c, (h - 1) * sh + 1, (w - 1) * sw + 1))
    spread[:, :, ::sh, ::sw] = x
    padded = F.pad(spread, (dw * (kw - 1) - left, dw * (kw - 1) - right + ow,
                            dh * (kh - 1) - top, dh * (kh - 1) - bottom + oh))
    return _patches(padded, positions, (kh, kw), 1, (dh, dw))


def rows_out(y, positions):
    """Rows (B*p, O) of a layer output at the sampled positions (a Gemm's output as is)."""
    return y if y.dim() == 2 else _pick(y.flatten(2), positions)


def input_rows(node, inputs, pos: np.ndarray, batch_size: int, w_shape: tuple,
                kept_in: np.ndarray) -> np.ndarray:
    """The rows of the layer's least-squares problem: its input (one tensor per batch of
    `batch_size` images, from `inputs`) at the sampled positions `pos`, kept input
    channels only; (rows, kept channels x kernel size) in float64."""
    import torch

    conv = node.op_type in ("Conv", "ConvTranspose")
    gather = _rows_conv_transpose if node.op_type == "ConvTranspose" else _rows_conv
    k = int(np.prod(w_shape[2:])) if conv else 1
    parts = []
    with torch.no_grad():
        for i, v in enumerate(inputs):
            keep = torch.as_tensor(kept_in, device=v.device)
            if conv:
                rows = gather(node, v, w_shape, pos[i * batch_size:i * batch_size + len(v)])
                rows = rows.reshape(rows.shape[0], v.shape[1], k)[:, keep].reshape(
                    rows.shape[0], -1)
            else:
                rows = v.reshape(v.shape[0], -1)[:, keep]
            parts.append(rows.double().cpu())
    return torch.cat(parts).numpy()
