"""Fail before the work: an unusable output or data source is a one-line error (exit 2)
raised before the model is loaded, and nothing is written."""
from __future__ import annotations

import os
import shutil
from collections import namedtuple
from pathlib import Path

import onnx
import pytest

from gpp_onnx import pipeline, preflight
from gpp_onnx.cli import main
from gpp_onnx.samples import GraphBuilder


@pytest.fixture
def model(tmp_path, monkeypatch) -> Path:
    b = GraphBuilder((1, 1, 8, 8), seed=0)
    path = tmp_path / "in" / "m.onnx"
    path.parent.mkdir()
    onnx.save(b.build(b.gemm(b.flatten(b.gap(b.act(b.conv("input", 4), "Relu"))), 3)), path)

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the checks")

    monkeypatch.setattr(pipeline, "load_normalized", never)
    monkeypatch.setattr(pipeline.model_io, "load", never)
    return path


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _run(capsys, root: Path, argv: list[str]) -> tuple[int, str]:
    before = _files(root)
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert _files(root) == before, "something was written"
    assert len(err) >= 1 and "Traceback" not in "\n".join(err)
    return code, err[-1]


def _prune(model: Path, out, *extra) -> list[str]:
    return ["prune", str(model), "-o", str(out), "--no-latency", *map(str, extra)]


def test_output_folder_is_a_file(tmp_path, model, capsys):
    (tmp_path / "blocker").write_text("x")
    code, err = _run(capsys, tmp_path, _prune(model, tmp_path / "blocker" / "o.onnx"))
    assert code == 2 and err.startswith("gpp-onnx: error: cannot write")
    assert "not a folder" in err


@pytest.mark.parametrize("command", ["prune", "gpp"])
def test_output_that_is_a_folder(tmp_path, model, capsys, command):
    """-o naming an existing folder: refused before the model is read (it used to fail
    after the work, in the final rename)."""
    (tmp_path / "out.onnx").mkdir()
    argv = _prune(model, tmp_path / "out.onnx") if command == "prune" else [
        "gpp", str(model), "-o", str(tmp_path / "out.onnx"), "--data", "digits",
        "--target-macs", "0.5", "--no-latency"]
    code, err = _run(capsys, tmp_path, argv)
    assert code == 2 and err.startswith("gpp-onnx: error: cannot write")
    assert "it is a folder - name a file in it" in err


def test_unwritable_output_folder(tmp_path, model, capsys, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()

    def refuse(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", dir)

    monkeypatch.setattr(preflight.tempfile, "mkstemp", refuse)
    code, err = _run(capsys, tmp_path, _prune(model, out / "o.onnx", "--data", "digits"))
    assert code == 2 and "ro is not writable (Permission denied)" in err


def test_read_only_folder_for_real(tmp_path, model, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        if os.access(out, os.W_OK):
            pytest.skip("this user can write to a read-only folder (root)")
        code, err = _run(capsys, tmp_path, _prune(model, out / "o.onnx"))
        assert code == 2 and "not writable" in err
    finally:
        out.chmod(0o755)


def test_plan_out_folder_checked_too(tmp_path, model, capsys):
    (tmp_path / "blocker").write_text("x")
    code, err = _run(capsys, tmp_path, _prune(model, tmp_path / "o.onnx", "--plan-out",
                                              tmp_path / "blocker" / "p.json"))
    assert code == 2 and "p.json" in err


def test_no_disk_room(tmp_path, model, capsys, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage(10, 10, 0))
    code, err = _run(capsys, tmp_path, _prune(model, tmp_path / "o.onnx"))
    assert code == 2 and "free" in err and "-o" in err


def test_no_disk_room_for_the_inputs_external_data(tmp_path, model, capsys, monkeypatch):
    """The room needed counts the weights beside the model, not only its small .onnx."""
    m = onnx.load(model)
    ext = tmp_path / "ext" / "m.onnx"
    ext.parent.mkdir()
    onnx.save(m, ext, save_as_external_data=True, location="m.weights", size_threshold=0)
    usage = namedtuple("usage", "total used free")
    room = ext.stat().st_size + 100       # the .onnx fits, its weights do not
    assert (ext.parent / "m.weights").stat().st_size > 100
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage(room, 0, room))
    code, err = _run(capsys, tmp_path, _prune(ext, tmp_path / "o.onnx"))
    assert code == 2 and "free" in err and "-o" in err


@pytest.mark.parametrize("out", ["blocker", "blocker/sub"])
def test_demo_folder_that_is_a_file(tmp_path, capsys, out):
    """demo --out naming a file (or a folder under one) was an internal error (exit 1)."""
    (tmp_path / "blocker").write_text("x")
    code, err = _run(capsys, tmp_path, ["demo", "--out", str(tmp_path / out)])
    assert code == 2 and err.startswith("gpp-onnx: error: cannot write")
    assert "blocker is not a folder" in err


def test_missing_data_source(tmp_path, model, capsys):
    code, err = _run(capsys, tmp_path, _prune(model, tmp_path / "o.onnx", "--data",
                                              tmp_path / "nowhere"))
    assert code == 2 and "unknown data source" in err
    code, err = _run(capsys, tmp_path, ["evaluate", str(model), "--data",
                                        str(tmp_path / "nowhere.npz")])
    assert code == 2 and "unknown data source" in err


def test_checks_leave_nothing_and_pass_for_a_new_folder(tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(b"0" * 100)
    preflight.check_output(src, tmp_path / "new" / "deeper" / "o.onnx")
    assert _files(tmp_path) == ["m.onnx"]
    assert shutil.disk_usage(tmp_path).free > 100
