"""Steps for the layers that read the model input in its raw scale.

A Conv / ConvTranspose / Gemm / MatMul whose data input is the model input itself, reached
through data-movement ops only (Slice, Concat, Transpose, pools, ...: :data:`MOVES`), sees
the values the data feeds it. A model fed pixels in 0..255 (no normalisation in the graph:
``--mean 0 --std 0.0039``) gives such a layer inputs of RMS r ~ 100-150. The gradient along
its weights grows with r, and the loss's curvature along them with r^2, over a unit-scale
input: a learning rate that suits every other layer moves the loss there by orders of
magnitude more than the gradient predicts. Measured on ddddocr's detector (a YOLOX whose
first conv reads 0..255 pixels, r = 144) after a 50% cut and the repair: one plain step of
lr 1e-5 along the full gradient *raised* the distillation loss by 1.5% where it predicted a
3% fall; the same step without that one weight fell as predicted, and fine-tuning at
lr 0.001 took the held-out relative error from 0.17 to 0.23.

:func:`input_weights` finds those weights; the trainer divides their gradients by r^2 when
the input's RMS r (first batch, every rank's share together) is above
:data:`RMS_LIMIT`: the SGD step of the same model with its input scaled to unit RMS and
those weights scaled by r (the function unchanged). Inputs normalised to about unit scale
(mean / std, ``x / 255``) are left as they are.
"""
from __future__ import annotations

RMS_LIMIT = 4.0     # an input RMS above this is a raw scale (pixels in 0..255: ~100)

# ops whose output holds values of their data input (moved, selected, repeated or averaged)
MOVES = frozenset({
    "Identity", "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Slice",
    "Split", "Concat", "Gather", "Expand", "Tile", "Pad", "Resize", "Upsample",
    "SpaceToDepth", "DepthToSpace", "MaxPool", "AveragePool", "GlobalMaxPool",
    "GlobalAveragePool"})
LAYERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def input_weights(module) -> list[str]:
    """ONNX names of the trainable weights of the layers whose data input is the model
    input moved by :data:`MOVES` only (module docstring), in graph order."""
    params = {name for name, _ in module.named_onnx_parameters()}
    raw = set(module.input_names)
    found: list[str] = []
    for node in module.nodes:
        # the data inputs: every input of a Concat, the first of the others (the rest are
        # indices, shapes, pads)
        data = [name for name in (node.inputs if node.op_type == "Concat" else node.inputs[:1])
                if name]
        if node.op_type in MOVES and data and all(name in raw for name in data):
            raw.update(name for name in node.outputs if name)
        elif node.op_type in LAYERS and node.inputs and node.inputs[0] in raw:
            weight = node.inputs[1] if len(node.inputs) > 1 else ""
            if weight in params and weight not in found:
                found.append(weight)
    return found
