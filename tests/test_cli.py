"""The CLI's commands end to end: analyze, prune (ratio, targets, round-to, mask-only,
plans), compare, demo."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import feeds_for, run_model
from gpp_onnx.cli import main
from gpp_onnx.samples import GraphBuilder, sample_cnn


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(sample_cnn(), path)
    return path


def _inits(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_analyze_lists_groups_and_reasons(model_path, capsys):
    assert main(["analyze", str(model_path)]) == 0
    out = capsys.readouterr().out
    assert "11 channel groups, 9 prunable" in out
    assert "model input" in out and "model output" in out
    header = next(line for line in out.splitlines() if line.startswith("group"))
    assert header.split() == ["group", "width", "members", "prunable", "params", "MACs", "why", "not"]


def test_prune_writes_model_report_and_summary(model_path, tmp_path, capsys):
    out = tmp_path / "small.onnx"
    assert main(["-q", "prune", str(model_path), "--ratio", "0.5", "-o", str(out)]) == 0
    summary = capsys.readouterr().out
    assert "params" in summary and "MACs" in summary and "latency" in summary
    report = json.loads((tmp_path / "small.report.json").read_text())
    assert report["after"]["macs"] < report["before"]["macs"]
    assert report["equivalence_relative_error"] < 1e-5
    assert report["ratios"]["latency"] > 0
    assert {g["key"] for g in report["groups"]} >= {"conv1", "gemm41"}
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_mask_only_keeps_shapes_and_zeroes_channels(model_path, tmp_path):
    out = tmp_path / "masked.onnx"
    assert main(["-q", "prune", str(model_path), "--mask-only", "--no-latency", "-o", str(out)]) == 0
    before, after = _inits(model_path), _inits(out)
    def float_shapes(inits):
        return sorted(v.shape for v in inits.values() if v.dtype == np.float32)
    assert float_shapes(before) == float_shapes(after)
    zeros = sum(int((v == 0).sum()) for v in after.values() if v.dtype == np.float32)
    assert zeros > sum(int((v == 0).sum()) for v in before.values() if v.dtype == np.float32)


def test_plan_round_trip_reproduces_the_same_cut(model_path, tmp_path):
    plan = tmp_path / "plan.json"
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert main(["-q", "prune", str(model_path), "--criterion", "random", "--seed", "7",
                 "--no-latency", "--plan-out", str(plan), "-o", str(first)]) == 0
    assert main(["-q", "prune", str(model_path), "--plan", str(plan), "--no-latency",
                 "-o", str(second)]) == 0
    a, b = _inits(first), _inits(second)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    data = json.loads(plan.read_text())
    assert data["format"] == "gpp-onnx-plan/1" and data["meta"]["criterion"] == "random"


def test_plan_for_another_model_is_refused(model_path, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    main(["-q", "prune", str(model_path), "--no-latency", "--plan-out", str(plan),
          "-o", str(tmp_path / "a.onnx")])
    other = tmp_path / "other.onnx"
    onnx.save(sample_cnn(num_classes=7), other)
    code = main(["prune", str(other), "--plan", str(plan), "-o", str(tmp_path / "b.onnx")])
    assert code == 2 and "different model" in capsys.readouterr().err
    assert not (tmp_path / "b.onnx").exists()


def test_round_to_keeps_hardware_friendly_widths(model_path, tmp_path):
    out = tmp_path / "r.onnx"
    assert main(["-q", "prune", str(model_path), "--ratio", "0.6", "--round-to", "8",
                 "--no-latency", "-o", str(out)]) == 0
    report = json.loads((tmp_path / "r.report.json").read_text())
    for g in report["groups"]:
        if g["prunable"] and g["width"] >= 8:
            assert g["kept"] % 8 == 0 or g["kept"] == g["width"], g


@pytest.mark.parametrize("flag,field", [("--target-macs", "macs"), ("--target-params", "params")])
def test_targets_reach_the_requested_fraction(model_path, tmp_path, flag, field):
    out = tmp_path / "t.onnx"
    assert main(["-q", "prune", str(model_path), flag, "0.4", "--no-latency", "-o", str(out)]) == 0
    report = json.loads((tmp_path / "t.report.json").read_text())
    frac = report["after"][field] / report["before"][field]
    assert 0.3 < frac <= 0.4


def test_compare_prints_ratios(model_path, tmp_path, capsys):
    out = tmp_path / "small.onnx"
    main(["-q", "prune", str(model_path), "--no-latency", "-o", str(out)])
    capsys.readouterr()
    assert main(["compare", str(model_path), str(out), "--repeats", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    params = next(line for line in lines if line.startswith("params")).split()
    assert float(params[-1]) < 0.5
    assert any(line.startswith("latency") for line in lines)


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["-q", "demo", "--out", str(tmp_path / "d"), "--epochs", "3",
                 "--budget-epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "top-1 accuracy" in out
    report = json.loads((tmp_path / "d" / "digits_cnn.pruned.report.json").read_text())
    assert report["config"]["criterion"] == "gpp"
    assert report["before"]["accuracy"] > 0.5  # the demo model really learned the digits
    assert report["after"]["macs"] < 0.6 * report["before"]["macs"]
    assert report["after"]["accuracy"] >= max(  # the best round's model is the one written
        r.get("accuracy_after_finetune") or 0 for r in report["rounds"] if r["round"] == 2)
    pruned = tmp_path / "d" / "digits_cnn.pruned.onnx"
    model = onnx.load(str(tmp_path / "d" / "digits_cnn.onnx"))
    assert run_model(pruned, feeds_for(model))[0].shape == (2, 10)


def test_demo_too_small_budget_is_refused_before_training(tmp_path, capsys):
    """demo --budget-epochs 1 trained the CNN, wrote it, then failed in gpp's check naming
    --batch-size and --rounds, flags demo does not take."""
    assert main(["demo", "--out", str(tmp_path / "d"), "--budget-epochs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("gpp-onnx: error: --budget-epochs 1 ")
    assert "--budget-epochs 1.6" in err and "--rounds" not in err and "--batch-size" not in err
    assert not (tmp_path / "d" / "digits_cnn.onnx").exists()  # refused before the training
    assert main(["-q", "demo", "--out", str(tmp_path / "d"), "--epochs", "0",
                 "--budget-epochs", "1.6"]) == 0  # the budget it names is enough


def test_prune_api_accepts_min_keep(tmp_path):
    from gpp_onnx import PruneConfig, prune
    b = GraphBuilder((1, 3, 8, 8), seed=0)
    model = b.build(b.gemm(b.flatten(b.gap(b.act(b.conv("input", 4), "Relu"))), 2))
    onnx.save(model, tmp_path / "m.onnx")
    result = prune(tmp_path / "m.onnx", tmp_path / "p.onnx",
                   PruneConfig(ratio=0.9, min_keep=3, round_to=1, latency=False))
    assert result.plan.removed == {"conv1": (int(result.plan.removed["conv1"][0]),)}


@pytest.mark.parametrize("argv, message", [
    (["gpp", "--lr", "-1"], "argument --lr: -1 must be > 0"),
    (["gpp", "--budget-epochs", "nan"], "argument --budget-epochs: nan is not a finite number"),
    (["gpp", "--budget-epochs", "inf"], "is not a finite number"),
    (["prune", "--batch-size", "0"], "argument --batch-size: 0 must be >= 1"),
    (["prune", "--per-class", "0"], "argument --per-class: 0 must be >= 1"),
    (["prune", "--val-split", "1"], "argument --val-split: 1 must be < 1"),
    (["prune", "--finetune-epochs", "-2"], "must be >= 0"),
    (["push", "--epochs", "0"], "argument --epochs: 0 must be > 0"),
    (["grow", "--max-modules", "0"], "argument --max-modules: 0 must be >= 1"),
    (["gpp", "--push-share", "1.5"], "argument --push-share: 1.5 must be <= 1"),
    (["prune", "--repair", "bias", "--no-repair"], "not allowed with argument --repair"),
    (["grow", "--seed", "-1"], "argument --seed: -1 must be >= 0"),
])
def test_numeric_options_out_of_range_are_refused_by_the_parser(argv, message, tmp_path,
                                                                   capsys):
    command, *options = argv
    with pytest.raises(SystemExit) as exit_:
        main([command, str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), *options])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"gpp-onnx {command}: error: argument ")
    assert err[0].endswith(f"{message} - see 'gpp-onnx {command} --help'")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "m.onnx", "--data", "digits", "--val-split", "0.5"],
     "unrecognized arguments: --val-split 0.5"),      # evaluate measures every image
    (["compare", "a.onnx", "b.onnx", "--per-class", "8"], "unrecognized arguments: --per-class"),
    (["gpp", "m.onnx", "-o", "o.onnx", "--no-labels"], "unrecognized arguments: --no-labels"),
    (["push", "m.onnx", "-o", "o.onnx", "--per-class", "8"], "unrecognized arguments"),
    (["prune", "m.onnx", "--ratio", "0.5", "--target-macs", "0.5", "-o", "o.onnx"],
     "argument --target-macs: not allowed with argument --ratio"),
    (["prune", "m.onnx"], "the following arguments are required: -o/--output"),
])
def test_options_a_command_does_not_take_are_one_line_errors(argv, message, tmp_path, capsys,
                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"gpp-onnx {argv[0]}: error: {message}")
    assert err[0].endswith(f" - see 'gpp-onnx {argv[0]} --help'")
    assert list(tmp_path.iterdir()) == []


def test_running_out_of_memory_is_a_one_line_error_not_a_bug(tmp_path, capsys, monkeypatch):
    from gpp_onnx import pipeline

    def too_big(*args, **kwargs):
        raise MemoryError("Unable to allocate 74.5 GiB for an array")

    monkeypatch.setattr(pipeline, "analyze", too_big)
    assert main(["analyze", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpp-onnx: error: out of memory (Unable")
    assert "internal error" not in err[0]


@pytest.mark.parametrize("argv, message", [
    (["gpp", "--target-macs", "0.5", "--data", "digits", "--at", "relu3"],
     "--at sets how gpp grows - add --grow N"),
    (["gpp", "--target-macs", "0.5", "--data", "digits", "--grow-share", "0.3"],
     "--grow-share sets how gpp grows"),
    (["prune", "--ratio", "0.5", "--ignore", "conv1", "--group-ratio", "conv1=0.25"],
     "both kept whole (--ignore) and given a ratio"),
    (["push", "--data", "digits", "--feature-tensor", "input"], "is not a computed value"),
])
def test_options_that_would_be_ignored_are_refused(argv, message, tmp_path, capsys):
    import onnx

    from gpp_onnx.samples import digits_cnn

    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(digits_cnn(0), src)
    command, *options = argv
    assert main(["-q", command, str(src), "-o", str(out), "--no-latency", *options]
                if command != "push" else ["-q", command, str(src), "-o", str(out),
                                           *options]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()


def test_push_on_too_few_images_of_a_class_is_one_line(tmp_path, capsys):
    """15 digits: one or two training images a class and 2 held out; the discriminants'
    need is the one line said (not the few held-out images too)."""
    import onnx

    from gpp_onnx.samples import digits_cnn

    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(digits_cnn(0), src)
    assert main(["-q", "push", str(src), "--data", "digits", "--limit", "15", "-o",
                 str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the class discriminants need at least 2 of every class" in err[0]
    assert not out.exists()


def test_a_class_of_two_images_keeps_both_for_the_discriminants(tmp_path, capsys):
    """The held-out split takes one image of every class first: a class of exactly two
    lost one and push (and gpp) refused the data for a class of one training image,
    whatever --val-split; such a class now stays whole in training."""
    import numpy as np
    import onnx
    from sklearn.datasets import load_digits

    from gpp_onnx.samples import digits_cnn

    d = load_digits()
    keep = np.concatenate([np.flatnonzero(d.target != 9), np.flatnonzero(d.target == 9)[:2]])
    np.savez(tmp_path / "d.npz", x=(d.images[keep, None] * 255 / 16).astype(np.uint8),
             y=d.target[keep])
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(digits_cnn(0), src)
    assert main(["-q", "push", str(src), "--data", str(tmp_path / "d.npz"), "--epochs",
                 "0.05", "-o", str(out)]) == 0, capsys.readouterr().err
    assert out.exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA GPU is here")
def test_device_cuda_without_a_gpu_is_refused_before_the_model_is_read(tmp_path, capsys):
    # the model path does not exist: the device is checked first
    assert main(["prune", str(tmp_path / "missing.onnx"), "--device", "cuda", "-o",
                 str(tmp_path / "o.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cuda" in err[0].lower() and "not found" not in err[0]


def test_quiet_may_follow_the_command(tmp_path, capsys):
    import onnx

    from gpp_onnx.samples import digits_cnn

    onnx.save(digits_cnn(0), tmp_path / "m.onnx")
    assert main(["analyze", str(tmp_path / "m.onnx"), "-q"]) == 0
    out = capsys.readouterr()
    assert "channel groups" in out.out and "loaded" not in out.err


def test_an_op_the_torch_backend_lacks_names_the_prune_that_still_works(tmp_path, capsys):
    """prune --data with the default criterion needs the torch backend; its one-line
    refusal (after the warnings about the untrained model's few held-out images) names
    the way out, and that way out (--criterion l1 --repair bias) prunes. --criterion l1
    alone is no way out: the default lsq repair runs the backend too."""
    b = GraphBuilder((1, 1, 8, 8), seed=0)
    x = b.act(b.conv(b.act(b.conv("input", 8), "Relu"), 8), "Tan")   # Tan: no torch op
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(b.build(b.gemm(b.flatten(b.gap(b.act(b.conv(x, 16), "Relu"))), 10)), src)
    argv = ["-q", "prune", str(src), "--data", "digits", "--limit", "300", "--ratio", "0.5",
            "--round-to", "1", "--no-latency", "-o", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("gpp-onnx: error: node") and "(Tan): op is not supported" in err[-1]
    assert "--criterion l1 --repair bias" in err[-1] and not out.exists()
    assert main([*argv, "--criterion", "l1", "--repair", "bias"]) == 0
    assert out.exists()


def test_a_progress_loop_run_again_logs_its_steps_again_when_not_a_terminal(monkeypatch):
    """A log file (no TTY) had one line for the second 'fine-tune' / 'push' / 'tracing'
    loop of a run (rounds), its last: a long later fine-tune showed no progress at all."""
    import io
    import logging

    from gpp_onnx import progress

    monkeypatch.setattr(progress, "_INTERVAL_S", 0.0)
    stream = io.StringIO()
    log = logging.getLogger("gpp_onnx.test_progress")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(progress.ProgressHandler(stream))
    for _ in range(2):
        for _ in progress.track(range(20), "fine-tune", 20, log):
            pass
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert len(lines) == 22 and lines[:11] == lines[11:]
    assert lines[11] == "gpp-onnx: fine-tune 1/20"


def _gpp_onnx(*args: str, **kwargs):
    import subprocess
    import sys

    from conftest import child_env

    return subprocess.Popen([sys.executable, "-m", "gpp_onnx", *args],
                            env=child_env(OMP_NUM_THREADS="1"), **kwargs)


@pytest.mark.skipif(not __import__("os").path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_under_stdout_is_a_one_line_error_that_keeps_the_written_files(
        model_path, tmp_path):
    """The summary printed to a log on a full disk after the model and report were written
    was an internal error saying nothing was written (exit 1)."""
    import subprocess

    out = tmp_path / "small.onnx"
    with open("/dev/full", "w") as full:
        proc = _gpp_onnx("-q", "prune", str(model_path), "--ratio", "0.5", "--no-latency",
                         "-o", str(out), stdout=full, stderr=subprocess.PIPE, text=True)
        _, err = proc.communicate(timeout=300)
    lines = err.strip().splitlines()
    assert proc.returncode == 2, err
    assert len(lines) == 1 and "standard output" in lines[0] and "nothing was written" not in err
    assert out.is_file() and out.with_suffix(".report.json").is_file()


def test_bad_input_exits_2_when_stderr_has_gone(tmp_path):
    """`gpp-onnx ... 2>&1 | head -1`: the error line met a closed pipe, and its
    BrokenPipeError turned the exit code of bad input (2) into a bug's (1)."""
    import subprocess

    proc = _gpp_onnx("prune", str(tmp_path / "missing.onnx"), "--ratio", "0.5", "-o",
                     str(tmp_path / "o.onnx"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    proc.stderr.close()            # the reader went away before the first line
    assert proc.wait(timeout=300) == 2


@pytest.mark.parametrize("side", ["input", "output"])
def test_a_path_too_long_for_the_file_system_is_a_one_line_error(tmp_path, capsys, side):
    """A file name over the file system's limit (255 bytes) as the model or -o: one line,
    exit 2 (it was an internal error, exit 1, 'please report it')."""
    from gpp_onnx.samples import sample_cnn

    src = tmp_path / "m.onnx"
    onnx.save(sample_cnn(), src)
    long = tmp_path / ("x" * 300 + ".onnx")
    model, out = (long, tmp_path / "o.onnx") if side == "input" else (src, long)
    assert main(["-q", "prune", str(model), "--ratio", "0.5", "--no-latency",
                 "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "too long" in err[0] and "internal error" not in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
