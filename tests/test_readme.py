"""The README's commands stay true: every `gpp-onnx` line parses with the real CLI, and the
data-free examples run on a real model."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import onnx
import pytest

from gpp_onnx.cli import build_parser, main
from gpp_onnx.samples import sample_cnn

README = Path(__file__).resolve().parents[1] / "README.md"


def _commands() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    cmds = []
    for block in blocks:
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("gpp-onnx "):
                cmds.append(shlex.split(line)[1:])
    return cmds


def test_readme_has_the_two_setup_commands_first():
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S).group(1)
    lines = [l for l in first_block.splitlines() if l and not l.startswith("#")]
    assert "pip install" in lines[0] and lines[0].endswith("gpp-onnx demo")
    assert lines[1].endswith("python -m pytest -q")


@pytest.mark.parametrize("argv", _commands(), ids=lambda a: " ".join(a)[:60])
def test_readme_command_parses(argv):
    build_parser().parse_args(argv)


def test_readme_data_free_examples_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    onnx.save(sample_cnn(), tmp_path / "model.onnx")
    ran = 0
    for argv in _commands():
        data_free = "--data" not in argv and "--plan" not in argv and "--at" not in argv
        if argv[0] in ("analyze", "prune", "compare", "grow") and data_free:
            if argv[0] == "compare":
                argv = argv + ["--repeats", "3"]
            assert main(["-q", *argv, *([] if argv[0] != "prune" else ["--no-latency"])]) == 0, argv
            ran += 1
    assert ran >= 6


def test_readme_python_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    onnx.save(sample_cnn(), tmp_path / "model.onnx")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    assert (tmp_path / "small.onnx").exists() and (tmp_path / "small.report.json").exists()
