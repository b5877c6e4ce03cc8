"""Bad input: a one-line error naming the problem and the fix, exit code 2, no output file,
input untouched."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from gpp_onnx.cli import main
from gpp_onnx.samples import GraphBuilder, sample_cnn


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def _run_cli(capsys, args):
    """Exit code and the error lines (progress lines before them are allowed)."""
    code = main(args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in lines)
    errors = [line for line in lines if line.startswith("gpp-onnx: error:")]
    assert not errors or lines[-1] == errors[-1]
    return code, errors


def _model_with(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "bad", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _quantized():
    w = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.uint8), "w")
    return _model_with([helper.make_node("ConvInteger", ["x", "w"], ["y"], name="ci")],
                       [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 3, 4, 4])],
                       [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 4, 4, 4])],
                       [w])


def _quantized_head():
    """A float Conv before a com.microsoft DynamicQuantizeMatMul head with int8 weights, as
    onnxruntime's ORT_ENABLE_EXTENDED writes a dynamically quantized MatMul: none of the
    standard quantized ops is left, and the model was pruned as a float one."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.integers(-9, 9, (8, 4)).astype(np.int8), "q"),
             numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "z")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("DynamicQuantizeMatMul", ["f", "q", "s", "z"], ["y"],
                              domain="com.microsoft")]
    model = _model_with(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                              ["N", 3, 8, 8])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                        inits)
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def _int8_weights():
    """Weight-only quantization written as int8 -> Cast -> Mul(scale): it was folded into
    float32 weights and written four times its bytes."""
    model = sample_cnn()
    w = next(t for t in model.graph.initializer if len(t.dims) == 4)
    q = np.round(numpy_helper.to_array(w) * 20).astype(np.int8)
    name = w.name
    w.CopyFrom(numpy_helper.from_array(q, name + ".q"))
    model.graph.initializer.append(numpy_helper.from_array(np.array(0.05, np.float32),
                                                           name + ".s"))
    nodes = [helper.make_node("Cast", [name + ".q"], [name + ".f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", [name + ".f", name + ".s"], [name]),
             *model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def _control_flow():
    def branch(value):
        out = helper.make_tensor_value_info("o", TensorProto.FLOAT, [1])
        const = helper.make_node("Constant", [], ["o"], value=numpy_helper.from_array(
            np.array([value], np.float32)))
        return helper.make_graph([const], f"b{value}", [], [out])
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch(1.0), else_branch=branch(0.0))
    return _model_with([node], [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])


def _fails_checker():
    return _model_with([helper.make_node("Relu", ["missing"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])


def _cycle():
    return _model_with([helper.make_node("Add", ["x", "b"], ["a"], name="add"),
                        helper.make_node("Relu", ["a"], ["b"], name="relu")],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                       [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 3])])


def _custom_op():
    """conv -> a custom-domain op onnxruntime does not know -> conv."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (8, 3, 3, 3)), ("w2", (4, 8, 3, 3)))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1] * 4),
             helper.make_node("MyRelu", ["a"], ["r"], domain="com.example"),
             helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1] * 4)]
    model = _model_with(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                              [1, 3, 8, 8])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                        inits)
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    return model


def _nothing_prunable():
    b = GraphBuilder((1, 6), seed=0)
    return b.build(b.gemm("input", 3))


def _nan_weight():
    """A NaN in one weight: the model computes NaN. It was refused only with --data, as
    'check the input scaling', and without data as a criterion that 'gave ... scores'."""
    model = sample_cnn()
    t = next(t for t in model.graph.initializer if len(t.dims) == 4)
    w = numpy_helper.to_array(t).copy()
    w.flat[0] = np.nan
    t.CopyFrom(numpy_helper.from_array(w, t.name))
    return model


def _write(kind, path):
    good = sample_cnn().SerializeToString()
    if kind == "text":
        path.write_text("this is not a model\n")
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 3])
    else:
        onnx.save({"quantized": _quantized, "quantized_head": _quantized_head,
                   "int8_weights": _int8_weights, "control_flow": _control_flow,
                   "checker": _fails_checker, "nothing": _nothing_prunable,
                   "cycle": _cycle, "custom_op": _custom_op,
                   "nan_weight": _nan_weight}[kind](), path)


CASES = [
    ("text", [], "not"),
    ("truncated", [], "not a readable ONNX model"),
    ("checker", [], "checker"),
    ("cycle", [], "has a cycle"),
    ("quantized", [], "quantized"),
    ("quantized_head", [], "quantized (DynamicQuantizeMatMul)"),
    ("int8_weights", [], "quantized (weights stored as integers"),
    ("control_flow", [], "control flow"),
    ("nothing", [], "nothing can be pruned"),
    ("nan_weight", [], "NaN or infinite values"),
    ("nan_weight", ["--criterion", "random"], "NaN or infinite values"),
    ("custom_op", [], "onnxruntime cannot open it"),
    ("good", ["--ratio", "1.0"], "outside [0, 1)"),
    ("good", ["--ratio", "-0.1"], "outside [0, 1)"),
    ("good", ["--criterion", "magic"], "unknown criterion"),
    ("good", ["--target-macs", "0"], "outside (0, 1]"),
]


@pytest.mark.parametrize("kind,extra,message", CASES, ids=[f"{c[0]}{c[1]}" for c in CASES])
def test_bad_input_is_one_line_exit_2_no_output(kind, extra, message, tmp_path, capsys):
    src = tmp_path / "model.onnx"
    if kind == "good":
        onnx.save(sample_cnn(), src)
    else:
        _write(kind, src)
    before = _digest(src)
    out = tmp_path / "out.onnx"
    code, err = _run_cli(capsys, ["prune", str(src), "-o", str(out), *extra])
    assert code == 2
    assert len(err) == 1 and err[0].startswith("gpp-onnx: error:") and message in err[0]
    assert " - " in err[0]  # the message says what to do
    assert not out.exists() and not (tmp_path / "out.report.json").exists()
    assert _digest(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_a_report_over_the_input_is_named_in_the_refusal(tmp_path, capsys):
    src = tmp_path / "x.report.json"    # a model file named like the output's report
    onnx.save(sample_cnn(), src)
    code, err = _run_cli(capsys, ["prune", str(src), "-o", str(tmp_path / "x.onnx")])
    assert code == 2 and "(its report x.report.json) would overwrite the input model" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.report.json"]


def test_missing_file(tmp_path, capsys):
    code, err = _run_cli(capsys, ["prune", str(tmp_path / "nope.onnx"), "-o",
                                  str(tmp_path / "o.onnx")])
    assert code == 2 and len(err) == 1 and "not found" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_output_equal_to_input_is_refused(tmp_path, capsys):
    src = tmp_path / "model.onnx"
    onnx.save(sample_cnn(), src)
    before = _digest(src)
    code, err = _run_cli(capsys, ["prune", str(src), "-o", str(src)])
    assert code == 2 and "would overwrite the input model -" in err[0]
    assert _digest(src) == before


@pytest.mark.parametrize("command", ["prune", "push", "grow", "gpp"])
def test_output_over_the_inputs_external_data_is_refused(command, tmp_path, capsys):
    """-o naming the file an input's weights live in would leave the input unreadable."""
    src = tmp_path / "model.onnx"
    onnx.save(sample_cnn(), src, save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    files = {p.name: _digest(p) for p in tmp_path.iterdir()}
    extra = {"prune": ["--ratio", "0.5"], "push": ["--data", "digits"], "grow": [],
             "gpp": ["--target-macs", "0.5", "--data", "digits"]}[command]
    code, err = _run_cli(capsys, [command, str(src), "-o", str(tmp_path / "weights.bin"),
                                  *extra])
    assert code == 2 and len(err) == 1
    assert "would overwrite the input model's external data file (weights.bin)" in err[0]
    assert {p.name: _digest(p) for p in tmp_path.iterdir()} == files


def test_outputs_get_the_usual_file_mode(tmp_path):
    """Written files are readable as the umask allows (not the temporary file's 0600)."""
    import os
    import stat

    from gpp_onnx import files

    old = os.umask(0o022)
    try:
        path = files.save(sample_cnn(), tmp_path / "m.onnx")
        text = files.write_text(tmp_path / "r.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE(text.stat().st_mode) == 0o644


def test_class_scores_that_are_not_the_first_output_are_named(tmp_path, capsys):
    """An embedding first and the logits second: the labels would fit the embedding's
    width, so the run would train and measure the wrong output; it stops and says so."""
    b = GraphBuilder((1, 1, 8, 8), seed=0)
    emb = b.gemm(b.flatten(b.gap(b.act(b.conv("input", 8), "Relu"))), 32)
    logits = b.gemm(b.act(emb, "Relu"), 10)
    model = b.build(emb)
    model.graph.output.append(helper.make_tensor_value_info(logits, TensorProto.FLOAT,
                                                            ["N", 10]))
    src, out = tmp_path / "model.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    code, err = _run_cli(capsys, ["prune", str(src), "--data", "digits", "--ratio", "0.5",
                                  "--feature-tensor", emb, "-o", str(out)])
    assert code == 2 and len(err) == 1
    assert f"its output '{logits}' 10, one per class" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


@pytest.mark.parametrize("argv", [
    ["prune", "{src}", "--ratio", "0.5", "--no-latency", "-o", "{out}", "--plan-out", "{src}"],
    ["prune", "{src}", "--ratio", "0.5", "--no-latency", "-o", "{out}", "--plan-out", "{out}"],
    ["prune", "{src}", "--ratio", "0.5", "--no-latency", "-o", "{out}", "--plan-out",
     "{report}"],
    ["profile", "{src}", "--json", "{src}"],
], ids=["plan-over-input", "plan-over-output", "plan-over-report", "profile-over-input"])
def test_a_second_output_over_the_input_or_the_output_is_refused(argv, tmp_path, capsys):
    src, out = tmp_path / "model.onnx", tmp_path / "out.onnx"
    onnx.save(sample_cnn(), src)
    before = _digest(src)
    paths = {"src": src, "out": out, "report": out.with_suffix(".report.json")}
    code, err = _run_cli(capsys, [a.format(**paths) for a in argv])
    assert code == 2 and len(err) == 1 and "would overwrite" in err[0]
    assert _digest(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


@pytest.mark.parametrize("out", ["plan.json", "plan.onnx"], ids=["model", "report"])
def test_an_output_over_the_replayed_plan_is_refused(out, tmp_path, capsys):
    """-o (or its report) naming the --plan file replaced the plan with the model."""
    src = tmp_path / "model.onnx"
    onnx.save(sample_cnn(), src)
    plan = tmp_path / ("plan.json" if out == "plan.json" else "plan.report.json")
    assert main(["-q", "prune", str(src), "--ratio", "0.5", "--no-latency", "-o",
                 str(tmp_path / "first.onnx"), "--plan-out", str(plan)]) == 0
    before = {p.name: _digest(p) for p in tmp_path.iterdir()}
    code, err = _run_cli(capsys, ["prune", str(src), "--plan", str(plan), "--no-latency",
                                  "-o", str(tmp_path / out)])
    assert code == 2 and len(err) == 1 and "would overwrite the plan" in err[0]
    assert {p.name: _digest(p) for p in tmp_path.iterdir()} == before


def test_a_disk_that_fills_up_while_writing_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    """ENOSPC in the final write (room for the input's size was there at the start) was an
    'internal error ... please report it' with exit 1."""
    import errno
    import pathlib

    src = tmp_path / "model.onnx"
    onnx.save(sample_cnn(), src)
    before = _digest(src)

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_bytes", full)
    code, err = _run_cli(capsys, ["prune", str(src), "--ratio", "0.5", "--no-latency", "-o",
                                  str(tmp_path / "out.onnx")])
    assert code == 2 and len(err) == 1
    assert "cannot write" in err[0] and "No space left on device" in err[0] and " - " in err[0]
    assert _digest(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_analyze_bad_file_exit_2(tmp_path, capsys):
    bad = tmp_path / "m.onnx"
    bad.write_text("nope")
    code, err = _run_cli(capsys, ["analyze", str(bad)])
    assert code == 2 and len(err) == 1


def test_python_dash_m_reports_errors_with_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gpp_onnx", "prune", str(tmp_path / "x.onnx"),
                           "-o", str(tmp_path / "y.onnx")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("gpp-onnx: error: model file not found")


_TERM_WHILE_WRITING = """
import os, pathlib, signal, sys
write = pathlib.Path.write_bytes
def halfway(self, data):                  # SIGTERM (kill, timeout) halfway through the write
    write(self, data[:len(data) // 2])
    os.kill(os.getpid(), signal.SIGTERM)
    write(self, data)
pathlib.Path.write_bytes = halfway
from gpp_onnx.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_while_writing_leaves_nothing(tmp_path):
    """SIGTERM in the final write ended the process on the spot: a half-written temporary
    model was left in the output folder (or the model without its report)."""
    src = tmp_path / "model.onnx"
    onnx.save(sample_cnn(), src)
    proc = subprocess.run([sys.executable, "-c", _TERM_WHILE_WRITING, "prune", str(src),
                           "--ratio", "0.5", "--no-latency", "-o", str(tmp_path / "out.onnx")],
                          capture_output=True, text=True)
    assert proc.returncode == 143, proc.stderr[-500:]
    assert proc.stderr.strip().splitlines()[-1] == "gpp-onnx: interrupted; no output was written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


@pytest.mark.parametrize("plan, extra, message", [
    ("[]", [], "cannot read plan"),
    ('{"format": "gpp-onnx-plan/1", "removed": null}', [], "cannot read plan"),
    (None, ["--target-macs", "0.1"], "--target-macs would be ignored"),
    (None, ["--ratio", "0.3"], "--ratio would be ignored"),
    (None, ["--round-to", "4"], "--round-to would be ignored"),
    (None, ["--criterion", "random"], "--criterion would be ignored"),
    ("twice", [], "removes a channel of group"),
])
def test_a_plan_that_cannot_be_used_is_refused(plan, extra, message, tmp_path, capsys):
    src, out = tmp_path / "model.onnx", tmp_path / "out.onnx"
    onnx.save(sample_cnn(), src)
    path = tmp_path / "plan.json"
    if plan is None:    # a real plan, with a target it would override
        assert main(["-q", "prune", str(src), "--ratio", "0.5", "--no-latency", "-o",
                     str(tmp_path / "a.onnx"), "--plan-out", str(path)]) == 0
        capsys.readouterr()
    else:
        path.write_text(plan)
    if plan == "twice":  # a real plan, edited to remove one channel twice
        assert main(["-q", "prune", str(src), "--no-latency", "-o", str(tmp_path / "a.onnx"),
                     "--plan-out", str(path)]) == 0
        capsys.readouterr()
        data = json.loads(path.read_text())
        key = next(k for k, v in data["removed"].items() if v)
        data["removed"][key] = data["removed"][key][:1] * 2 + data["removed"][key][1:]
        path.write_text(json.dumps(data))
    code, err = _run_cli(capsys, ["prune", str(src), "--plan", str(path), "--no-latency",
                                  "-o", str(out), *extra])
    assert code == 2 and len(err) == 1 and message in err[0]
    assert not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--target-macs", "0.5", "--min-keep", "100"], "above --target-macs 0.5"),
    (["--ratio", "0.5", "--min-keep", "100"], "nothing was cut"),
])
def test_a_cut_that_misses_its_target_says_so(extra, message, tmp_path, capsys):
    import json

    src, out = tmp_path / "model.onnx", tmp_path / "out.onnx"
    onnx.save(sample_cnn(), src)
    assert main(["prune", str(src), "--no-latency", "-o", str(out), *extra]) == 0
    rep = json.loads(out.with_suffix(".report.json").read_text())
    assert any(message in w for w in rep["warnings"])
    assert message in capsys.readouterr().out


def test_an_interrupt_between_the_model_and_its_report_leaves_neither(tmp_path, capsys,
                                                                      monkeypatch):
    from gpp_onnx import report

    src = tmp_path / "model.onnx"
    onnx.save(sample_cnn(), src)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "to_json", interrupted)  # after the model is saved
    assert main(["prune", str(src), "--no-latency", "--plan-out", str(tmp_path / "p.json"),
                 "-o", str(tmp_path / "out.onnx")]) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_a_reader_that_stops_reading_ends_the_run_quietly(tmp_path):
    src = tmp_path / "model.onnx"
    onnx.save(sample_cnn(), src)
    p = subprocess.Popen([sys.executable, "-m", "gpp_onnx", "analyze", str(src)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()                     # as `| head` does once it has read enough
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) in (0, 141) and "error" not in err


def test_a_report_path_that_is_a_folder_is_refused_before_the_work(tmp_path, capsys):
    src = tmp_path / "model.onnx"
    onnx.save(sample_cnn(), src)
    (tmp_path / "out.report.json").mkdir()
    code, err = _run_cli(capsys, ["prune", str(src), "-o", str(tmp_path / "out.onnx")])
    assert code == 2 and "out.report.json: it is a folder" in err[0]
    assert not (tmp_path / "out.onnx").exists()


def test_an_input_shape_the_model_cannot_take_says_which_dim_is_wrong(tmp_path, capsys):
    src = tmp_path / "model.onnx"
    onnx.save(sample_cnn(), src)            # 3 input channels
    code, err = _run_cli(capsys, ["analyze", str(src), "--input-shape", "1,1,32,32"])
    assert code == 2 and len(err) == 1
    assert "index: 1 Got: 1 Expected: 3" in err[0] and "--input-shape" in err[0]


@pytest.mark.parametrize("command", [["prune", "--ratio", "0.5", "--finetune-epochs", "0"],
                                     ["push", "--epochs", "1"]])
def test_a_float64_model_with_data_is_refused_in_one_line(command, tmp_path, capsys):
    """onnxruntime runs a double MatMul/Gemm classifier; the torch backend fed it float32
    images and stopped with an internal error (exit 1)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s) * 0.3, n)
             for n, s in [("W1", (16, 12)), ("b1", (12,)), ("W2", (12, 5)), ("b2", (5,))]]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["m1"]),
             helper.make_node("Add", ["m1", "b1"], ["a1"]),
             helper.make_node("Relu", ["a1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "W2"], ["m2"]),
             helper.make_node("Add", ["m2", "b2"], ["y"])]
    graph = helper.make_graph(
        nodes, "mlp64", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["N", 5])], inits)
    src, data, out = tmp_path / "m.onnx", tmp_path / "d.npz", tmp_path / "out.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), src)
    np.savez(data, x=rng.standard_normal((100, 16)).astype(np.float32),
             y=rng.integers(0, 5, 100))
    code, err = _run_cli(capsys, [command[0], str(src), "--data", str(data), "-o", str(out),
                                  *command[1:]])
    assert code == 2
    assert len(err) == 1 and "float64" in err[0] and " - " in err[0]
    assert not out.exists()


def test_an_onnxruntime_optimised_model_is_refused_naming_each_reason_once(tmp_path, capsys):
    """A graph onnxruntime saved after its optimisations (FusedConv, FusedGemm): one line
    that says so and names each reason once (it repeated the FusedConv reason per node)."""
    import onnxruntime as ort

    src, opt = tmp_path / "m.onnx", tmp_path / "optimised.onnx"
    onnx.save(sample_cnn(), src)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(opt)
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    code, err = _run_cli(capsys, ["prune", str(opt), "--ratio", "0.5", "--no-latency",
                                  "-o", str(tmp_path / "out.onnx")])
    assert code == 2 and len(err) == 1
    assert "prune the model saved before its optimisations" in err[0]
    assert err[0].count("FusedConv") == 1
    assert not (tmp_path / "out.onnx").exists()
