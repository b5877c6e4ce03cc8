"""The final hidden layer ("pre-decision space") of a classifier.

It is the input of the last linear classifier: walking back from the model's first
output through shape-only and monotone ops (Identity, Softmax, Flatten, Reshape, an Add
of a constant, ...: those whose rule says ``feature_pass``), the first Gemm or MatMul
with a constant weight (or a Conv with one whose output is 1x1: a conv classifier on the
pooled map); its input A is the feature tensor. A feature tensor with spatial dims is
average-pooled to one value per channel by the criteria that read it.
``--feature-tensor NAME`` overrides the search.
"""
from __future__ import annotations

from ..dense import aliases as dense_aliases
from ..errors import InputError
from ..model import opset_version
from ..ops import lookup


def final_hidden_layer(view, override: str | None = None) -> str:
    if override:
        override = dense_aliases(view.model).get(override, override)
        if (view.shape(override) is None or view.is_const(override)
                or override in {s.name for s in view.inputs}):
            raise InputError(f"--feature-tensor '{override}' is not a computed value of the "
                             "model - pick a name from 'gpp-onnx analyze' (group members)")
        return override
    opset = opset_version(view.model)
    value = view.output_names[0]
    node = view.producer.get(value)
    while node is not None and lookup(node, opset).feature_pass(node, view):
        value = next(i for i in node.input if i and not view.is_const(i))
        node = view.producer.get(value)
    if node is None or not _linear_classifier(view, node):
        what = "nothing" if node is None else \
            f"{node.op_type} node '{node.name}', value '{value}'"
        layer = _weighted_input(view, node)
        named = f" (e.g. '{layer}', the input of the layer that makes the class scores)" \
            if layer else ""
        raise InputError(f"the model's last layer is not a linear classifier (found {what}) - "
                         f"pass --feature-tensor NAME with the final hidden layer's value "
                         f"name{named}, or use a criterion that reads none (--criterion "
                         "taylor or l1)")
    return node.input[0]


def _linear_classifier(view, node) -> bool:
    """A Gemm or MatMul with a constant weight, or a Conv with one (Gluon's MobileNet: 1x1
    conv on the pooled 1x1 map, then Flatten) whose output has no spatial extent: each
    class score is then a linear function of the input's channels."""
    if len(node.input) < 2 or not view.is_const(node.input[1]):
        return False
    if node.op_type in ("Gemm", "MatMul"):
        return True
    shape = view.shape(node.output[0])
    return node.op_type == "Conv" and shape is not None and len(shape) > 2 \
        and all(d == 1 for d in shape[2:])


def _weighted_input(view, node, steps: int = 4) -> str | None:
    """The data input of the nearest layer with a constant weight (Conv, Gemm, MatMul) at
    most `steps` single-input nodes in front of `node`: a conv classifier's (SqueezeNet's
    1x1 conv -> Relu -> pool) features."""
    for _ in range(steps):
        if node is None:
            return None
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1 \
                and view.is_const(node.input[1]):
            return node.input[0]
        data = [i for i in node.input if i and not view.is_const(i)]
        if len(data) != 1:
            return None
        node = view.producer.get(data[0])
    return None
