"""Checks a produced model must pass before it is written.

1. ``onnx.checker.check_model(full_check=True)`` (types and shapes included);
2. an onnxruntime session opens (CUDA provider when present, CPU otherwise);
3. numeric equivalence on random inputs, fp32:
   ``rel_err = ||a - b||_2 / max(||b||_2, tiny)`` per output, the maximum over outputs.

The central invariant: a pruned model equals the original with the removed channels'
consumer weights zeroed ("masked"), so ``rel_err(pruned, masked) < 1e-5``.
"""
from __future__ import annotations

import logging
import statistics
import time

import numpy as np
import onnx

from .errors import VerificationError

logger = logging.getLogger(__name__)

EQUIVALENCE_TOLERANCE = 1e-5


def providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def make_session(model: onnx.ModelProto, where: str = "model", threads: int = 0,
                 provider_list: list[str] | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(model.SerializeToString(), opts,
                                    providers=provider_list or providers())
    except Exception as err:
        raise VerificationError(f"{where}: onnxruntime cannot open it "
                                f"({str(err).splitlines()[0][:200]})") from None


def check(model: onnx.ModelProto, where: str = "pruned model") -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as err:
        raise VerificationError(f"{where} fails the ONNX checker "
                                f"({' '.join(str(err).split())[:200]})") from None


def run(model: onnx.ModelProto, feeds: dict, where: str = "model") -> list[np.ndarray]:
    session = make_session(model, where)
    try:
        return session.run(None, feeds)
    except Exception as err:
        raise VerificationError(f"{where} fails to run ({str(err).splitlines()[0][:200]})") from None


def relative_error(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if x.shape != y.shape:
            return float("inf")
        denom = max(float(np.linalg.norm(y)), 1e-30)
        worst = max(worst, float(np.linalg.norm(x - y)) / denom)
    return worst


def equivalence(model: onnx.ModelProto, reference: onnx.ModelProto, feeds: dict,
                where: str = "pruned model") -> float:
    """Relative error of `model` against `reference` on `feeds`; raise if over tolerance."""
    err = relative_error(run(model, feeds, where), run(reference, feeds, "reference model"))
    if not err < EQUIVALENCE_TOLERANCE:
        raise VerificationError(f"{where} differs from the masked original "
                                f"(relative error {err:.2e} >= {EQUIVALENCE_TOLERANCE:.0e}); "
                                "nothing was written - please report this model")
    return err


def latency_ratio(model_a: onnx.ModelProto, model_b: onnx.ModelProto, feeds: dict,
                  repeats: int = 30, threads: int = 0) -> tuple[float, float, float]:
    """Median latency of a and b (seconds), measured interleaved, and b/a."""
    sessions = [make_session(m, threads=threads) for m in (model_a, model_b)]
    for s in sessions:  # warm-up
        for _ in range(3):
            s.run(None, feeds)
    times: list[list[float]] = [[], []]
    for _ in range(repeats):
        for i, s in enumerate(sessions):
            t0 = time.perf_counter()
            s.run(None, feeds)
            times[i].append(time.perf_counter() - t0)
    a, b = statistics.median(times[0]), statistics.median(times[1])
    return a, b, b / a
