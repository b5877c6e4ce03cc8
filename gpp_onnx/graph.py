"""A read-only index over an ONNX graph, with concrete shapes of every value.

Shapes come from one onnxruntime run at batch 1 with every intermediate value exposed
as an output ("probe"). That works for models without shape information and for shape
arithmetic that static inference cannot follow. Symbolic dims of the inputs are fixed
first: the batch dim to 1, the others from ``input_shape`` (or 224 for image dims).
``input_shape`` is one shape for a single-input model or ``{input name: shape}``. Random
inputs take each input's own dtype (float16 inputs get float16 values).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import onnx
from onnx import numpy_helper

from .config import checked_input_shape
from .errors import InputError, UnsupportedModelError

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_SIDE = 224
InputShape = tuple[int, ...] | dict[str, tuple[int, ...]] | None


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    free_batch: bool = True   # the model leaves dim 0 symbolic (checks may feed batch 2)


class GraphView:
    """Producers, consumers, initializer arrays and probed shapes of one model."""

    def __init__(self, model: onnx.ModelProto, input_shape: InputShape = None):
        self.model = model
        self.graph = model.graph
        self.nodes = list(model.graph.node)
        self.init_protos = {t.name: t for t in model.graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers.setdefault(inp, []).append(node)
        init = set(self.init_protos)
        self.input_names = [v.name for v in model.graph.input if v.name not in init]
        self.output_names = [v.name for v in model.graph.output]
        given = input_shapes(input_shape, self.input_names)
        self.inputs = [_input_spec(v, given.get(v.name)) for v in model.graph.input
                       if v.name not in init]
        self._arrays: dict[str, np.ndarray] = {}

    # -- constants ---------------------------------------------------------------
    def read_once(self, name: str) -> bool:
        """One node reads `name` and the model does not return it: a value a channel rule
        may rewrite, or cut a constant folded into it, for that reader alone (another
        reader, or the caller of the model, would get the changed value too)."""
        return len(self.consumers.get(name, [])) == 1 and name not in self.output_names

    def is_const(self, name: str) -> bool:
        return name in self.init_protos

    def const(self, name: str) -> np.ndarray | None:
        if name not in self.init_protos:
            return None
        if name not in self._arrays:
            self._arrays[name] = numpy_helper.to_array(self.init_protos[name])
        return self._arrays[name]

    def input(self, node: onnx.NodeProto, i: int) -> str | None:
        return node.input[i] if len(node.input) > i and node.input[i] else None

    # -- shapes ------------------------------------------------------------------
    @cached_property
    def detached(self):
        """The model as ``verify.Detached`` (its large tensors are the view's own arrays),
        built once for every session that runs it."""
        from .verify import detach

        return detach(self.model, self.const)

    @cached_property
    def _probe_run(self) -> tuple[dict, dict[str, np.ndarray]]:
        feeds = random_feeds(self.inputs)
        return feeds, _probe(_exposed_session(self.model, self.detached), self.inputs, feeds)

    def plain_outputs(self, feeds: dict, where: str = "model") -> list[np.ndarray]:
        """The model's outputs on `feeds` without ORT graph rewrites (as ``verify.run``).
        Not from the probe's session: with every value an output, onnxruntime reuses no
        buffer and runs 1.5x slower; an unoptimised session of the detached model opens in
        milliseconds (its weights are fed, ``verify.FedSession``)."""
        from .verify import make_session, outputs

        return outputs(make_session(self.detached, where, optimize=False), feeds, where,
                       self.output_names)

    @cached_property
    def _probed(self) -> dict[str, tuple[tuple[int, ...], str]]:
        meta = {name: (tuple(np.shape(v)), np.asarray(v).dtype)
                for name, v in self._probe_run[1].items()}
        meta.update({s.name: (s.shape, np.dtype(s.dtype)) for s in self.inputs})
        return meta

    @property
    def dynamic_batch(self) -> bool:
        """True when the first input's batch dim is symbolic."""
        init = set(self.init_protos)
        first = next(v for v in self.graph.input if v.name not in init)
        dims = first.type.tensor_type.shape.dim
        return bool(dims) and not dims[0].HasField("dim_value")

    def check_feeds(self, seed: int = 0) -> dict:
        """Random inputs for numeric checks: batch 2 where the batch is dynamic, its second
        float sample drawn from U(0, 1), the scale of images fed as they are: channels
        that respond to image content stay silent on N(0, 1) noise alone (after a Relu,
        3 of a trained net's 32 were 0 on two N(0, 1) samples), and a cut that changed
        one of them passed the check. A uint8 input's second sample is pixels 0..255
        (its first, {0, 1} as other integers get, is a near-black image)."""
        feeds = random_feeds(self.inputs, batch=2 if self.dynamic_batch else None, seed=seed)
        rng = np.random.default_rng(seed + 1)
        for spec in self.inputs:
            x = feeds[spec.name]
            if spec.free_batch and np.issubdtype(x.dtype, np.floating) and len(x) > 1:
                x[1] = rng.uniform(0.0, 1.0, x.shape[1:]).astype(x.dtype)
            elif spec.free_batch and x.dtype == np.uint8 and len(x) > 1:
                x[1] = rng.integers(0, 256, x.shape[1:], dtype=np.uint8)
        return feeds

    @property
    def batch_input(self) -> InputSpec:
        """The input whose dim 0 is the batch: the first that leaves it free, else the
        first with the largest dim 0 (scalars and a recurrent state's fixed (1, 1, H) have
        none where another input's batch is free or larger: ``arrays.whole_inputs``)."""
        ranked = [s for s in self.inputs if s.shape]
        return next((s for s in ranked if s.free_batch),
                    max(ranked, key=lambda s: s.shape[0]) if ranked else self.inputs[0])

    @property
    def probe_feeds(self) -> dict:
        """The random inputs of the shape probe (batch 1 unless the input fixes it)."""
        return self._probe_run[0]

    @property
    def probe_outputs(self) -> list[np.ndarray]:
        """The model's outputs on `probe_feeds`, in graph output order."""
        values = self._probe_run[1]
        return [values[name] for name in self.output_names]

    def probed(self, name: str) -> np.ndarray | None:
        """The value `name` took in the shape probe (batch 1): for reading computed shape
        targets, never for weights."""
        return self._probe_run[1].get(name)

    def shape(self, name: str) -> tuple[int, ...] | None:
        if name in self.init_protos:
            return tuple(self.init_protos[name].dims)
        hit = self._probed.get(name)
        return None if hit is None else hit[0]

    def rank(self, name: str) -> int | None:
        shape = self.shape(name)
        return None if shape is None else len(shape)

    def is_float(self, name: str) -> bool:
        if name in self.init_protos:
            return self.init_protos[name].data_type in _FLOAT_TYPES
        hit = self._probed.get(name)
        return hit is not None and hit[1].kind == "f"

    def dtype(self, name: str) -> np.dtype | None:
        """The element type of a value (an initializer's, or the one the probe saw)."""
        if name in self.init_protos:
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(
                self.init_protos[name].data_type))
        hit = self._probed.get(name)
        return None if hit is None else hit[1]


_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                onnx.TensorProto.BFLOAT16}


def input_shapes(input_shape: InputShape, names: list[str]) -> dict[str, tuple[int, ...]]:
    """``{input name: shape}`` from one shape (single-input models) or a dict of them."""
    if input_shape is None:
        return {}
    input_shape = checked_input_shape(input_shape)   # analyze, profile, compare, grow too
    if isinstance(input_shape, dict):
        unknown = sorted(set(input_shape) - set(names))
        if unknown:
            raise InputError(f"--input-shape names '{unknown[0]}', which is not an input of "
                             f"the model - its inputs are {_listing(names)}")
        return {name: tuple(int(d) for d in dims) for name, dims in input_shape.items()}
    if len(names) != 1:
        raise InputError(f"--input-shape {','.join(map(str, input_shape))} is one shape but "
                         f"the model has {len(names)} inputs ({_listing(names)}) - give one "
                         "per input as NAME:1,3,224,224")
    return {names[0]: tuple(int(d) for d in input_shape)}


def _listing(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _input_spec(value: onnx.ValueInfoProto, input_shape: tuple[int, ...] | None) -> InputSpec:
    ttype = value.type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type) if ttype.elem_type else np.float32
    dims = list(ttype.shape.dim)
    # a 0-D input (a scalar such as a temperature) has no batch dim to feed 2 of
    free = (not dims and not ttype.HasField("shape")) or bool(dims) and not (
        dims[0].HasField("dim_value") and dims[0].dim_value > 0)
    if input_shape is not None:
        if len(input_shape) != len(dims):
            raise InputError(f"--input-shape {','.join(map(str, input_shape))} has rank "
                             f"{len(input_shape)} but "
                             f"input '{value.name}' has rank {len(dims)} - give one size per dim")
        return InputSpec(value.name, tuple(int(d) for d in input_shape), np.dtype(dtype), free)
    fixed = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]
    # an NHWC image has its free sides on axes 1 and 2: its H was refused, with and
    # without --data
    sides = (1, 2) if len(dims) == 4 and is_nhwc(fixed) else (2, 3)
    shape = []
    for axis, dim in enumerate(dims):
        if fixed[axis] is not None:
            shape.append(fixed[axis])
        elif axis == 0:
            shape.append(1)
        elif len(dims) == 4 and axis in sides or len(dims) == 3 and axis >= 1:
            shape.append(DEFAULT_IMAGE_SIDE)
        else:
            raise InputError(f"input '{value.name}' has a symbolic dim at axis {axis} - "
                             "pass --input-shape with concrete sizes, e.g. 1,3,224,224 "
                             f"(or {value.name}:1,3,224,224 per input)")
    return InputSpec(value.name, tuple(shape), np.dtype(dtype), free)


def is_nhwc(dims) -> bool:
    """A 4-D image input's sizes (None where free) read as NHWC: its last axis holds 1 or
    3 channels and axis 1 does not."""
    return dims[3] in (1, 3) and dims[1] not in (1, 3)


def random_feeds(inputs: list[InputSpec], batch: int | None = None, seed: int = 0) -> dict:
    """Random inputs; `batch` replaces dim 0 of the inputs whose dim 0 the model leaves
    free (a fixed one, e.g. a recurrent state's (1, 1, H), keeps its size)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in inputs:
        shape = (batch, *spec.shape[1:]) if batch and spec.free_batch else spec.shape
        if np.issubdtype(spec.dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        else:
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(spec.dtype)
    return feeds


def _exposed_session(model: onnx.ModelProto, detached):
    """An unoptimised session of the model (`detached`: its ``verify.Detached`` form) with
    every value exposed as an output. The exposed model is the detached bytes followed by a
    ModelProto holding only the extra graph outputs: protobuf parses concatenated messages
    as one merged message (repeated fields appended), so nothing is copied again."""
    from .errors import VerificationError
    from .verify import make_session

    extra = onnx.ModelProto()
    known = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for out in node.output:
            if out and out not in known:
                extra.graph.output.append(onnx.ValueInfoProto(name=out))
                known.add(out)
    try:
        return make_session(detached.with_data(detached.data + extra.SerializeToString()),
                            where="the model", optimize=False)
    except VerificationError as err:
        raise UnsupportedModelError(f"{err} - gpp-onnx runs models through onnxruntime's CPU "
                                    "provider: export one with standard ONNX ops (no custom "
                                    "domains) in float32 or float16") from None


def _probe(session, inputs: list[InputSpec], feeds: dict) -> dict[str, np.ndarray]:
    """Run the exposed model once: every value on `feeds`."""
    names = [o.name for o in session.get_outputs()]
    try:
        values = session.run(names, feeds)
    except Exception as err:
        detail = " ".join(str(err).replace("Please fix either the inputs/outputs or the model.",
                                           "").split())[:240]  # ORT's index / got / expected
        raise InputError(f"the model fails to run on inputs of shape "
                         f"{[s.shape for s in inputs]} ({detail}) - "
                         "pass --input-shape with the size the model expects"
                         + (" (NAME:1,3,224,224 for each input)" if len(inputs) > 1 else "")
                         ) from None
    return dict(zip(names, values))
