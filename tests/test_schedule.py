"""The gpp schedule: rounds of push -> prune -> fine-tune, best-model selection, the
checkpoints a killed run resumes from, and its bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from conftest import child_env

import gpp_onnx
from gpp_onnx import DataOptions, GppOptions, gpp
from gpp_onnx.cli import main
from gpp_onnx.config import PruneConfig, TrainOptions
from gpp_onnx.data import split
from gpp_onnx.errors import DataError
from gpp_onnx.graph import GraphView
from gpp_onnx.stats import count


def ort_accuracy(path: Path, ds) -> float:
    """Top-1 accuracy computed here, in onnxruntime, image by image batch."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    logits = sess.run(None, {name: np.asarray(ds.x[:], dtype=np.float32)})[0]
    return float((logits.argmax(1) == np.asarray(ds.y)).mean())


def held_out(model_path: Path):
    """The held-out split gpp makes (seed 0, 10%), rebuilt from the data independently."""
    spec_model = onnx.load(model_path)
    from gpp_onnx.evaluation import dataset_for

    ds = dataset_for(GraphView(spec_model), "digits", None, None, True, None, 0)
    return split(ds, 0.1, 0)[1]


def weights(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}


def test_gpp_meets_the_target_and_writes_the_best_held_out_model(trained, tmp_path):
    out = tmp_path / "small.onnx"
    res = gpp(trained, out, PruneConfig(data=DataOptions("digits"), target_macs=0.5, rounds=2,
                                        round_to=1, latency=False),
              GppOptions(budget_epochs=2.0))
    before, after = count(GraphView(onnx.load(trained))), count(GraphView(onnx.load(out)))
    assert after.macs <= 0.5 * before.macs
    assert len(res.rows) == 2 and res.epochs == pytest.approx(2.0)
    # the written model's held-out accuracy, measured here, is the one reported ...
    acc = ort_accuracy(out, held_out(trained))
    assert acc == pytest.approx(res.best["accuracy"], abs=1e-9)
    # ... and no model of the run that met the target did better
    met = [r[k] for r in res.rows if r["macs"] <= 0.5 * before.macs
           for k in ("accuracy_after_cut", "accuracy_after_finetune") if r.get(k) is not None]
    assert met and acc == pytest.approx(max(met), abs=1e-9)
    rep = json.loads(out.with_suffix(".report.json").read_text())
    assert rep["epochs_used"] == pytest.approx(2.0) and len(rep["rounds"]) == 2
    assert {"accuracy_after_push", "offdiag_after_push", "params", "macs"} <= set(rep["rounds"][0])
    assert not (tmp_path / "small.onnx.gpp-work").exists()  # nothing left to resume
    # the written model's fidelity to the input on the held-out images, computed here
    ds = held_out(trained)
    x = np.asarray(ds.x[:], dtype=np.float32)
    t, m = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {
        "input": x})[0].astype(np.float64) for p in (trained, out))
    fid = next(iter(rep["fidelity"]["result"].values()))
    assert fid["relative_error"] == pytest.approx(
        np.sqrt(((m - t) ** 2).sum() / (t ** 2).sum()), rel=1e-6)
    assert fid["top1_agreement"] == pytest.approx((m.argmax(1) == t.argmax(1)).mean(), abs=1e-9)
    assert rep["equivalence_tolerance"] == 1e-5 and 0 <= rep["model_noise"] < 1e-5
    assert max(r["equivalence_relative_error"] for r in rep["rounds"]) < 1e-5


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gpp_onnx", "gpp", *args]


def test_a_killed_run_resumes_after_its_last_finished_round(trained, tmp_path):
    args = ["--data", "digits", "--target-macs", "0.4", "--rounds", "3", "--budget-epochs", "3",
            "--round-to", "1", "--no-latency"]
    env = child_env()
    full = tmp_path / "full.onnx"
    subprocess.run(_cli(str(trained), "-o", str(full), *args), check=True, env=env,
                   capture_output=True)
    out = tmp_path / "out.onnx"
    work = tmp_path / "out.onnx.gpp-work"
    proc = subprocess.Popen(_cli(str(trained), "-o", str(out), *args), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    # state.json is written (atomically) after round-K.onnx: it marks a round finished
    while not (work / "state.json").exists() and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = json.loads((work / "state.json").read_text())["done"]
    assert 1 <= done < 3 and not out.exists()
    # the interrupted run's folder is neither overwritten nor continued with other settings
    for extra, message in (([], "pass --resume"),
                           (["--resume", "--seed", "1"], "other settings: seed 0 (now 1)")):
        refused = subprocess.run(_cli(str(trained), "-o", str(out), *args, *extra), env=env,
                                 capture_output=True, text=True)
        assert refused.returncode == 2 and message in refused.stderr and not out.exists()
    again = subprocess.run(_cli(str(trained), "-o", str(out), "--resume", *args), env=env,
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert f"resuming after round {done} of 3" in again.stderr
    assert "gpp-onnx: round 1 of 3" not in again.stderr.splitlines()  # not redone
    a, b = weights(full), weights(out)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


@pytest.mark.parametrize("extra, message", [
    (["--budget-epochs", "0.1"], "training steps per round"),
    (["--limit", "15"], "class discriminants need at least 2"),
    (["--resume"], "holds no run to continue"),
])
def test_bad_gpp_input_is_a_one_line_error_and_writes_nothing(trained, tmp_path, capsys, extra,
                                                               message):
    out = tmp_path / "o.onnx"
    code = main(["-q", "gpp", str(trained), "--data", "digits", "--target-macs", "0.5", "-o", str(out),
                 "--no-latency", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("state", ["{not json", "[]", '{"fingerprint": "x"}'])
def test_resume_from_a_state_this_tool_did_not_write_is_refused_before_the_work(
        trained, tmp_path, capsys, state):
    work = tmp_path / "o.onnx.gpp-work"
    work.mkdir()
    (work / "state.json").write_text(state)
    code = main(["gpp", str(trained), "--data", "digits", "--target-macs", "0.5", "-o",
                 str(tmp_path / "o.onnx"), "--no-latency", "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is not a state this tool wrote" in err[0]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["o.onnx.gpp-work", "state.json"]
    assert (work / "state.json").read_text() == state


def test_a_given_work_dir_keeps_what_was_there_and_may_not_hold_the_model(trained, tmp_path,
                                                                          capsys):
    work = tmp_path / "mine"
    (work / "sub").mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    args = ["-q", "gpp", str(trained), "--data", "digits", "--target-macs", "0.5",
            "--budget-epochs", "1", "--rounds", "1", "--no-latency", "--work-dir", str(work)]
    assert main([*args, "-o", str(tmp_path / "o.onnx")]) == 0
    assert sorted(p.name for p in work.rglob("*")) == ["notes.txt", "sub"]  # checkpoints gone
    capsys.readouterr()
    assert main([*args, "-o", str(work / "o.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "choose a folder of its own" in err[0]
    assert sorted(p.name for p in work.rglob("*")) == ["notes.txt", "sub"]


def test_resume_without_the_checkpoint_its_state_names_is_refused(trained, tmp_path, capsys):
    work = tmp_path / "o.onnx.gpp-work"
    work.mkdir()
    (work / "state.json").write_text(json.dumps({"fingerprint": "x", "done": 1, "epochs": 0.5,
                                                 "rows": [], "best": None, "stop": None}))
    code = main(["gpp", str(trained), "--data", "digits", "--target-macs", "0.5", "-o",
                 str(tmp_path / "o.onnx"), "--no-latency", "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "lacks round-1.onnx" in err[0]


def test_gpp_without_data_is_a_one_line_error(trained, tmp_path, capsys):
    code = main(["gpp", str(trained), "--target-macs", "0.5", "-o", str(tmp_path / "o.onnx")])
    assert code == 2 and "labelled data" in capsys.readouterr().err


def test_below_the_floor_the_rest_of_a_macs_target_is_cut_at_once(trained, tmp_path):
    """A tenth of the MACs over three rounds: the first cut cannot keep the start's
    accuracy exactly, so with a floor of 0 the push of round 2 crosses it. Round 2 then
    cuts straight to the target (no push in later rounds) and its fine-tune takes every
    epoch left."""
    out = tmp_path / "o.onnx"
    assert main(["-q", "gpp", str(trained), "--data", "digits", "--target-macs", "0.1",
                 "--rounds", "3", "--budget-epochs", "3", "--round-to", "1", "--acc-floor",
                 "0", "--no-latency", "-o", str(out)]) == 0
    before, after = count(GraphView(onnx.load(trained))), count(GraphView(onnx.load(out)))
    assert after.macs <= 0.1 * before.macs
    rep = json.loads(out.with_suffix(".report.json").read_text())
    assert "in round 2" in rep["stopped"] and "made at once" in rep["stopped"]
    rounds = rep["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[1]["macs"] <= 0.1 * before.macs < rounds[0]["macs"]
    # two pushes of a quarter of the budget split over three rounds, then the rest
    push = 3.0 * 0.25 / 3
    assert rounds[1]["finetune_epochs"] == pytest.approx(3.0 - 2 * push)
    assert rep["epochs_used"] == pytest.approx(3.0)


def test_the_accuracy_floor_stops_a_ratio_run_and_keeps_its_rounds(trained, tmp_path, capsys):
    # half of every group in two rounds: without a cost target the floor of 0 stops the
    # run in round 2, before its last cut, and no model is written
    out = tmp_path / "o.onnx"
    code = main(["-q", "gpp", str(trained), "--data", "digits", "--ratio", "0.9",
                 "--rounds", "2", "--budget-epochs", "2", "--round-to", "1", "--acc-floor", "0",
                 "--no-latency", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "no model met the target" in err and "in round 2" in err
    assert not out.exists() and (tmp_path / "o.onnx.gpp-work" / "round-1.onnx").exists()


def _fake_rounds(monkeypatch, accuracies: list[dict]):
    """run_schedule with the real push step over a push that only reports the given
    held-out accuracy, and cut / fine-tune steps that only report theirs: the floor's
    decisions, without training."""
    from types import SimpleNamespace

    from gpp_onnx import schedule

    def acc(state, key):
        return accuracies[state.done].get(key)

    def push_model(model, train, val, feature, options, weights, seed):
        return model, SimpleNamespace(accuracy_after=acc(push_model.state, "push"),
                                      offdiag_before=0.0, offdiag_after=0.0)

    def push(model, state, run):
        push_model.state = state
        return schedule.push_step(model, state, run)

    def cut(model, state, run):
        k = state.done + 1
        state = schedule._consider(replace(state, cost=(1, 1)), run, model, k, "cut",
                                   acc(state, "cut"), 1, 1)
        return model, state, {"params": 1, "macs": 1, "accuracy_after_cut": acc(state, "cut")}

    def finetune(model, state, run):
        tuned = acc(state, "finetune")
        return model, state, {} if tuned is None else {"accuracy_after_finetune": tuned}

    monkeypatch.setattr(schedule, "push_model", push_model)
    monkeypatch.setattr(schedule, "_feature", lambda model, config: "h")
    monkeypatch.setattr(schedule, "_offdiag", lambda model, run: 0.0)
    monkeypatch.setattr(schedule, "STEPS", (push, cut, finetune))
    options = SimpleNamespace(acc_floor=0.05, work_dir=None, grow=None, weights=None)
    config = SimpleNamespace(rounds=len(accuracies), target_macs=None, target_params=None,
                             train=TrainOptions(), seed=0)
    run = SimpleNamespace(accuracy=0.9, options=options, config=config,
                          data=SimpleNamespace(train=None, val=None),
                          push_epochs=lambda k: 0.5)
    return schedule.run_schedule(object(), run, "fp")[1]


def test_the_floor_judges_an_untrained_cut_by_the_next_push(monkeypatch):
    """Cuts left to the next round's push (no fine-tune in their round) sit far below the
    start right after the cut; the floor waits for that push."""
    state = _fake_rounds(monkeypatch, [{"push": 0.9, "cut": 0.6}, {"push": 0.88, "cut": 0.6},
                                       {"push": 0.87, "cut": 0.8, "finetune": 0.88}])
    assert state.done == 3 and state.stop is None
    # a push that does not bring the previous cut back above the floor stops the run
    # before its own cut (no model meets the target before the last round)
    with pytest.raises(DataError, match=r"0\.8000 fell more than 0\.05 .* in round 2"):
        _fake_rounds(monkeypatch, [{"push": 0.9, "cut": 0.6}, {"push": 0.8, "cut": 0.6},
                                   {"push": 0.87, "cut": 0.8, "finetune": 0.88}])


def test_the_floor_judges_a_fine_tuned_cut_in_its_round(monkeypatch):
    with pytest.raises(DataError, match=r"0\.8000 fell more than 0\.05 .* in round 1"):
        _fake_rounds(monkeypatch, [{"push": 0.9, "cut": 0.6, "finetune": 0.8},
                                   {"push": 0.88, "cut": 0.85, "finetune": 0.88}])


def test_a_cut_that_meets_the_target_early_takes_the_epochs_left(monkeypatch):
    """Round 1 of 3 already cut below the MACs target (rounded widths overshoot): its
    fine-tune takes every epoch the rounds have left and the rounds end there."""
    from types import SimpleNamespace

    from gpp_onnx import schedule

    trained = []
    monkeypatch.setattr(schedule, "train_model",
                        lambda model, data, options, seed, teacher=None:
                        trained.append(options.epochs) or model)
    monkeypatch.setattr(schedule, "accuracy", lambda model, data: 0.9)
    options = schedule.GppOptions(budget_epochs=2.0)
    config = SimpleNamespace(rounds=3, target_macs=0.5, target_params=None,
                             train=TrainOptions(), seed=0)
    run = SimpleNamespace(config=config, options=options, before=SimpleNamespace(macs=100),
                          data=SimpleNamespace(train=None, val=None, teacher=None),
                          finetune_epochs=lambda k: 0.0)
    state = schedule.State(done=0, epochs=0.5 / 3, cost=(10, 40))   # 40 <= 0.5 x 100
    _, after, row = schedule.finetune_step("m", state, run)
    assert trained == [pytest.approx(2.0 - 0.5 / 3)]
    assert row["finetune_epochs"] == pytest.approx(2.0 - 0.5 / 3)
    assert after.stop.startswith("the target was met in round 1 of 3")
    assert after.best["stage"] == "fine-tune" and after.epochs == pytest.approx(2.0)
    # a cut above the target leaves the schedule alone
    trained.clear()
    _, after, row = schedule.finetune_step("m", replace(state, cost=(10, 60)), run)
    assert trained == [] and row == {} and after.stop is None


def test_the_rounds_after_a_grow_fine_tune_without_the_batchnorm_put_back(monkeypatch):
    from types import SimpleNamespace

    from gpp_onnx import schedule

    seen = []
    monkeypatch.setattr(schedule, "train_model",
                        lambda model, data, options, seed, teacher=None:
                        seen.append(options.renorm) or model)
    monkeypatch.setattr(schedule, "accuracy", lambda model, data: 0.9)
    for grow in (None, object()):
        options = schedule.GppOptions(budget_epochs=2.0, grow=grow)
        config = SimpleNamespace(rounds=1, target_macs=0.5, target_params=None, seed=0,
                                 train=TrainOptions(renorm=True))
        run = SimpleNamespace(config=config, options=options, before=SimpleNamespace(macs=100),
                              data=SimpleNamespace(train=None, val=None, teacher=None),
                              finetune_epochs=lambda k: 1.0)
        schedule.finetune_step("m", schedule.State(cost=(10, 40)), run)
    assert seen == [True, False]


def test_an_input_model_at_chance_on_its_data_is_warned_about(trained, tmp_path, caplog):
    """The digits with every label moved one class on: the trained model scores about
    nothing on them, and the run says to check the labels' order."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    np.savez(tmp_path / "shifted.npz", x=digits.images[:, None] / 16.0,
             y=(digits.target + 1) % 10)
    np.savez(tmp_path / "right.npz", x=digits.images[:, None] / 16.0, y=digits.target)
    for name, warned in (("shifted", True), ("right", False)):
        caplog.clear()
        with caplog.at_level("WARNING"):
            gpp_onnx.prune(trained, config=PruneConfig(
                ratio=0.5, latency=False, data=DataOptions(str(tmp_path / f"{name}.npz"))))
        said = [r.getMessage() for r in caplog.records if "about chance" in r.getMessage()]
        assert bool(said) == warned, said


def test_data_of_some_of_the_model_classes_is_used_as_it_is(trained, tmp_path, capsys):
    """The even digits only, labelled as the model's classes 0, 2, 4, 6, 8 (a validation
    set lacking some classes): push and gpp run their discriminants on the classes present
    (they were refused, with advice to number the classes present 0, 1, 2, ..., which
    relabels the model's outputs)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    even = digits.target % 2 == 0
    np.savez(tmp_path / "d.npz", x=digits.images[even, None] / 16.0, y=digits.target[even])
    data = ["--data", str(tmp_path / "d.npz"), "--limit", "300"]
    assert main(["-q", "push", str(trained), *data, "--epochs", "1",
                 "-o", str(tmp_path / "p.onnx")]) == 0
    assert main(["-q", "gpp", str(trained), *data, "--target-macs", "0.5", "--rounds", "1",
                 "--budget-epochs", "6", "--no-latency", "-o", str(tmp_path / "g.onnx")]) == 0
    assert "error" not in capsys.readouterr().err
    push = json.loads((tmp_path / "p.report.json").read_text())["push"]
    best = json.loads((tmp_path / "g.report.json").read_text())["best"]
    assert push["accuracy_after"] > 0.5 and best["accuracy"] > 0.5, (push, best)


def test_too_short_a_budget_names_one_that_is_enough():
    """The refusal's suggested --budget-epochs passes the same check; a tenth less fails."""
    import re

    from gpp_onnx.errors import InputError

    config = PruneConfig(data=DataOptions("digits"), target_macs=0.5).checked()
    with pytest.raises(InputError) as err:
        GppOptions(budget_epochs=0.1).checked(config, 1617)
    enough = float(re.search(r"raise --budget-epochs to ([0-9.]+)", str(err.value)).group(1))
    assert "26 batches of 64 an epoch" in str(err.value)
    GppOptions(budget_epochs=enough).checked(config, 1617)
    with pytest.raises(InputError):
        GppOptions(budget_epochs=enough - 0.1).checked(config, 1617)
    # with --grow, the budget named is enough for the grown modules and the rounds alike
    from gpp_onnx.grow import GrowConfig

    config = PruneConfig(data=DataOptions("digits"), target_macs=1.0).checked()
    with pytest.raises(InputError, match="per grown module") as err:
        GppOptions(budget_epochs=0.5, grow=GrowConfig(max_modules=1)).checked(config, 1617)
    enough = float(re.search(r"raise --budget-epochs to ([0-9.]+)", str(err.value)).group(1))
    GppOptions(budget_epochs=enough, grow=GrowConfig(max_modules=1)).checked(config, 1617)


def test_gradual_cuts_leave_the_last_round_the_widths_one_cut_would_choose(tmp_path):
    """16 and 32 channels in blocks of 8 at half the MACs: three rounds end where one cut
    does (8 and 24 channels), not at 8 and 16 (a quarter of the MACs) because an early
    round had cut 32 to 16. Widths read from the written models."""
    from gpp_onnx.samples import GraphBuilder

    b = GraphBuilder((1, 1, 28, 28), seed=0)
    x = b.pool(b.act(b.conv("input", 16), "Relu"))
    model = b.build(b.gemm(b.flatten(b.gap(b.act(b.conv(x, 32), "Relu"))), 10))
    src = tmp_path / "m.onnx"
    onnx.save(model, src)

    def widths(path):
        m = onnx.load(path)
        inits = {t.name: t for t in m.graph.initializer}
        return [list(inits[n.input[1]].dims)[0] for n in m.graph.node if n.op_type == "Conv"]

    for rounds in (1, 3):
        gpp_onnx.prune(src, tmp_path / f"r{rounds}.onnx", PruneConfig(
            target_macs=0.5, rounds=rounds, round_to=8, latency=False))
    assert widths(tmp_path / "r1.onnx") == [8, 24]
    assert widths(tmp_path / "r3.onnx") == [8, 24]


def test_a_later_round_takes_no_coarser_block_than_the_earlier_cuts(tmp_path, monkeypatch):
    """Blocks of 16, 8, ... (the default on an AVX-512 machine) at 0.4 of the MACs: one cut
    keeps 8 and 24 channels (blocks of 8). Three rounds used to end at 8 and 16 (0.28 of
    the MACs): round 1 cut 16 to 8, and the last round, in blocks of 16, could only halve
    the 32."""
    from gpp_onnx import latency
    from gpp_onnx.samples import GraphBuilder

    monkeypatch.setattr(latency, "width_multiples",
                        lambda round_to: (16, 8, 4, 2, 1) if round_to is None else (round_to,))
    b = GraphBuilder((1, 1, 28, 28), seed=0)
    x = b.pool(b.act(b.conv("input", 16), "Relu"))
    model = b.build(b.gemm(b.flatten(b.gap(b.act(b.conv(x, 32), "Relu"))), 10))

    def widths(m):
        inits = {t.name: t for t in m.graph.initializer}
        return [list(inits[n.input[1]].dims)[0] for n in m.graph.node if n.op_type == "Conv"]

    for rounds in (1, 3):
        res = gpp_onnx.prune(model, tmp_path / f"r{rounds}.onnx", PruneConfig(
            target_macs=0.4, rounds=rounds, latency=False))
        assert widths(onnx.load(tmp_path / f"r{rounds}.onnx")) == [8, 24]
        assert 0.35 < res.after.macs / res.before.macs <= 0.4


def test_chance_is_judged_by_the_classes_the_data_holds(trained, tmp_path, caplog):
    """The even digits with each label moved to the next even class: the warning counts the
    5 classes present, not 9 (one more than the highest label)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    even = digits.target % 2 == 0
    np.savez(tmp_path / "even.npz", x=digits.images[even][:, None] / 16.0,
             y=(digits.target[even] + 2) % 10)
    with caplog.at_level("WARNING"):
        gpp_onnx.prune(trained, config=PruneConfig(
            ratio=0.5, latency=False, data=DataOptions(str(tmp_path / "even.npz"))))
    said = [r.getMessage() for r in caplog.records if "about chance" in r.getMessage()]
    assert said and "for 5 classes" in said[0]


def test_a_work_folder_another_run_is_using_is_refused(trained, tmp_path, capsys):
    """Two runs given the same work folder (the same -o or --work-dir) both started and
    checkpointed into it: the check for a run in it looked for state.json alone, which the
    first run writes only after its first round."""
    import fcntl

    work = tmp_path / "o.onnx.gpp-work"
    work.mkdir()
    fd = os.open(work, os.O_RDONLY)      # the lock a running gpp holds on its folder
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code = main(["gpp", str(trained), "--data", "digits", "--target-macs", "0.5",
                     "--budget-epochs", "1", "--rounds", "1", "--no-latency",
                     "-o", str(tmp_path / "o.onnx")])
    finally:
        os.close(fd)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "still running" in err[-1] and "--work-dir" in err[-1]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["o.onnx.gpp-work"]
