"""The final hidden layer ("pre-decision space") of a classifier.

It is the input of the last linear classifier: walking back from the model's first
output through shape-only and monotone ops (Identity, Softmax, Flatten, Reshape, an Add
of a constant, ...: those whose rule says ``feature_pass``), the first Gemm or MatMul with a constant weight; its input A is the feature tensor. A
feature tensor with spatial dims is average-pooled to one value per channel by the
criteria that read it. ``--feature-tensor NAME`` overrides the search.
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
    if node is None or node.op_type not in ("Gemm", "MatMul") or not view.is_const(node.input[1]):
        what = "nothing" if node is None else \
            f"{node.op_type} node '{node.name}', value '{value}'"
        raise InputError(f"the model's last layer is not a linear classifier (found {what}) - "
                         "pass --feature-tensor NAME with the final hidden layer's value name")
    return node.input[0]
