"""Checks a produced model must pass before it is written.

1. ``onnx.checker.check_model(full_check=True)`` (types and shapes included);
2. an onnxruntime session opens (CUDA provider when present, CPU otherwise);
3. numeric equivalence on random inputs:
   ``rel_err = ||a - b||_2 / max(||b||_2, tiny)`` per output, the maximum over outputs
   (NaN and infinite values must match in place and value, else rel_err is inf).

The central invariant: a pruned model equals the original with the removed channels'
consumer weights zeroed ("masked"): ``rel_err(pruned, masked) < tol``, where

    tol = max(1e-5, 10 * noise)

and ``noise`` is the model's own numeric noise, measured on the (normalised) original:
``rel_err(onnxruntime with graph optimisations, without)`` on the shape probe's random
inputs (``prune``; a caller may pass others) - two correct evaluations
that differ only in rounding, as pruned and masked do (fusions fold BatchNorm into Conv
and reorder sums; the masked model adds zeros the pruned one skips). A model holding
float16/bfloat16 tensors also counts ``rel_err(f(x (1 + eps s)), f(x))``, ``s = +-1``
at random and ``eps`` that precision's machine epsilon: the output change one rounding
step of the input causes, which the optimiser estimate can miss when it rewrites
nothing. A clean float32 model has noise ~1e-7 and keeps exactly 1e-5; the factor 10
leaves room for the extra roundings along a deeper path.

A float16 model's tolerance (1e-4 to 1e-2 on zoo nets) is as large as the effect of one
wrongly zeroed weak channel, so such a model is also checked strictly: pruned and masked
are both upcast to float32 (``widened.py``; float16 -> float32 is exact; Casts to
float16 become Casts to float32) and must agree within the float32 rule above (the masked
copy's noise).
Where the float32 rule fails or is widened by the model's noise, float64 decides
(``exact.py``).

Each check above also compares the logits in front of a final Softmax or Sigmoid
(``logits.py``: a saturated one hides them), and measures the noise on them too.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from . import files
from .errors import VerificationError
from .logits import exposing, saturated_inputs
from .session_inputs import typed_feeds

logger = logging.getLogger(__name__)

EQUIVALENCE_TOLERANCE = 1e-5  # the floor: a model whose own noise is small gets exactly this
NOISE_FACTOR = 10
LOW_PRECISION = {onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16"}
EPSILON = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}  # machine epsilon


def providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


@dataclass(frozen=True)
class Detached:
    """A model whose large tensors travel beside it: ``data`` is the model serialised with
    those tensors marked external (no bytes), ``arrays`` their values. onnxruntime uses the
    arrays' buffers as they are, so opening a session neither serialises the weights nor
    parses and copies them (the outputs are bitwise those of a session of the whole model)."""
    data: bytes
    arrays: dict = field(repr=False)   # tensor name -> contiguous np.ndarray

    def with_data(self, data: bytes) -> "Detached":
        return Detached(data, self.arrays)


Source = onnx.ModelProto | bytes | str | Detached  # a model, its bytes, its file, detached

DETACH_MIN_BYTES = 1 << 16   # tensors at least this large reach sessions as arrays
_DETACHABLE = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
               onnx.TensorProto.INT64, onnx.TensorProto.INT32}


def detached_in_sessions(t: onnx.TensorProto) -> bool:
    """Whether ``detach`` hands this tensor to sessions as an array."""
    return (t.data_type in _DETACHABLE and t.data_location != onnx.TensorProto.EXTERNAL
            and int(np.prod(t.dims, dtype=np.int64)) * 8 >= DETACH_MIN_BYTES)


def detach(model: onnx.ModelProto, arrays=None) -> Detached:
    """`model` as a Detached; `arrays(name)` gives a tensor's value when the caller holds
    them already (e.g. ``GraphView.const``), else it is read from the tensor."""
    light = without_initializers(model)
    values = {}
    for t in model.graph.initializer:
        if not detached_in_sessions(t):
            light.graph.initializer.add().CopyFrom(t)
            continue
        value = arrays(t.name) if arrays is not None else None
        values[t.name] = np.ascontiguousarray(numpy_helper.to_array(t) if value is None
                                              else value)
        ref = light.graph.initializer.add()
        ref.name, ref.data_type = t.name, t.data_type
        ref.dims.extend(t.dims)
        ref.data_location = onnx.TensorProto.EXTERNAL
        entry = ref.external_data.add()
        entry.key, entry.value = "location", "gpp-onnx-arrays"
    return Detached(light.SerializeToString(), values)


def without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with an empty initializer list (the weights are not copied)."""
    out = onnx.ModelProto()
    for fd, value in model.ListFields():
        if fd.name != "graph":
            _copy_field(out, fd, value)
    for fd, value in model.graph.ListFields():
        if fd.name != "initializer":
            _copy_field(out.graph, fd, value)
    return out


def _copy_field(dst, fd, value) -> None:
    if fd.is_repeated:
        getattr(dst, fd.name).extend(value)
    elif fd.message_type is not None:
        getattr(dst, fd.name).CopyFrom(value)
    else:
        setattr(dst, fd.name, value)


def serialized(model: onnx.ModelProto | bytes | str) -> bytes | str:
    """What the checker or a session reads: bytes and paths as given, a model serialised.
    A model that several sessions and the checker read is serialised once."""
    return model if isinstance(model, (bytes, str)) else model.SerializeToString()


def session_source(model: Source, arrays=None) -> bytes | str | Detached:
    """A model with large tensors is detached (see ``Detached``; `arrays` as in
    ``detach``), a small one serialised."""
    if not isinstance(model, onnx.ModelProto):
        return model
    elements = sum(int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer)
    return (detach(model, arrays) if elements * 4 >= DETACH_MIN_BYTES
            else model.SerializeToString())



def make_session(model: Source, where: str = "model", threads: int = 0,
                 provider_list: list[str] | None = None, optimize: bool = True,
                 quiet: bool = False):
    """An onnxruntime session of a model, its bytes, its file or its detached form
    (`quiet`: onnxruntime logs nothing, for runs that may fail by design). Numeric
    checks use ``optimize=False``: ORT's fusions round differently from graph to graph, and
    a check compares graphs, not ORT's rewrites. An unoptimised session of a detached model
    takes the large weights as inputs fed with every run (``FedSession``)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4 if quiet else 3
    # spinning intra-op threads distort interleaved timings on few cores
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        # a check session runs a few batches: repacking every weight for faster kernels
        # costs more than it saves (0.45 s per vgg11_bn session), and fed weights (below)
        # are never repacked, so every check session computes alike
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        opts.intra_op_num_threads = threads
    source = session_source(model)
    values = []
    fed = isinstance(source, Detached) and not optimize
    if fed:
        arrays, source = source.arrays, _weights_as_inputs(source)
    elif isinstance(source, Detached):
        values = [ort.OrtValue.ortvalue_from_numpy(a) for a in source.arrays.values()]
        opts.add_external_initializers(list(source.arrays), values)
        source = source.data
    try:
        session = ort.InferenceSession(source, opts, providers=provider_list or providers())
    except Exception as err:
        raise VerificationError(f"{where}: onnxruntime cannot open it "
                                f"({str(err).splitlines()[0][:200]})") from None
    if fed:
        return FedSession(session, arrays)
    session.gpp_arrays = values  # onnxruntime reads the arrays' buffers: keep them alive
    return session


class FedSession:
    """An unoptimised session whose large weights are graph inputs, fed from their arrays
    with every run. onnxruntime copies weights handed over as initializers when it opens
    a session (0.3 s and 500 MB for vgg11_bn); inputs it reads in place. Unoptimised, the
    kernels compute the same either way (bitwise; tests/test_sessions.py). The weights are
    hidden from ``get_inputs`` and ``run`` takes the model's own inputs only."""

    def __init__(self, session, arrays: dict):
        self.session, self.arrays = session, arrays

    def run(self, names, feeds: dict, *args, **kwargs):
        return self.session.run(names, {**feeds, **self.arrays}, *args, **kwargs)

    def get_inputs(self):
        return [i for i in self.session.get_inputs() if i.name not in self.arrays]

    def __getattr__(self, name):
        return getattr(self.session, name)


def _weights_as_inputs(source: Detached) -> bytes:
    """`source`'s model with its detached tensors as graph inputs of their type and shape."""
    light = onnx.ModelProto()
    light.ParseFromString(source.data)
    inits = light.graph.initializer
    refs = [(i, t) for i, t in enumerate(inits) if t.name in source.arrays]
    listed = {v.name for v in light.graph.input}
    for _, t in refs:
        if t.name not in listed:
            light.graph.input.append(onnx.helper.make_tensor_value_info(
                t.name, t.data_type, list(t.dims)))
    for i, _ in reversed(refs):
        del inits[i]
    return light.SerializeToString()


def check(model: onnx.ModelProto | bytes, where: str = "pruned model") -> None:
    """The full checker; a model over 2 GB (no protobuf holds it) is checked from a file."""
    data = files.serialize(model) if isinstance(model, onnx.ModelProto) else model
    if data is None:
        with tempfile.TemporaryDirectory() as tmp:
            _check_model(files.save(model, Path(tmp) / "model.onnx"), where)
    else:
        _check_model(data, where)


def _check_model(model: bytes | Path, where: str) -> None:
    try:
        onnx.checker.check_model(model if isinstance(model, bytes) else str(model),
                                 full_check=True)
    except Exception as err:
        raise VerificationError(f"{where} fails the ONNX checker "
                                f"({' '.join(str(err).split())[:200]})") from None


def outputs(session, feeds: dict, where: str = "model", names: list[str] | None = None
            ) -> list[np.ndarray]:
    try:
        return session.run(names, typed_feeds(session, feeds))
    except Exception as err:
        raise VerificationError(f"{where} fails to run ({str(err).splitlines()[0][:200]})") from None


def run(model: Source, feeds: dict, where: str = "model") -> list[np.ndarray]:
    """Outputs of `model` on `feeds`, without ORT graph rewrites (for numeric checks)."""
    return outputs(make_session(model, where, optimize=False), feeds, where)


def relative_error(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """The worst output's relative error; NaNs and infinities must sit in the same places
    with the same values (else inf), and only the finite values are compared (a NaN once
    dropped out of ``max``: a cut computing numbers where the masked original computes
    NaN passed with error 0)."""
    worst = 0.0
    for x, y in zip(a, b):
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if x.shape != y.shape:
            return float("inf")
        finite = np.isfinite(y)
        if not (np.array_equal(np.isfinite(x), finite)
                and np.array_equal(x[~finite], y[~finite], equal_nan=True)):
            return float("inf")
        x, y = x[finite], y[finite]
        denom = max(float(np.linalg.norm(y)), 1e-30)
        worst = max(worst, float(np.linalg.norm(x - y)) / denom)
    return worst


@dataclass(frozen=True)
class Tolerance:
    """The equivalence tolerance of one model and the noise it is derived from."""
    optimizer_noise: float = 0.0   # rel_err(ORT optimised, not optimised)
    rounding_noise: float = 0.0    # rel_err(one low-precision rounding of the inputs, none)
    float32_noise: float = 0.0     # rel_err(float32, float64) of pruned and masked (exact.py)

    @property
    def noise(self) -> float:
        return max(self.optimizer_noise, self.rounding_noise, self.float32_noise)

    @property
    def value(self) -> float:
        return max(EQUIVALENCE_TOLERANCE, NOISE_FACTOR * self.noise)


FLOOR = Tolerance()


def low_precision(model: onnx.ModelProto) -> str | None:
    """'float16' / 'bfloat16' when the model holds tensors of that type, else None."""
    types = {t.data_type for t in model.graph.initializer}
    values = [*model.graph.input, *model.graph.output, *model.graph.value_info]
    types |= {v.type.tensor_type.elem_type for v in values}
    for node in model.graph.node:
        types |= {a.i for a in node.attribute if node.op_type == "Cast" and a.name == "to"}
        types |= {a.t.data_type for a in node.attribute if a.type == onnx.AttributeProto.TENSOR}
    names = {LOW_PRECISION[t] for t in types if t in LOW_PRECISION}
    return max(names, key=EPSILON.get) if names else None


def measure_tolerance(model: onnx.ModelProto, feeds: dict, where: str = "input model",
                      source: Source | None = None, plain: list[np.ndarray] | None = None,
                      optimised_session=None) -> Tolerance:
    """The model's own noise on `feeds` (see the module docstring) and its tolerance.
    `source`: the model's bytes or file, to open sessions without serialising it again;
    `plain`: its outputs on `feeds` without optimisations, when the caller has them;
    `optimised_session`: an optimised session of it the caller keeps (for latency)."""
    source = session_source(model if source is None else source)
    extra = saturated_inputs(model)
    if extra:   # the noise of the compared logits too: the caller's runs lack them
        source, plain, optimised_session = exposing(source, extra), None, None
    plain = run(source, feeds, where) if plain is None else plain
    try:
        session = optimised_session or make_session(source, where, optimize=True)
        optimised = outputs(session, feeds, where)
    except VerificationError as err:  # an optimiser failure is onnxruntime's, not the model's
        logger.warning("the optimiser's noise is not measured: %s", err)
        optimised = plain
    rounding = 0.0
    low = low_precision(model)
    if low is not None:
        rounding = relative_error(run(source, _perturbed(feeds, EPSILON[low]), where), plain)
    tol = Tolerance(relative_error(optimised, plain), rounding)
    logger.info("%s: noise %.1e (optimiser %.1e, rounding %.1e), equivalence tolerance %.1e",
                where, tol.noise, tol.optimizer_noise, tol.rounding_noise, tol.value)
    return tol


def _perturbed(feeds: dict, eps: float, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for name, x in feeds.items():
        x = np.asarray(x)
        if np.issubdtype(x.dtype, np.floating):
            sign = rng.choice([-1.0, 1.0], size=x.shape)
            x = (x.astype(np.float64) * (1 + eps * sign)).astype(x.dtype)
        out[name] = x
    return out


def check_equivalent(got: list[np.ndarray], reference: list[np.ndarray],
                     where: str = "pruned model", against: str = "the masked original",
                     tolerance: Tolerance = FLOOR) -> float:
    """Relative error of `got` against `reference`; raise if not under `tolerance.value`."""
    err = relative_error(got, reference)
    if not err < tolerance.value:
        raise VerificationError(f"{where} differs from {against} (relative error {err:.2e} >= "
                                f"tolerance {tolerance.value:.1e}, the model's own noise "
                                f"{tolerance.noise:.1e}); nothing was written - please "
                                "report this model")
    return err
