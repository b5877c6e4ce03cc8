"""A run's outputs (model, its external weights, report, plan) appear together at the end
of the run or not at all, and a run that stops on the way leaves the previous ones."""
from __future__ import annotations

import json

import onnx
import pytest
from conftest import feeds_for, run_model

from gpp_onnx import files, report
from gpp_onnx.cli import main
from gpp_onnx.samples import sample_cnn


def test_an_interrupt_between_the_outputs_keeps_the_previous_ones(tmp_path, monkeypatch):
    """A run that stops after its model is written but before its report leaves the files
    of the previous run at those paths as they were (the model at -o was lost with the
    new one, leaving the old report beside no model); a finished run's report gives the
    written file's size."""
    src, out, plan = tmp_path / "model.onnx", tmp_path / "out.onnx", tmp_path / "p.json"
    onnx.save(sample_cnn(), src)
    run = ["prune", str(src), "--no-latency", "--plan-out", str(plan), "-o", str(out)]
    assert main([*run, "--ratio", "0.5"]) == 0
    rep = json.loads(out.with_suffix(".report.json").read_text())
    assert rep["after"]["file_bytes"] == out.stat().st_size
    previous = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "to_json", interrupted)  # after the model is saved
    assert main([*run, "--ratio", "0.3"]) == 130
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == previous


def test_a_model_with_its_weights_beside_it_is_moved_with_them(tmp_path, monkeypatch):
    """A model over 2 GB (forced here) is written with its weights file beside it: both
    wait until the block ends, and an interrupt leaves the previous pair as it was."""
    monkeypatch.setattr(files, "serialize", lambda model: None)
    dest = tmp_path / "o.onnx"
    with files.Outputs() as out:
        out.save(sample_cnn(0), dest)
        assert not dest.exists() and out.staged(dest).with_suffix(".onnx.data").exists()
    previous = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(previous) == ["o.onnx", "o.onnx.data"]
    assert len(run_model(dest, feeds_for(sample_cnn(0)))) == 1
    with pytest.raises(KeyboardInterrupt), files.Outputs() as out:
        out.save(sample_cnn(1), dest)
        raise KeyboardInterrupt
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == previous
