"""Prune the torchvision classification zoo with gpp-onnx and tabulate the outcome.

    python tools/zoo.py                                  # default list, normal input sizes
    python tools/zoo.py --size 64 --exporters legacy     # faster, reduced inputs
    python tools/zoo.py --all --json /tmp/zoo.json       # every model, both exporters

Each (model, exporter) pair is exported with random weights in eval mode, pruned with
``PruneConfig(ratio=...)`` and reported on one table row; a failing pair is recorded
(``export failed: ...`` / ``prune failed: ...``) and the run goes on. Rows are written
to the JSON file after every pair, so an interrupted run keeps what it measured.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import json
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

ALL_MODELS = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
    "wide_resnet50_2", "vgg11", "vgg16", "vgg11_bn", "vgg16_bn", "alexnet",
    "squeezenet1_0", "squeezenet1_1", "densenet121", "densenet161", "densenet169",
    "densenet201", "googlenet", "inception_v3", "mobilenet_v2", "mobilenet_v3_small",
    "mobilenet_v3_large", "mnasnet0_5", "mnasnet1_0", "shufflenet_v2_x0_5",
    "shufflenet_v2_x1_0", "efficientnet_b0", "efficientnet_b3", "efficientnet_v2_s",
    "regnet_x_400mf", "regnet_y_400mf", "convnext_tiny", "vit_b_16",
]
DEFAULT_MODELS = [
    "resnet18", "resnet50", "resnext50_32x4d", "vgg11_bn", "alexnet", "squeezenet1_1",
    "densenet121", "googlenet", "inception_v3", "mobilenet_v2", "mobilenet_v3_small",
    "mnasnet0_5", "shufflenet_v2_x0_5", "efficientnet_b0", "regnet_y_400mf",
    "convnext_tiny", "vit_b_16",
]
MODEL_KWARGS = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}
MIN_SIDE = {"inception_v3": 75}     # smaller inputs collapse to zero spatial size
FIXED_SIDE = {"vit_b_16": 224}      # position embeddings are built for exactly 224
# the legacy exporter only handles AdaptiveAvgPool2d(7 / 6) when that divides the feature
# map, and dynamo turns the upsampling pool of small inputs into GatherND: keep 224
FIXED_SIDE.update({n: 224 for n in ALL_MODELS if n.startswith(("vgg", "alexnet"))})


def input_shape(name: str, size: int | None) -> tuple[int, int, int, int]:
    """NCHW export shape: the model's normal size, or ``size`` where the model allows it."""
    from adapters.pytorch import sample_input_shape

    if size is None:
        return sample_input_shape(name)
    side = FIXED_SIDE.get(name, max(size, MIN_SIDE.get(name, 1)))
    return (1, 3, side, side)


def one_line(err: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().splitlines()
    cause = [t for t in text if t.startswith("<class ")]  # torch.onnx's "Exception summary"
    return f"{type(err).__name__}: {(cause or text or [''])[0]}"[:300]


@contextlib.contextmanager
def stdout_to_stderr():
    """torch's C++ side dumps whole graphs to stdout on export errors: keep the table clean."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def perturb(model, shape, seed: int = 0):
    """Make the masked-equivalence check meaningful and well conditioned. torchvision's own
    init leaves outputs that ignore the input (ViT's zero head, googlenet's vanishing
    signal), trivial norm statistics and 1e-6 layer scales; redrawing weights instead makes
    deep nets explode (efficientnet_v2_s: |logits| ~ 1e9, float32 round-off ~ 70 %). So:
    redraw all-zero weights, randomise biases, norm affines and other constant parameters,
    then calibrate BatchNorm statistics on random inputs (as training would), slightly
    contracting. Checked: float32-vs-float64 logits differ <= 1.4e-6 on the whole zoo."""
    import torch

    nn, gen = torch.nn, torch.Generator().manual_seed(seed)

    def uniform(t, lo, hi):
        t.copy_(torch.rand(t.shape, generator=gen) * (hi - lo) + lo)

    with torch.no_grad():
        for name, p in model.named_parameters():
            same = p.numel() > 1 and bool((p == p.flatten()[0]).all())
            if name.endswith("bias"):
                uniform(p, -0.1, 0.1)
            elif p.dim() >= 2 and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            elif same:
                uniform(p, *((-0.1, 0.1) if float(p.flatten()[0]) == 0 else (0.5, 1.5)))
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batch
        model.train()
        model(torch.randn((8, *shape[1:]), generator=gen))
        for m in bns:  # gain 0.8 per BN: exactly normalised random deep nets are chaotic
            m.running_var *= 1.5  # (resnet152: float32 round-off amplified to 3e-4)
    return model.eval()


def output_spread(model, shape) -> float:
    """Relative difference of the outputs for two random inputs (~0: output is constant)."""
    import torch

    x = torch.randn((2, *shape[1:]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x)
    return float((y[0] - y[1]).norm() / max(float(y[0].norm()), 1e-30))


def export(name: str, exporter: str, shape, path: Path, plain: bool, row: dict) -> Path:
    """Export with a batch-1 sample; a dynamo failure is retried from a batch-2 sample."""
    from adapters.pytorch import export_torch, load_torchvision

    model = load_torchvision(name, **MODEL_KWARGS.get(name, {})).eval()
    model = model if plain else perturb(model, shape)
    row["output_spread"] = output_spread(model, shape)
    with stdout_to_stderr():
        try:
            return export_torch(model, path, shape, exporter=exporter)
        except Exception as err:
            if exporter != "dynamo":
                raise
            row["export_note"] = f"batch-1 sample failed ({one_line(err)}); batch-2 sample used"
            return export_torch(model, path, (2, *shape[1:]), exporter=exporter)


def group_counts(groups: list[dict]) -> dict:
    """Group totals and the most common reasons a group is kept whole."""
    reasons = collections.Counter(g["reason"].split(": ", 1)[-1] for g in groups
                                  if not g["prunable"])
    prunable = sum(1 for g in groups if g["prunable"])
    return {"groups": len(groups), "prunable": prunable,
            "blocked_reasons": dict(reasons.most_common(8))}


def analysis_counts(path: Path) -> dict:
    """Group counts straight from the analysis (used when pruning itself failed)."""
    from gpp_onnx.pipeline import load_normalized

    try:
        _, _, analysis = load_normalized(path)
    except Exception as err:  # the analysis itself may be what failed
        return {"analysis_error": one_line(err)}
    return group_counts([{"prunable": g.prunable, "reason": g.reason}
                         for g in analysis.groups])


def prune(path: Path, ratio: float, latency: bool = True) -> dict:
    import gpp_onnx

    res = gpp_onnx.prune(path, path.with_suffix(".pruned.onnx"),
                         gpp_onnx.PruneConfig(ratio=ratio, latency=latency))
    row = group_counts(res.report["groups"])
    row.update(params=[res.before.params, res.after.params],
               macs=[res.before.macs, res.after.macs], latency_ratio=res.latency_ratio,
               equivalence_error=res.equivalence_error)
    return row


def run_one(name: str, exporter: str, ratio: float, size: int | None, work: Path,
            plain: bool = False, latency: bool = True) -> dict:
    """Export and prune one model; never raises (the failure goes into the row)."""
    shape = input_shape(name, size)
    row = {"model": name, "exporter": exporter, "input_shape": list(shape)}
    t0 = time.perf_counter()
    path = work / f"{name}.{exporter}.onnx"
    stage = "export"
    try:
        export(name, exporter, shape, path, plain, row)
        row["export_seconds"] = round(time.perf_counter() - t0, 1)
        stage = "prune"
        row.update(prune(path, ratio, latency))
        row["status"] = "ok"
    except Exception as err:  # one model must never stop the zoo
        row["status"] = f"{stage} failed: {one_line(err)}"
        row["traceback"] = traceback.format_exc().splitlines()[-25:]
        if stage == "prune" and path.exists():
            row.update(analysis_counts(path))
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def fmt_ratio(pair) -> str:
    return f"{human(pair[0])}→{human(pair[1])} ({pair[1] / max(pair[0], 1):.2f})" if pair else "-"


def human(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def fmt_row(r: dict) -> list[str]:
    share = f"{r['prunable']}/{r['groups']}" if "groups" in r else "-"
    lat, err = r.get("latency_ratio"), r.get("equivalence_error")
    err = "-" if err is None else f"{err:.1e}" + (
        " (vacuous: output ignores input)" if r.get("output_spread", 1) < 1e-6 else "")
    return [r["model"], r["exporter"], "x".join(map(str, r["input_shape"][2:])), share,
            fmt_ratio(r.get("params")), fmt_ratio(r.get("macs")),
            "-" if lat is None else f"{lat:.2f}", err,
            r["status"] + (" (batch-2 export)" if "export_note" in r else ""),
            f"{r['seconds']:.0f}s"]


HEADER = ["model", "exporter", "input", "prunable/groups", "params before→after (ratio)",
          "MACs before→after (ratio)", "latency ratio", "masked eq. err", "status", "time"]


def table(rows: list[dict]) -> str:
    """A Markdown table (readable as plain text too)."""
    lines = [HEADER, ["---"] * len(HEADER)] + [fmt_row(r) for r in rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", help="comma-separated torchvision names (default: a few per family)")
    p.add_argument("--all", action="store_true", help="every model of the zoo")
    p.add_argument("--exporters", default="legacy,dynamo", help="legacy,dynamo or one of them")
    p.add_argument("--ratio", type=float, default=0.5, help="channel fraction removed per group")
    p.add_argument("--size", type=int, help="input side in pixels where the model allows it "
                   "(default: each model's normal size)")
    p.add_argument("--out", type=Path, help="folder for the exported models (default: temporary)")
    p.add_argument("--keep", action="store_true", help="keep exported/pruned models in --out")
    p.add_argument("--plain-init", action="store_true", help="keep torchvision's own init "
                   "(see perturb: some outputs then ignore the input)")
    p.add_argument("--json", type=Path, help="write all rows (with tracebacks) here")
    args = p.parse_args(argv)
    if args.models and args.all:
        p.error("give --models or --all, not both")
    args.models = (ALL_MODELS if args.all else args.models.split(",") if args.models
                   else DEFAULT_MODELS)
    args.exporters = args.exporters.split(",")
    return args


def clean(work: Path, stem: str, keep: bool) -> None:
    """Delete what one pair wrote (model, pruned model, report, weight sidecars)."""
    if not keep:
        for f in work.glob(f"{stem}.*"):
            f.unlink(missing_ok=True)
    gc.collect()


def main(argv=None) -> int:
    args = parse_args(argv)
    work = args.out or Path(tempfile.mkdtemp(prefix="gpp-zoo-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    jobs = [(m, e) for m in args.models for e in args.exporters]
    for i, (name, exporter) in enumerate(jobs, 1):
        print(f"[{i}/{len(jobs)}] {name} ({exporter}) ...", file=sys.stderr, flush=True)
        rows.append(run_one(name, exporter, args.ratio, args.size, work, args.plain_init))
        print(f"[{i}/{len(jobs)}] {name} ({exporter}): {rows[-1]['status']} "
              f"in {rows[-1]['seconds']:.0f}s", file=sys.stderr, flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1, default=str))
        clean(work, f"{name}.{exporter}", args.keep)
    if args.out is None and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    elif args.keep:
        print(f"models kept in {work}", file=sys.stderr)
    print(table(rows))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
