"""gpp --grow: the grow phase before the push/prune rounds, a target relative to the
input model, the grow checkpoint a resumed run starts from, and its bad input."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from gpp_onnx import DataOptions, GppOptions, gpp, schedule
from gpp_onnx.cli import main
from gpp_onnx.config import PruneConfig
from gpp_onnx.graph import GraphView
from gpp_onnx.grow import GrowConfig
from gpp_onnx.stats import count

# one module, two rounds, 4 epochs: 2 grow the module, 2 go to the rounds
ARGS = ["--data", "digits", "--grow", "1", "--target-macs", "1.0", "--rounds", "2",
        "--budget-epochs", "4", "--round-to", "1", "--no-latency"]


@pytest.fixture(scope="module")
def finished(trained, tmp_path_factory):
    """An uninterrupted `gpp --grow 1 --target-macs 1.0` on the command line."""
    out = tmp_path_factory.mktemp("gpp-grow-out") / "small.onnx"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["-q", "gpp", str(trained), "-o", str(out), *ARGS])
    assert code == 0
    out.with_suffix(".summary.txt").write_text(printed.getvalue())
    return out


def macs(path: Path) -> int:
    return count(GraphView(onnx.load(path))).macs


def weights(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}


def test_grow_then_prune_back_ends_at_the_input_macs(trained, finished):
    onnx.checker.check_model(onnx.load(finished), full_check=True)
    sess = ort.InferenceSession(str(finished), providers=["CPUExecutionProvider"])
    assert sess.run(None, {sess.get_inputs()[0].name: np.zeros((2, 1, 8, 8), np.float32)}
                    )[0].shape == (2, 10)
    rep = json.loads(finished.with_suffix(".report.json").read_text())
    grow = rep["grow"]
    (module,) = grow["modules"]
    assert module["kept"] and module["at"] and module["params"] > 0
    # the target is the input's MACs (counted here from the file), not the grown model's
    start = macs(trained)
    assert rep["before"]["macs"] == start and grow["macs"] == start + module["macs"]
    assert macs(finished) <= start < grow["macs"]
    # the rounds interpolate from the grown cost G to the target: round k keeps
    # G (I / G)^(k/2); round 1 so still holds more than the input's MACs
    r1, r2 = (r["macs"] for r in rep["rounds"])
    assert start < r1 <= grow["macs"] * (start / grow["macs"]) ** 0.5 * (1 + 1e-9)
    assert r2 <= start
    # the rounds cut the grown model: no warning that nothing was cut (the result may
    # hold more params than the input)
    assert not any("nothing was cut" in w for w in rep["warnings"])
    # the epochs: 2 growing the module, 2 in the rounds
    assert grow["epochs"] == pytest.approx(2.0) and rep["epochs_used"] == pytest.approx(4.0)
    # the result's module, branch by branch (the identity branch first)
    (after,) = rep["grow"]["after"]
    assert after["output"] == module["output"]
    widths = {b: stop - start for b, (start, stop) in module["branches"].items()}
    assert list(after["branches"]) == list(widths)
    assert all(1 <= v["width"] <= widths[b] for b, v in after["branches"].items())


def test_the_summary_shows_the_grow_phase(finished):
    text = finished.with_suffix(".summary.txt").read_text()
    rep = json.loads(finished.with_suffix(".report.json").read_text())
    (module,) = rep["grow"]["modules"]
    (after,) = rep["grow"]["after"]
    grown = "/".join(str(stop - start) for start, stop in module["branches"].values())
    pruned = "/".join(str(v["width"]) for v in after["branches"].values())
    assert f"{grown} -> {pruned}" in text and "kept 1 of 1 module(s), 2.00 epochs" in text
    assert "2.00 left to the rounds" in text


def test_a_resumed_run_does_not_grow_again(trained, finished, tmp_path, monkeypatch):
    config = PruneConfig(data=DataOptions("digits"), target_macs=1.0, rounds=2, round_to=1,
                         latency=False)
    options = GppOptions(budget_epochs=4.0, grow=GrowConfig(max_modules=1))
    out = tmp_path / "out.onnx"
    work = tmp_path / "out.onnx.gpp-work"

    def killed(*_):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # killed right after the grow phase
        m.setattr(schedule, "run_round", killed)
        with pytest.raises(KeyboardInterrupt):
            gpp(trained, out, config, options)
    saved = json.loads((work / "state.json").read_text())
    assert saved["done"] == 0 and saved["grown"]["modules"][0]["kept"]
    assert (work / "grown.onnx").exists() and not out.exists()
    grown = []
    real = schedule.grow_phase
    monkeypatch.setattr(schedule, "grow_phase", lambda *a: grown.append(1) or real(*a))
    res = gpp(trained, out, config, GppOptions(budget_epochs=4.0, resume=True,
                                               grow=GrowConfig(max_modules=1)))
    assert grown == [] and res.report["grow"] == json.loads(
        finished.with_suffix(".report.json").read_text())["grow"]
    # the resumed run ends with the model an uninterrupted one writes
    a, b = weights(finished), weights(out)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_other_grow_settings_do_not_resume_the_grow(trained, tmp_path, monkeypatch):
    config = PruneConfig(data=DataOptions("digits"), target_macs=1.0, rounds=2, round_to=1,
                         latency=False)
    out = tmp_path / "out.onnx"
    monkeypatch.setattr(schedule, "run_round", lambda *_: (_ for _ in ()).throw(
        KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        gpp(trained, out, config, GppOptions(budget_epochs=4.0, grow=GrowConfig(max_modules=1)))
    with pytest.raises(Exception, match="other settings"):
        gpp(trained, out, config, GppOptions(budget_epochs=4.0, resume=True,
                                             grow=GrowConfig(max_modules=1, min_gain=1.0)))


@pytest.mark.parametrize("extra, message", [
    (["--grow", "1", "--ratio", "0.5"], "--grow prunes back to a cost relative to the input"),
    (["--grow", "1", "--target-macs", "1.0"], "training steps per grown module"),
    (["--grow", "1", "--target-macs", "1.0", "--budget-epochs", "3"],
     "training steps per round"),
    (["--grow", "1", "--target-macs", "1.0", "--grow-share", "0"], "--grow-share"),
    (["--grow", "1", "--target-macs", "1.0", "--budget-epochs", "4", "--at", "nothere"],
     "--at nothere: cannot grow there"),
])
def test_bad_grow_input_is_a_one_line_error_and_writes_nothing(trained, tmp_path, capsys,
                                                               extra, message):
    out = tmp_path / "o.onnx"
    code = main(["-q", "gpp", str(trained), "--data", "digits", "--rounds", "2",
                 "--budget-epochs", "1", "--no-latency", "-o", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
