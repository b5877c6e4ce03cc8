"""gpp's work folder and its warnings: a work folder at the output's path, checkpoints a
run stopped while saving, damaged checkpoints and states, a latency target missed, an LDA
on one image per class."""
from __future__ import annotations

import json

import pytest

from gpp_onnx import latency, workdir
from gpp_onnx.cli import main


def _gpp(trained, out, *extra):
    return main(["-q", "gpp", str(trained), "--data", "digits", "--target-macs", "0.5",
                 "--budget-epochs", "1", "--rounds", "1", "--no-latency", "-o", str(out),
                 *extra])


@pytest.mark.parametrize("at", ["o.onnx", "o.report.json"])
def test_a_work_dir_at_the_outputs_path_is_refused_before_the_work(trained, tmp_path, capsys,
                                                                   at):
    code = _gpp(trained, tmp_path / "o.onnx", "--work-dir", str(tmp_path / at))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is the path of" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_checkpoints_without_a_state_name_the_folder_to_remove(trained, tmp_path, capsys):
    """A run killed between its first checkpoint and its state.json leaves round-1.onnx
    alone: both a fresh run and --resume say to remove it (the fresh run's advice used to
    be to choose another folder, --resume's to drop --resume, which then failed)."""
    work = tmp_path / "o.onnx.gpp-work"
    work.mkdir()
    (work / "round-1.onnx").write_bytes(trained.read_bytes())
    for extra in ((), ("--resume",)):
        assert _gpp(trained, tmp_path / "o.onnx", *extra) == 2
        (err,) = capsys.readouterr().err.strip().splitlines()
        assert "stopped while saving its first round" in err and "remove" in err


def test_a_damaged_checkpoint_is_named_on_resume(trained, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o.onnx"
    monkeypatch.setattr(workdir, "remove", lambda work: None)   # keep the finished run's
    assert _gpp(trained, out) == 0
    work = tmp_path / "o.onnx.gpp-work"
    state = json.loads((work / "state.json").read_text())
    round_file = work / f"round-{state['done']}.onnx"
    round_file.write_bytes(round_file.read_bytes()[:3000])
    out.unlink()
    out.with_suffix(".report.json").unlink()
    capsys.readouterr()
    assert _gpp(trained, out, "--resume") == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert f"checkpoint {round_file} is damaged" in err and f"remove {work}" in err
    assert not out.exists()


def test_a_state_with_values_of_the_wrong_type_is_refused(trained, tmp_path, capsys):
    work = tmp_path / "o.onnx.gpp-work"
    work.mkdir()
    (work / "state.json").write_text(json.dumps({"fingerprint": "x", "done": 1, "epochs": 0.5,
                                                 "rows": None, "best": None, "stop": None}))
    assert _gpp(trained, tmp_path / "o.onnx", "--resume") == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert "is not a state this tool wrote (rows of the wrong type)" in err


def test_a_latency_target_gpp_misses_is_a_warning(trained, tmp_path, monkeypatch):
    monkeypatch.setattr(latency, "measure", lambda *a, **k: latency.LatencyCheck(0.8))
    out = tmp_path / "o.onnx"
    assert main(["-q", "gpp", str(trained), "--data", "digits", "--target-latency", "0.5",
                 "--budget-epochs", "1", "--rounds", "1", "-o", str(out)]) == 0
    warnings = json.loads(out.with_suffix(".report.json").read_text())["warnings"]
    assert any("above --target-latency 0.5" in w for w in warnings)


def test_the_discriminant_criterion_needs_two_images_per_class(trained, tmp_path, capsys):
    assert _gpp(trained, tmp_path / "o.onnx", "--per-class", "1") == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert "--per-class 1" in err and "two images of every class" in err
    assert list(tmp_path.iterdir()) == []


def test_the_number_of_workers_is_not_part_of_a_runs_fingerprint(trained):
    import onnx

    from gpp_onnx import DataOptions, GppOptions
    from gpp_onnx.config import PruneConfig

    model = onnx.load(trained)
    a, b = (workdir.fingerprint(model, PruneConfig(data=DataOptions("digits", workers=w)),
                                GppOptions()) for w in (0, 3))
    c = workdir.fingerprint(model, PruneConfig(data=DataOptions("digits", limit=100)),
                            GppOptions())
    assert a == b != c


def test_resume_with_a_changed_setting_names_it(trained, tmp_path, capsys, monkeypatch):
    """--resume after a setting changed was refused as 'another model or other settings',
    naming neither; the refusal names the setting, its saved and its new value."""
    out = tmp_path / "o.onnx"
    monkeypatch.setattr(workdir, "remove", lambda work: None)   # keep the finished run's
    assert _gpp(trained, out) == 0
    out.unlink()
    out.with_suffix(".report.json").unlink()
    capsys.readouterr()
    assert _gpp(trained, out, "--resume", "--acc-floor", "0.2") == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert "acc_floor 0.05 (now 0.2)" in err and not out.exists()
    assert _gpp(trained, out, "--resume") == 0


def test_the_number_of_processes_is_part_of_a_runs_fingerprint(trained, monkeypatch):
    """Each process trains on its share of a batch, so a run resumed under torchrun with
    another number of processes ended with a model neither number computes: it was
    accepted; the refusal names the number."""
    import onnx

    from gpp_onnx import DataOptions, GppOptions, distributed
    from gpp_onnx.config import PruneConfig

    model, config = onnx.load(trained), PruneConfig(data=DataOptions("digits"))
    one = workdir.fingerprint(model, config, GppOptions())
    saved = {"settings": workdir.settings(config, GppOptions())}
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    assert workdir.fingerprint(model, config, GppOptions()) != one
    assert "processes 1 (now 2)" in workdir._changed(saved, workdir.settings(config,
                                                                              GppOptions()))
