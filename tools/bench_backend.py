"""Torch backend benchmark: forward parity with onnxruntime over zoo models, and GPP
tracing throughput relative to plain onnxruntime inference on the same machine.

    python tools/bench_backend.py [--models resnet18,mobilenet_v2] [--size 64] [--json out.json]
                                  [--device cpu|cuda] [--threads 2]

Parity: relative error ||torch - ort|| / ||ort|| of the logits (fp32, batch 4, random
input, legacy export). Throughput: marginal images/s of the GPP criterion's scoring pass
(LDA features + tracing to every channel group; from runs on 32 and 128 images, so the
fixed cost of building the module and solving the LDA is reported apart) versus images/s
of onnxruntime inference at the same batch size, measured in the same run. ``--device``
runs the torch side (parity and tracing) there; onnxruntime always runs on its CPU
provider, so on a GPU machine the ratio compares torch-on-GPU with ORT-on-CPU. TF32 is
switched off, so parity is measured in strict fp32 on GPUs too.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.pytorch import export_torch, load_torchvision  # noqa: E402
from gpp_onnx.analysis import analyze_model  # noqa: E402
from gpp_onnx.analysis.features import final_hidden_layer  # noqa: E402
from gpp_onnx.data import Dataset  # noqa: E402
from gpp_onnx.importance import Evidence, get_criterion  # noqa: E402
from gpp_onnx.model import normalize  # noqa: E402
from gpp_onnx.torch_backend import OnnxModule  # noqa: E402
from gpp_onnx.verify import make_session  # noqa: E402

DEFAULT = ["resnet18", "mobilenet_v2", "shufflenet_v2_x0_5", "squeezenet1_1", "googlenet",
           "efficientnet_b0", "densenet121", "regnet_x_400mf", "mnasnet0_5", "resnet50"]
KWARGS = {"googlenet": dict(aux_logits=False, init_weights=True),
          "inception_v3": dict(aux_logits=False, init_weights=True)}


def _export(name: str, size: int, folder: Path) -> onnx.ModelProto:
    model = load_torchvision(name, **KWARGS.get(name, {}))
    path = export_torch(model, folder / f"{name}.onnx", (1, 3, size, size), exporter="legacy")
    return normalize(onnx.load(str(path)))


def _parity(model: onnx.ModelProto, size: int, device: str) -> float:
    x = np.random.default_rng(0).standard_normal((4, 3, size, size)).astype(np.float32)
    session = make_session(model)
    ref = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        got = OnnxModule(model, device=device).eval()(torch.from_numpy(x).to(device)).cpu().numpy()
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


def _ort_rate(model: onnx.ModelProto, x: np.ndarray, repeats: int = 3) -> float:
    session = make_session(model)
    name = session.get_inputs()[0].name
    session.run(None, {name: x[:8]})
    t0 = time.perf_counter()
    for _ in range(repeats):
        for start in range(0, len(x), 16):
            session.run(None, {name: x[start:start + 16]})
    return repeats * len(x) / (time.perf_counter() - t0)


def _trace_time(analysis, feature, x: np.ndarray, device: str) -> float:
    y = np.arange(len(x)) % 4
    data = Dataset(x, y, tuple("abcd"), "random")
    t0 = time.perf_counter()
    get_criterion("gpp").score(analysis, Evidence(data, feature, device, 16))
    return time.perf_counter() - t0


def _trace_rate(model: onnx.ModelProto, x: np.ndarray, device: str) -> tuple[float, float] | None:
    """Marginal images/s of GPP scoring (from runs on n/4 and n images) and its fixed cost."""
    analysis = analyze_model(model)
    try:
        feature = final_hidden_layer(analysis.view)
    except Exception:
        return None
    small = _trace_time(analysis, feature, x[: len(x) // 4], device)
    full = _trace_time(analysis, feature, x, device)
    if full <= small:  # too noisy to separate: report the plain average rate
        return len(x) / full, 0.0
    rate = (len(x) - len(x) // 4) / (full - small)
    return rate, max(small - (len(x) // 4) / rate, 0.0)


def run(names: list[str], size: int, device: str = "cpu") -> list[dict]:
    rows = []
    x = np.random.default_rng(1).standard_normal((128, 3, size, size)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            row = {"model": name}
            try:
                model = _export(name, size, Path(tmp))
                row["parity_rel_err"] = _parity(model, size, device)
                row["ort_img_s"] = _ort_rate(model, x)
                traced = _trace_rate(model, x, device)
                if traced:
                    row["trace_img_s"], row["trace_fixed_s"] = traced
                    row["trace_vs_ort"] = row["trace_img_s"] / row["ort_img_s"]
                row["status"] = "ok"
            except Exception as err:  # one model's failure must not stop the table
                row["status"] = f"failed: {str(err).splitlines()[0][:100]}"
            rows.append(row)
            print(f"{name}: {row}", file=sys.stderr)
    return rows


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--json")
    parser.add_argument("--device", default="cpu", help="torch side: cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # strict fp32 on GPUs too (cuDNN would use TF32 for convs by default: ~1e-3 errors)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    print(f"torch {torch.__version__} on {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    rows = run(args.models.split(","), args.size, args.device)
    print(f"{'model':<22}{'parity rel.err':>15}{'ORT img/s':>11}{'trace img/s':>13}"
          f"{'trace/ORT':>11}{'fixed s':>9}  status")
    for r in rows:
        print(f"{r['model']:<22}{_fmt(r.get('parity_rel_err'), '.1e'):>15}"
              f"{_fmt(r.get('ort_img_s'), '.0f'):>11}{_fmt(r.get('trace_img_s'), '.1f'):>13}"
              f"{_fmt(r.get('trace_vs_ort'), '.3f'):>11}{_fmt(r.get('trace_fixed_s'), '.1f'):>9}"
              f"  {r['status']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
