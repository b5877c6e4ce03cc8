"""gpp-onnx grow on the command line: the insert-only path, and bad input as a one-line
error, exit 2, nothing written."""
import json

import onnx
import pytest

from gpp_onnx.cli import main
from gpp_onnx.samples import GraphBuilder, digits_cnn

from conftest import feeds_for, rel_err, run_model


def _cli(capsys, args):
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("gpp-onnx: error:")]
    assert not any("Traceback" in line for line in err)
    return code, errors


@pytest.fixture
def digits(tmp_path):
    path = tmp_path / "digits.onnx"
    onnx.save(digits_cnn(), path)
    return path


def test_insert_only_writes_a_model_that_computes_the_same(digits, tmp_path, capsys):
    out = tmp_path / "grown.onnx"
    code, errors = _cli(capsys, ["grow", str(digits), "--max-modules", "1", "--epochs", "0",
                                 "-o", str(out)])
    assert code == 0 and not errors
    feeds = feeds_for(onnx.load(str(digits)))
    assert rel_err(run_model(out, feeds), run_model(digits, feeds)) < 1e-5
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert len(report["modules"]) == 1 and report["modules"][0]["kept"]
    assert report["after"]["params"] - report["before"]["params"] == report["modules"][0]["params"]


def _mlp(tmp_path):
    b = GraphBuilder((1, 1, 4, 4), seed=0)
    path = tmp_path / "mlp.onnx"
    onnx.save(b.build(b.gemm(b.act(b.gemm(b.flatten("input"), 8), "Relu"), 3)), path)
    return path


def _three_classes(tmp_path):
    b = GraphBuilder((1, 1, 8, 8), seed=0)
    path = tmp_path / "three.onnx"
    onnx.save(b.build(b.gemm(b.flatten(b.gap(b.act(b.conv("input", 8), "Relu"))), 3)), path)
    return path


def _residual(tmp_path):
    b = GraphBuilder((1, 3, 8, 8), seed=0)
    x = b.act(b.conv("input", 8), "Relu")
    y = b.binary("Add", x, b.conv(x, 8))
    path = tmp_path / "res.onnx"
    onnx.save(b.build(b.gemm(b.flatten(b.gap(y)), 3)), path)
    return path, x


def _silu(tmp_path):
    """Conv -> x * Sigmoid(x) blocks: the conv's output feeds two ops, so no block end
    can take a module; the error names that, not reasons that do not apply."""
    b = GraphBuilder((1, 1, 8, 8), seed=0)
    x = b.conv("input", 8)
    x = b.binary("Mul", x, b.act(x, "Sigmoid"))
    path = tmp_path / "silu.onnx"
    onnx.save(b.build(b.gemm(b.flatten(b.gap(x)), 3)), path)
    return path


CASES = [
    ("digits", ["--at", "gemm20"], "not a 4-D"),                       # a 2-D value
    ("digits", ["--at", "no_such_value"], "not a value of the model"),
    ("digits", ["--at", "input"], "model input"),
    ("mlp", [], "no Conv"),
    ("digits", ["--branch-widths", "300000,300000,300000"], "GiB"),    # memory estimate
    ("digits", ["--branch-widths", "6000,6000,6000"], "over the 2 GiB an ONNX file holds"),
    ("three", ["--data", "digits", "--epochs", "1"], "label"),         # 10 classes, 3 outputs
    ("digits", ["--epochs", "1"], "needs --data"),
    ("digits", ["--max-modules", "1", "--at", "a1", "--at", "a2"], "names 2 positions"),
    ("residual", ["--at", "RESIDUAL"], "cannot grow there"),
    ("silu", [], "consumer"),
]


@pytest.mark.parametrize("kind,extra,message", CASES)
def test_bad_input_is_one_line_exit_2_nothing_written(kind, extra, message, digits, tmp_path,
                                                      capsys):
    if kind == "digits":
        path = digits
    elif kind == "mlp":
        path = _mlp(tmp_path)
    elif kind == "three":
        path = _three_classes(tmp_path)
    elif kind == "silu":
        path = _silu(tmp_path)
    else:
        path, value = _residual(tmp_path)
        extra = [value if e == "RESIDUAL" else e for e in extra]
    before = path.read_bytes()
    out = tmp_path / "out.onnx"
    code, errors = _cli(capsys, ["grow", str(path), "-o", str(out), *extra])
    assert code == 2
    assert len(errors) == 1 and message in errors[0], errors
    assert not out.exists() and not out.with_suffix(".report.json").exists()
    assert path.read_bytes() == before


def test_analyze_lists_each_grown_module_with_its_branch_groups(digits, tmp_path, capsys):
    out = tmp_path / "grown.onnx"
    assert main(["grow", str(digits), "--max-modules", "2", "--epochs", "0",
                 "--branch-widths", "24,16,8", "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["analyze", str(out)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines()
             if line.startswith("grown module")]
    assert len(lines) == 2
    # digits_cnn: 16 channels at both positions; branch widths as asked
    for k, line in zip((1, 2), sorted(lines)):
        assert line == (f"grown module grow{k}: 1x1 -> group grow{k}.1x1 (16), 3x3 -> group "
                        f"grow{k}.3x3 (24), 3x3dbl -> group grow{k}.3x3dbl.b (16), pool -> "
                        f"group grow{k}.pool.1x1 (8)")
