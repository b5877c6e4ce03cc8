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
                 provider_list: list[str] | None = None, optimize: bool = True):
    """An onnxruntime session. Numeric checks use ``optimize=False``: ORT's fusions round
    differently from graph to graph, and a check compares graphs, not ORT's rewrites."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # spinning intra-op threads distort interleaved timings on few cores
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
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


def outputs(session, feeds: dict, where: str = "model") -> list[np.ndarray]:
    try:
        return session.run(None, feeds)
    except Exception as err:
        raise VerificationError(f"{where} fails to run ({str(err).splitlines()[0][:200]})") from None


def run(model: onnx.ModelProto, feeds: dict, where: str = "model") -> list[np.ndarray]:
    """Outputs of `model` on `feeds`, without ORT graph rewrites (for numeric checks)."""
    return outputs(make_session(model, where, optimize=False), feeds, where)


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


def check_equivalent(got: list[np.ndarray], reference: list[np.ndarray],
                     where: str = "pruned model", against: str = "the masked original") -> float:
    """Relative error of `got` against `reference`; raise if over tolerance."""
    err = relative_error(got, reference)
    if not err < EQUIVALENCE_TOLERANCE:
        raise VerificationError(f"{where} differs from {against} (relative error {err:.2e} >= "
                                f"{EQUIVALENCE_TOLERANCE:.0e}); nothing was written - please "
                                "report this model")
    return err


def latency(sessions: list, feeds: dict, budget_s: float = 3.0, min_runs: int = 5,
            max_runs: int = 50) -> list[float]:
    """Median latency (seconds) of each session, runs interleaved, within a time budget."""
    for s in sessions:  # warm-up
        s.run(None, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    start = time.perf_counter()
    while len(times[0]) < max_runs and (len(times[0]) < min_runs
                                        or time.perf_counter() - start < budget_s):
        for i, s in enumerate(sessions):
            t0 = time.perf_counter()
            s.run(None, feeds)
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]
