"""The logits a saturated output hides, compared by the equivalence checks (``verify``).

A graph output that a Softmax / Sigmoid / HardSigmoid / Tanh (or an ArgMax) makes, behind
Casts and Identities, hides its input on random inputs: a classifier trained on [0, 1]
images gives logit margins of 20 or more on N(0, 1) probes, its Softmax is one-hot to
e^-20, and a cut that moves every logit changes the output by less than 1e-9 (a dropped
bias or two swapped kept channels, 5-14 of 64 Fashion-MNIST test predictions flipped,
passed the check). Each check therefore also compares the value in front of such an op
(``saturated_inputs``), as if it were one more output.
"""
from __future__ import annotations

import onnx

SATURATING = {"Softmax", "Sigmoid", "HardSigmoid", "Tanh", "ArgMax", "ArgMin"}
_PASSING = {"Cast", "Identity"}


def saturated_inputs(model: onnx.ModelProto) -> list[str]:
    """The values the checks compare besides the graph outputs: for each output that a
    chain of SATURATING ops (through Casts and Identities) ends, the input of the chain's
    first such op (a classifier's logits); none that is an output, input or weight."""
    producer = {o: n for n in model.graph.node for o in n.output}
    given = {v.name for v in [*model.graph.output, *model.graph.input]}
    given |= {t.name for t in model.graph.initializer}
    found: list[str] = []
    for out in model.graph.output:
        value, before = out.name, None
        while (node := producer.get(value)) is not None and node.input \
                and node.op_type in SATURATING | _PASSING:
            value = node.input[0]
            before = value if node.op_type in SATURATING else before
        if before is not None and before not in given and before not in found:
            found.append(before)
    return found


def exposing(source, names: list[str]):
    """A session source whose graph also outputs `names` (`source` itself when there are
    none): the serialised model followed by a ModelProto holding only those outputs, which
    protobuf parses as one merged message (nothing is copied again)."""
    if not names:
        return source
    extra = onnx.ModelProto()
    extra.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    tail = extra.SerializeToString()
    if hasattr(source, "with_data"):   # verify.Detached
        return source.with_data(source.data + tail)
    if isinstance(source, str):
        with open(source, "rb") as f:
            source = f.read()
    return source + tail
