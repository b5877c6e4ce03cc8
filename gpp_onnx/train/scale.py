"""Steps for the layers that read the model input in its raw scale.

A Conv / ConvTranspose / Gemm / MatMul whose data input comes from the model input through
parameter-free ops only (data movement: Slice, Concat, Transpose, pools, ... :data:`MOVES`;
or arithmetic with a constant: ``x - mean``, ``x / 255``) sees the values the data feeds it,
however the preprocessing left them. A model fed pixels in 0..255 (no normalisation in the
graph: ``--mean 0 --std 0.0039``) gives such a layer inputs of RMS r ~ 100-150. The
gradient along its weights grows with r, and the loss's curvature along them with r^2, over
a unit-scale input: a learning rate that suits every other layer moves the loss there by
orders of magnitude more than the gradient predicts. Measured on ddddocr's detector (a
YOLOX whose first conv reads 0..255 pixels, r = 144) after a 50% cut and the repair: one
plain step of lr 1e-5 along the full gradient *raised* the distillation loss by 1.5% where
it predicted a 3% fall; the same step without that one weight fell as predicted, and
fine-tuning at lr 0.001 took the held-out relative error from 0.17 to 0.23.

:func:`input_layers` finds those layers; the trainer measures the RMS r of each one's data
input on the first batch (every rank's share together) and, where r is above
:data:`RMS_LIMIT`, divides that weight's gradient by r^2: the SGD step of the same model
with that input scaled to unit RMS and the weight scaled by r (the function unchanged).
Inputs normalised to about unit scale (mean / std, ``x / 255``, outside the graph or in
it) are left as they are.
"""
from __future__ import annotations

RMS_LIMIT = 4.0     # an input RMS above this is a raw scale (pixels in 0..255: ~100)

# ops whose output holds values of their data input (moved, selected, repeated or averaged)
MOVES = frozenset({
    "Identity", "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Slice",
    "Split", "Concat", "Gather", "Expand", "Tile", "Pad", "Resize", "Upsample",
    "SpaceToDepth", "DepthToSpace", "MaxPool", "AveragePool", "GlobalMaxPool",
    "GlobalAveragePool"})
ARITHMETIC = frozenset({"Add", "Sub", "Mul", "Div"})    # with a constant: still the input
LAYERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def input_layers(module) -> list[tuple[str, str]]:
    """(weight, data input) ONNX names of the layers whose data input comes from the
    model's inputs (each, for a model with several) through parameter-free ops only
    (module docstring), in graph order; only trainable weights."""
    params = {name for name, _ in module.named_onnx_parameters()}
    constants = set(module.constant_names)
    raw = set(module.input_names)
    found: list[tuple[str, str]] = []
    for node in module.nodes:
        if node.op_type in ARITHMETIC:
            # one operand from the input, the other a constant (not a trained weight)
            ins = [name for name in node.inputs if name]
            if (len(ins) == 2 and any(name in raw for name in ins)
                    and all(name in raw or name in constants for name in ins)):
                raw.update(name for name in node.outputs if name)
            continue
        # the data inputs: every input of a Concat, the first of the others (the rest are
        # indices, shapes, pads)
        data = [name for name in (node.inputs if node.op_type == "Concat" else node.inputs[:1])
                if name]
        if node.op_type in MOVES and data and all(name in raw for name in data):
            raw.update(name for name in node.outputs if name)
        elif node.op_type in LAYERS and node.inputs and node.inputs[0] in raw:
            weight = node.inputs[1] if len(node.inputs) > 1 else ""
            if weight in params and all(weight != w for w, _ in found):
                found.append((weight, node.inputs[0]))
    return found
