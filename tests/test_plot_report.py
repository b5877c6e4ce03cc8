"""tools/plot_report.py refuses a JSON of another kind with one line and exit 2 (a prune
report and a profile's JSON both hold "groups"; each given to the other's plot ended in a
KeyError traceback)."""
import json

import pytest

from conftest import tool_module

pytest.importorskip("matplotlib")


def _tool():
    return tool_module("plot_report")


PRUNE = {"input": "m.onnx", "config": {"criterion": "l1"}, "ratios": {"macs": 0.5, "params": 0.5},
         "groups": [{"key": "/c/Conv_output_0", "width": 16, "kept": 8, "prunable": True}]}
PROFILE = {"total_seconds": 1e-3, "fixed_seconds": 1e-4, "block": 8,
           "groups": [{"key": "/c/Conv_output_0", "width": 16, "share": 0.5,
                       "us_per_channel": 1.0, "curve": [[8, 5e-4], [16, 1e-3]]}]}


@pytest.mark.parametrize("command, given", [("widths", PROFILE), ("latency", PRUNE),
                                            ("sweep", PRUNE)])
def test_other_kind_refused(tmp_path, capsys, command, given):
    src = tmp_path / "x.json"
    src.write_text(json.dumps(given))
    with pytest.raises(SystemExit) as exit_:
        _tool().main([command, str(src), "-o", str(tmp_path / "x.png")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("plot_report: error:") and "\n" not in err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("command, given", [("widths", PRUNE), ("latency", PROFILE)])
def test_own_kind_drawn(tmp_path, command, given):
    src = tmp_path / "x.json"
    src.write_text(json.dumps(given))
    _tool().main([command, str(src), "-o", str(tmp_path / "x.png")])
    assert (tmp_path / "x.png").stat().st_size > 0
