"""Pruned == masked decided in float64, where float32 rounding cannot hide or fake a cut.

The float32 check (``verify``) accepts ``rel_err32(pruned, masked) < tol``, ``tol =
max(1e-5, 10 * noise)``, with ``noise`` the difference between two float32 evaluations
of the original (optimised or not). On some models that underestimates how far two
correct float32 evaluations drift apart once a cut changes the length and order of every
following reduction: deep nets with normalisation layers (an OCR recognizer's float32
output differs from its float64 output by 1.8e-5 while its optimiser noise is 1.6e-6),
or outputs that a saturated sigmoid pins near 0 on random inputs, where onnxruntime's
sigmoid has an absolute error of ~6e-8 and the relative error of two correct float32
evaluations reaches 0.4. Where the float32 check fails, or passes only because the
model's noise widened its tolerance beyond 1e-3 (where it can no longer tell a wrongly
kept channel from noise), both models run in float64 through the torch backend, and

    rel_err64(pruned, masked) < 1e-9

decides (float64 rounding is ~1e-16; a wrongly kept or dropped channel moves the output
by far more than 1e-9). A float32 failure is then accepted only within ten times the
float32 error of the two models themselves:

    rel_err32(pruned, masked) < max(tol, 10 * max(rel_err(p32, p64), rel_err(m32, m64)))

When the float64 evaluation is not possible (an op the torch backend lacks), the float32
verdict stands.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import onnx

from . import verify
from .errors import VerificationError

logger = logging.getLogger(__name__)

FLOAT64_TOLERANCE = 1e-9
LOOSE = 1e-3  # a float32 tolerance above this is checked again in float64


@dataclass(frozen=True)
class Verdict:
    """The accepted float32 error, the float64 error (None: not computed) and the
    tolerance the float32 error was held to."""
    error: float
    error_float64: float | None
    tolerance: verify.Tolerance


def _cast_keeping_float64(node, x):
    """Cast, except that a cast to any float type stays float64 (float64 throughout)."""
    import torch

    from .torch_backend.ops import ONNX_TO_TORCH_DTYPE

    dtype = ONNX_TO_TORCH_DTYPE[node.attr("to")]
    return x.to(torch.float64 if dtype.is_floating_point else dtype)


def float64_outputs(model: onnx.ModelProto, feeds: dict, extra: list[str] = ()
                    ) -> list[np.ndarray] | None:
    """The graph outputs, then the values named in `extra`, computed in float64 by the
    torch backend; None when it cannot."""
    import torch

    from .torch_backend import OnnxModule

    wide = {k: torch.from_numpy(np.asarray(v, np.float64) if np.asarray(v).dtype.kind == "f"
                                else np.asarray(v)) for k, v in feeds.items()}
    try:
        module = OnnxModule(model, op_overrides={"Cast": _cast_keeping_float64}).double().eval()
        with torch.no_grad():
            names = [*module.output_names, *extra]
            values = module.run(wide, names)
        return [values[name].to(torch.float64).cpu().numpy() for name in names]
    except Exception as err:  # noqa: BLE001 - any backend gap leaves the float32 verdict
        logger.warning("float64 evaluation not possible (%s); the float32 check decides",
                       str(err).splitlines()[0][:200])
        return None


def check(pruned: onnx.ModelProto, masked, feeds: dict,
          got: list[np.ndarray], reference: list[np.ndarray],
          tolerance: verify.Tolerance, extra: list[str] = ()) -> Verdict:
    """Pruned (outputs `got`) == masked (outputs `reference`) on `feeds`, see the module
    docstring; raise VerificationError when they differ. `masked`: the masked model, or a
    function returning it (built only when float64 has to decide). `got` and `reference`
    end with the values named in `extra` (``logits.saturated_inputs``)."""
    failure = None
    try:
        err = verify.check_equivalent(got, reference, tolerance=tolerance)
        if tolerance.value <= LOOSE:
            return Verdict(err, None, tolerance)
    except VerificationError as exc:
        failure, err = exc, verify.relative_error(got, reference)
    got64 = float64_outputs(pruned, feeds, extra)
    masked = masked() if callable(masked) else masked
    ref64 = float64_outputs(masked, feeds, extra) if got64 is not None else None
    if ref64 is None:
        if failure is not None:
            raise failure
        return Verdict(err, None, tolerance)
    err64 = verify.relative_error(got64, ref64)
    if not err64 < FLOAT64_TOLERANCE:
        raise VerificationError(
            f"pruned model differs from the masked original computed in float64 (relative "
            f"error {err64:.2e} >= {FLOAT64_TOLERANCE:.0e}; in float32 {err:.2e}); nothing "
            "was written - please report this model")
    logger.info("verified in float64: pruned == masked original (relative error %.1e)", err64)
    if failure is None:
        return Verdict(err, err64, tolerance)
    drift = max(verify.relative_error(got, got64), verify.relative_error(reference, ref64))
    widened = replace(tolerance, float32_noise=drift)
    err = verify.check_equivalent(got, reference, tolerance=widened)
    logger.info("float32 error %.1e is within ten times the models' own float32 error "
                "%.1e", err, drift)
    return Verdict(err, err64, widened)
