"""Label-free pruning of third-party detectors and recognizers: fidelity to the original
after the cut, after the repair and after distillation, side by side.

    python tools/thirdparty.py fetch                  # the models (once; downloads)
    python tools/nolabel_thirdparty.py --out /tmp/nolabel-tp --json /tmp/nolabel-tp/results.json
    python tools/nolabel_thirdparty.py --models ppocrv4_rec,orientation --images 200

For each model of :data:`MODELS` (files from ``tools/thirdparty.py``'s cache), it makes
unlabelled images that fit the model (``tools/nolabel_images.py``: crops of scikit-learn's
sample photos, rendered text scenes, text lines or rotated pages; a training folder and a
separate test folder, other seeds) and prunes it through the command line, as a user would::

    gpp-onnx prune M --data TRAIN --ratio 0.5 --finetune-epochs E --batch-size B \\
        --input-shape S [--mean .. --std ..] --no-latency -o final.onnx

(an image folder without class folders: no labels, so the ``fisher`` criterion, the
least-squares repair to the original's outputs and distillation with BatchNorm on its
running statistics; ``--lr`` 0.01, the default). The JSON report gives the
fidelity on the run's held-out images (``--val-split``) after the cut, the repair and the
fine-tuning. With ``--variants`` (default) it also writes the cut alone (``--repair none
--finetune-epochs 0``) and the repair alone (``--finetune-epochs 0``), same plan
(``--plan``), and measures all three against the original on the test folder
(``gpp_onnx.pipeline.compare``, the same fidelity as ``gpp-onnx compare --data``).

A model with several inputs that another model's outputs feed (CRAFT's link refiner takes
the detector's score maps and features) is given them as a user would: the images go
through the feeding model (``Setup.feeder``, with the images' --mean/--std), and its
outputs, named as the refiner's inputs, are stored in one ``.npz`` for training and one
for testing (``gpp-onnx prune M --data train.npz``: one array per input, taken as it is).

The bar: repair improves on the cut and distillation improves on the repair, on every
output (relative error down, top-1 agreement of class outputs not down).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]
from _bench_common import GPP, git_state, machine, table, write_json  # noqa: E402
from nolabel_images import make_images  # noqa: E402
from thirdparty import DEFAULT_CACHE, MANIFEST, model_path  # noqa: E402

IMAGENET = ("0.485,0.456,0.406", "0.229,0.224,0.225")


@dataclass(frozen=True)
class Setup:
    images: str                   # nolabel_images kind
    mean: str | None = None       # --mean / --std as the model's own preprocessing does
    std: str | None = None
    gray: bool = False
    model: str | None = None      # the thirdparty.py entry, where the name differs
    extra: tuple = ()             # more gpp-onnx prune arguments
    feeder: str | None = None     # the thirdparty.py entry whose outputs are the inputs


# PP-OCRv4's DB head ends in two ConvTranspose layers, which the least-squares repair does
# not refit (Conv and Gemm only); keeping the two groups that feed them whole shows the rest
HEAD_KEPT = ("--ignore", "p2o.ConvTranspose.1", "--ignore", "conv2d_497.tmp_0")
MODELS = {
    "ppocrv4_det": Setup("text", *IMAGENET),
    "ppocrv4_det_head_kept": Setup("text", *IMAGENET, model="ppocrv4_det", extra=HEAD_KEPT),
    "ppocrv4_rec": Setup("line", "0.5,0.5,0.5", "0.5,0.5,0.5"),
    "nudenet_320n": Setup("photo"),                                    # x / 255
    "ddddocr_det": Setup("text", "0,0,0", "0.003921569,0.003921569,0.003921569"),  # 0..255
    "orientation": Setup("page", *IMAGENET),
    "open_nsfw": Setup("photo", "0.40784314,0.45882353,0.48235294",
                       "0.003921569,0.003921569,0.003921569"),         # BGR - caffe means
    "layout_cdla": Setup("page", *IMAGENET),
    "craft_refinenet": Setup("text", *IMAGENET, feeder="craftnet"),    # 2 inputs: the maps
}
DEFAULT_MODELS = "ppocrv4_det,ppocrv4_rec,nudenet_320n,ddddocr_det,orientation"
STAGES = (("cut", "after_cut"), ("repair", "after_repair"), ("distil", "after_finetune"))


def _hw(shape: str, nhwc: bool) -> tuple[int, int]:
    dims = [int(v) for v in shape.split(":")[-1].split(",")]
    return (dims[1], dims[2]) if nhwc else (dims[2], dims[3])


def _prune(src: Path, dst: Path, data: Path, shapes: tuple, setup: Setup, args,
           extra=()) -> dict:
    ratio = [] if "--plan" in extra else ["--ratio", str(args.ratio)]  # a plan fixes the cut
    cmd = [*GPP, "prune", str(src), "--data", str(data), *ratio,
           *[a for shape in shapes for a in ("--input-shape", shape)],
           "--batch-size", str(args.batch_size), "--no-latency",
           "--val-split", str(args.val_split), "-o", str(dst), *setup.extra, *extra]
    if setup.mean and not setup.feeder:
        cmd += ["--mean", setup.mean, "--std", setup.std]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        raise RuntimeError(f"{' '.join(cmd)} -> exit {proc.returncode}: {' | '.join(tail)}")
    rep = json.loads(dst.with_name(dst.stem + ".report.json").read_text())
    return {"report": rep, "seconds": round(seconds, 1)}


def _compare(src: Path, model: Path, test: Path, shapes: tuple, setup: Setup) -> dict:
    from gpp_onnx import pipeline
    from gpp_onnx.config import DataOptions, checked_input_shape

    mean = tuple(float(v) for v in setup.mean.split(",")) if setup.mean else None
    std = tuple(float(v) for v in setup.std.split(",")) if setup.std else None
    if setup.feeder:          # the arrays are the inputs as they are
        mean = std = None
    shape = (_shape_tuple(shapes[0]) if len(shapes) == 1
             else {s.rpartition(":")[0]: _shape_tuple(s) for s in shapes})
    cmp = pipeline.compare(src, model, checked_input_shape(shape), repeats=1,
                           data=DataOptions(str(test), mean, std, batch_size=16))
    return cmp.fidelity


def _shape_tuple(shape: str):
    return tuple(int(v) for v in shape.split(":")[-1].split(","))


def _fed(feeder: Path, images: Path, setup: Setup, h: int, w: int, out: Path) -> Path:
    """An .npz of `feeder`'s outputs on the images in folder `images` (prepared with the
    setup's mean and std), one array per output, under the output's name."""
    import numpy as np

    from gpp_onnx.data import DataSpec, iter_batches, load_dataset
    from gpp_onnx.verify import make_session

    mean = tuple(float(v) for v in setup.mean.split(",")) if setup.mean else None
    std = tuple(float(v) for v in setup.std.split(",")) if setup.std else None
    ds = load_dataset(DataSpec(str(images), 3, h, w, mean=mean, std=std, labels=False))
    session = make_session(str(feeder), "feeding model")
    name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]
    parts: dict[str, list] = {n: [] for n in names}
    for x, _ in iter_batches(ds, 1):          # the feeder fixes batch 1
        for n, v in zip(names, session.run(names, {name: x})):
            parts[n].append(v)
    np.savez(out, **{n: np.concatenate(v) for n, v in parts.items()})
    return out


def run_model(name: str, args) -> dict:
    setup = MODELS[name]
    entry = next(e for e in MANIFEST if e.name == (setup.model or name))
    shapes = entry.inputs
    src = model_path(Path(args.cache).expanduser(), entry)
    feeder = next((e for e in MANIFEST if e.name == setup.feeder), None)
    for path in (src, *([model_path(Path(args.cache).expanduser(), feeder)] if feeder else [])):
        if not path.exists():
            raise RuntimeError(f"{path} missing; run `python tools/thirdparty.py fetch`")
    image_shape = (feeder or entry).inputs[0]
    nhwc = _shape_tuple(image_shape)[-1] == 3
    h, w = _hw(image_shape, nhwc)
    work = Path(args.out) / name
    train = make_images(setup.images, args.images, h, w, work / "train", 0, setup.gray)
    test = make_images(setup.images, args.test_images, h, w, work / "test", 1, setup.gray)
    if feeder:
        fpath = model_path(Path(args.cache).expanduser(), feeder)
        train = _fed(fpath, train, setup, h, w, work / "train.npz")
        test = _fed(fpath, test, setup, h, w, work / "test.npz")
    final = work / "final.onnx"
    run = _prune(src, final, train, shapes, setup, args,
                 ["--finetune-epochs", str(args.finetune_epochs), "--lr", str(args.lr),
                  "--plan-out", str(work / "plan.json")])
    rep = run["report"]
    row = {"model": name, "kind": entry.kind, "images": setup.images,
           "train_images": args.images, "test_images": args.test_images,
           "params_ratio": rep["ratios"]["params"], "macs_ratio": rep["ratios"]["macs"],
           "seconds": run["seconds"], "distillation": rep.get("distillation"),
           "load_average": os.getloadavg(),
           "heldout": rep["fidelity"]}
    if args.variants:
        models = {"distil": final}
        for stage, extra in (("cut", ["--repair", "none"]), ("repair", [])):
            dst = work / f"{stage}.onnx"
            _prune(src, dst, train, shapes, setup, args,
                   ["--finetune-epochs", "0", "--plan", str(work / "plan.json"), *extra])
            models[stage] = dst
        row["test"] = {stage: _compare(src, models[stage], test, shapes, setup)
                       for stage, _ in STAGES}
    return row


def _cell(fid: dict | None) -> str:
    if not fid:
        return "-"
    text = f"{fid['relative_error']:.3f}"
    if "top1_agreement" in fid:
        text += f" / {fid['top1_agreement']:.3f}"
    return text


def _better(a: dict, b: dict) -> bool:
    """b improves on a: lower relative error, and no lower top-1 agreement."""
    return b["relative_error"] < a["relative_error"] and (
        b.get("top1_agreement", 1.0) >= a.get("top1_agreement", 0.0))


def verdict(stages: list[dict | None]) -> str:
    cut, rep, dis = stages
    if not (cut and rep and dis):
        return "-"
    return (("repair ok" if _better(cut, rep) else "REPAIR NO") + ", "
            + ("distil ok" if _better(rep, dis) else "DISTIL NO"))


def rows_of(row: dict) -> list[list[str]]:
    out = []
    for where, stages in (("held-out", {s: (row["heldout"] or {}).get(k) for s, k in STAGES}),
                          ("test", row.get("test"))):
        if not stages:
            continue
        names = next(v for v in stages.values() if v)
        for o in names:
            per = [stages[s][o] if stages[s] else None for s, _ in STAGES]
            out.append([row["model"], f"{row['params_ratio']:.2f}", where, o[:24],
                        *[_cell(p) for p in per], verdict(per)])
    return out


HEADERS = ["model", "params", "inputs", "output", "after cut", "after repair",
           "after distil", "bar"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=DEFAULT_MODELS, help=f"of: {', '.join(MODELS)}")
    p.add_argument("--out", default="/tmp/nolabel-thirdparty")
    p.add_argument("--json", help="write the rows here (rewritten after each model)")
    p.add_argument("--cache", default=str(DEFAULT_CACHE))
    p.add_argument("--images", type=int, default=300, help="training images per model")
    p.add_argument("--test-images", type=int, default=100)
    p.add_argument("--val-split", type=float, default=0.2)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--finetune-epochs", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument("--from-json", nargs="+", help="print the table of these results files")
    p.add_argument("--no-variants", dest="variants", action="store_false",
                   help="skip the cut-only / repair-only models and the test-folder compare")
    args = p.parse_args(argv)
    if args.from_json:
        rows = [r for f in args.from_json for r in json.loads(Path(f).read_text())["rows"]]
        return show(rows, args.markdown)
    rows = []
    for name in args.models.split(","):
        print(f"{name} ...", file=sys.stderr, flush=True)
        try:
            rows.append(run_model(name, args))
        except RuntimeError as err:
            rows.append({"model": name, "error": str(err)[-600:]})
            print(f"  failed: {err}", file=sys.stderr)
        if args.json:
            write_json(args.json, {"machine": machine(), "git": git_state(),
                                   "args": vars(args), "rows": rows})
    return show(rows, args.markdown)


def show(rows: list[dict], markdown: bool = False) -> int:
    body = [r for row in rows if "error" not in row for r in rows_of(row)]
    print("fidelity to the original: relative error / top-1 agreement (class outputs)")
    if markdown:
        print("\n".join(["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
                        + ["| " + " | ".join(r) + " |" for r in body]))
    else:
        print(table(HEADERS, body))
    for row in rows:
        if "error" in row:
            print(f"{row['model']}: {row['error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
