"""Default widths keep onnxruntime's fast conv layout; a slower result is said, not hidden.

The reference is onnxruntime itself: the graph it runs after its optimisations (saved with
``optimized_model_filepath``) says which convs run in the blocked NCHWc layout."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from gpp_onnx import PruneConfig, latency, prune
from gpp_onnx.cli import main
from gpp_onnx.latency import NCHWC, LatencyCheck, Layout, channel_alignment, decided
from gpp_onnx.samples import GraphBuilder


def _ort_runs_nchwc(model: onnx.ModelProto, tmp_path) -> list[bool]:
    """For each Conv of the graph onnxruntime runs: is it in the NCHWc domain?"""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.optimized_model_filepath = str(tmp_path / "ort.onnx")
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    nodes = onnx.load(str(tmp_path / "ort.onnx")).graph.node
    return [n.domain == NCHWC for n in nodes if n.op_type in ("Conv", "FusedConv")]


def _depthwise(channels: int) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((channels, 1, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], group=channels, pads=[1, 1, 1, 1])], "dw",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 8, 8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _separable_net() -> onnx.ModelProto:
    """Depthwise-separable blocks like mobilenet's (the family that slowed down when cut)."""
    b = GraphBuilder((1, 3, 32, 32), seed=0)
    x = b.act(b.conv("input", 32, stride=2), "Relu")
    for width in (64, 96, 128):
        x = b.act(b.conv(x, b.channels(x), groups=b.channels(x)), "Relu")   # depthwise
        x = b.act(b.conv(x, width, k=1), "Relu")                             # pointwise
    return b.build(b.gemm(b.flatten(b.gap(x)), 10))


def _nchwc_available(tmp_path) -> bool:
    b = channel_alignment()
    return all(_ort_runs_nchwc(_depthwise(2 * b), tmp_path))


def test_alignment_is_the_width_onnxruntime_runs_in_its_fast_layout(tmp_path):
    if not _nchwc_available(tmp_path):
        pytest.skip("this onnxruntime build has no NCHWc layout")
    b = channel_alignment()
    assert b in (4, 8, 16, 32)
    assert all(_ort_runs_nchwc(_depthwise(3 * b), tmp_path))
    assert not any(_ort_runs_nchwc(_depthwise(2 * b + 1), tmp_path))  # an odd width falls off


def test_default_widths_keep_every_conv_in_the_fast_layout(tmp_path):
    if not _nchwc_available(tmp_path):
        pytest.skip("this onnxruntime build has no NCHWc layout")
    model = _separable_net()
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    assert all(_ort_runs_nchwc(model, tmp_path))
    default = prune(src, tmp_path / "d.onnx", PruneConfig(target_macs=0.45, latency=False))
    prune(src, tmp_path / "f.onnx",
          PruneConfig(target_macs=0.45, round_to=1, latency=False))
    assert default.after.macs <= 0.45 * default.before.macs
    assert all(_ort_runs_nchwc(onnx.load(str(tmp_path / "d.onnx")), tmp_path))
    # the same request with free widths leaves the fast layout: the test can tell them apart
    assert not all(_ort_runs_nchwc(onnx.load(str(tmp_path / "f.onnx")), tmp_path))
    b = channel_alignment()
    kept = [w - len(default.plan.removed.get(k, ())) for k, w in default.plan.widths.items()]
    assert all(k % b == 0 for k in kept) and default.plan.meta["round_to"] == b


def test_an_unreachable_target_falls_back_to_finer_multiples(tmp_path):
    b = GraphBuilder((1, 3, 16, 16), seed=0)
    x = b.act(b.conv(b.act(b.conv("input", 8), "Relu"), 8), "Relu")   # narrower than the block
    src = tmp_path / "m.onnx"
    onnx.save(b.build(b.gemm(b.flatten(b.gap(x)), 4)), src)
    result = prune(src, tmp_path / "p.onnx", PruneConfig(target_macs=0.5, latency=False))
    assert result.after.macs <= 0.5 * result.before.macs
    assert result.plan.meta["round_to"] < channel_alignment()


def test_layout_counts_the_convs_that_left_the_fast_layout(tmp_path):
    if not _nchwc_available(tmp_path):
        pytest.skip("this onnxruntime build has no NCHWc layout")
    b = channel_alignment()
    assert Layout.of(_depthwise(2 * b)).plain_convs == 0
    assert Layout.of(_depthwise(2 * b + 1)).plain_convs == 1


def test_slower_models_are_reported_with_the_fix():
    assert LatencyCheck(0.8).warning(None) is None
    free = LatencyCheck(1.3, Layout(52, 0, 1), Layout(33, 19, 20)).warning(1)
    assert "x1.30" in free and "19 of 52 convs" in free and "leave out --round-to" in free
    # convs fell back without more reorders (a chain that leaves the layout at its start)
    quiet = LatencyCheck(1.14, Layout(20, 0, 1), Layout(1, 19, 1)).warning(1)
    assert "19 of 20 convs left" in quiet
    default = LatencyCheck(1.1).warning(None)
    assert "slower" in default and "leave out" not in default


def test_prune_summary_and_report_warn_when_the_result_is_slower(tmp_path, monkeypatch, capsys):
    b = GraphBuilder((1, 3, 16, 16), seed=0)
    src = tmp_path / "m.onnx"
    onnx.save(b.build(b.gemm(b.flatten(b.gap(b.act(b.conv("input", 32), "Relu"))), 4)), src)
    monkeypatch.setattr(latency, "paired_ratio", lambda sessions, feeds, budget_s, **kw: 1.5)
    out = tmp_path / "p.onnx"
    assert main(["-q", "prune", str(src), "--ratio", "0.5", "-o", str(out)]) == 0
    summary = capsys.readouterr().out
    assert "warning: the pruned model is slower than the original here (latency x1.50)" in summary
    report = json.loads((tmp_path / "p.report.json").read_text())
    assert report["ratios"]["latency"] == 1.5 and len(report["warnings"]) == 1


def test_gpp_summary_and_report_warn_when_the_result_is_slower(trained, tmp_path,
                                                              monkeypatch, capsys):
    monkeypatch.setattr(latency, "paired_ratio", lambda sessions, feeds, budget_s, **kw: 1.5)
    out = tmp_path / "g.onnx"
    assert main(["-q", "gpp", str(trained), "--data", "digits", "--target-macs", "0.5",
                 "--rounds", "1", "--budget-epochs", "2", "-o", str(out)]) == 0
    summary = capsys.readouterr().out
    assert "warning: the pruned model is slower than the original here (latency x1.50)" in summary
    report = json.loads((tmp_path / "g.report.json").read_text())
    assert report["ratios"]["latency"] == 1.5 and len(report["warnings"]) == 1


def test_decided_only_when_the_rounds_leave_no_doubt():
    assert decided([0.25, 0.22, 0.27, 0.24])                  # t test, 4 rounds
    assert decided([1.9, 2.4, 2.1, 2.2, 2.0])                 # slower, just as clear
    assert decided([0.25, 0.26, 0.25])                        # 3 rounds, +-5%
    assert not decided([0.25, 0.22, 0.30])                    # 3 rounds, +-20%: not yet
    assert not decided([0.25, 0.25])                          # too few rounds
    assert not decided([0.25, 0.22, 1.1, 0.24])               # not all on one side
    spread = [0.5, 0.9, 0.3, 0.99, 0.7, 0.2, 0.95, 0.6, 0.8, 0.4, 0.9]
    assert decided(spread)                                    # sign test, 11/11
    assert not decided(spread[:10])                           # 10/10: p = 0.002
    assert not decided(spread[:3] + [1.01] + spread[4:])      # 10/11
    assert not decided([0.98, 1.03, 0.97, 1.01] * 10)         # near 1: runs the budget
    assert not decided([1.0] * 6)                             # exactly on it


def test_an_early_decision_is_rarely_on_the_wrong_side():
    """Noisy rounds (+-20%) around a true ratio 2% off the threshold, either way: how often
    the loop stops early with the median on the wrong side (reference: the median of 30
    rounds is on the wrong side about a third of the time here)."""
    rng = np.random.default_rng(0)
    wrong = runs = 0
    for true in (0.98, 1.02):
        for _ in range(300):
            ratios = list(np.exp(np.log(true) + 0.2 * rng.standard_normal(40)))
            n = next((n for n in range(3, 41) if decided(ratios[:n])), None)
            runs += 1
            wrong += n is not None and (np.median(ratios[:n]) >= 1) != (true >= 1)
    assert wrong / runs < 0.01


class _FakeSession:
    """Runs take `seconds` of a fake clock."""

    def __init__(self, clock: list, seconds: float):
        self.clock, self.seconds, self.runs = clock, seconds, 0

    def run(self, names, feeds):
        self.clock[0] += self.seconds
        self.runs += 1

    def get_inputs(self):
        return []


def test_the_paired_loop_stops_once_decided(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(latency.time, "perf_counter", lambda: clock[0])
    fast, slow = _FakeSession(clock, 0.01), _FakeSession(clock, 0.04)
    assert latency.paired_ratio([slow, fast], {}, budget_s=10.0, threshold=1.0) == pytest.approx(0.25)
    assert fast.runs == 1 + 3           # warm-up + three rounds
    clock[0] = 0.0
    fast, slow = _FakeSession(clock, 0.01), _FakeSession(clock, 0.04)
    assert latency.paired_ratio([slow, fast], {}, budget_s=10.0) == pytest.approx(0.25)
    assert fast.runs > 100              # no threshold: the whole budget


def test_profile_table_shows_noise_around_zero_as_zero():
    """A group whose measured cost is a hair below zero shows 0.0%, not -0.0%; real values
    keep their sign."""
    from types import SimpleNamespace

    from gpp_onnx.report import profile_table

    prof = SimpleNamespace(total_seconds=1e-3, fixed_seconds=5e-4, block=16, groups=[
        {"key": "a", "width": 8, "share": -0.0001, "us_per_channel": -0.001},
        {"key": "b", "width": 8, "share": -0.02, "us_per_channel": -0.5}])
    lines = profile_table(prof).splitlines()
    row_a = next(line for line in lines if line.split()[0] == "a").split()
    row_b = next(line for line in lines if line.split()[0] == "b").split()
    assert row_a[2:] == ["0.0%", "0.00"]
    assert row_b[2:] == ["-2.0%", "-0.50"]


def test_a_latency_target_over_rounds_is_planned_as_the_product_of_the_rounds():
    from types import SimpleNamespace

    from gpp_onnx.report import planned_latency

    def round_(measured, tries):
        return SimpleNamespace(plan=SimpleNamespace(
            meta={"latency_measured": measured, "latency_tries": [[0, 0]] * tries}))

    rounds = (round_(0.7, 2), round_(0.75, 1))
    result = SimpleNamespace(rounds=rounds, plan=rounds[-1].plan)
    assert planned_latency(result) == (pytest.approx(0.525), 3)


def test_a_latency_target_is_checked_on_a_ratio_timed_like_the_plans(monkeypatch):
    # the early stop (threshold 1.0) only says which model is faster, after as few as 3
    # rounds: a ratio that noisy, read against --target-latency + 0.05, warned on half the
    # resnet18 runs whose plan measured 0.49-0.51
    calls = []

    def fake(sessions, feeds, budget_s=1.0, **kw):
        calls.append(dict(kw, budget_s=budget_s))
        return 0.5

    monkeypatch.setattr(latency, "paired_ratio", fake)
    b = GraphBuilder((1, 3, 16, 16), seed=0)
    model = b.build(b.gemm(b.flatten(b.gap(b.act(b.conv("input", 32), "Relu"))), 4))
    res = prune(model, target_latency=0.5)
    assert calls[-1].get("threshold") is None and calls[-1]["budget_s"] >= 2.0
    assert res.latency_ratio == 0.5
    prune(model, ratio=0.5)
    assert calls[-1]["threshold"] == 1.0       # without a target: stop once decided


def test_the_original_is_timed_with_its_initializers_shared_as_the_cut_model_has(monkeypatch):
    # normalising gives each user of a shared initializer its own copy, the cut shares
    # identical ones again; onnxruntime runs float16 convs in NCHWc only where their bias
    # is not shared, so timing the normalised copy made a float16 mobilenet_v2's prune
    # "x1.27 slower" where it ran at 0.73 of the input file
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.zeros(32, np.float16), "bias")]
    nodes, x, cin = [], "x", 3
    for i in range(3):
        w = (rng.standard_normal((32, cin, 3, 3)) * 0.1).astype(np.float16)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes += [helper.make_node("Identity", ["bias"], [f"b{i}"]),   # as the legacy exporter
                  helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        x, cin = f"r{i}", 32
    inits += [numpy_helper.from_array(np.ones((4, 32), np.float16), "fc"),
              numpy_helper.from_array(np.zeros(4, np.float16), "fc_b")]
    nodes += [helper.make_node("GlobalAveragePool", [x], ["g"]),
              helper.make_node("Flatten", ["g"], ["f"]),
              helper.make_node("Gemm", ["f", "fc", "fc_b"], ["y"], transB=1)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    timed, real = [], latency.session
    monkeypatch.setattr(latency, "session", lambda m, where, options:
                        timed.append((where, m)) or real(m, where, options))
    prune(model, ratio=0.5)
    originals = [m for where, m in timed if where == "input model"]
    assert originals, "the original was timed in its normalised form (biases unshared)"
    assert len({n.input[2] for n in originals[-1].graph.node if n.op_type == "Conv"}) == 1


def test_compare_reads_the_ratio_from_paired_rounds(monkeypatch, tmp_path):
    """The ratio of two separate medians swung from 0.15 to 1.2 between `compare` runs on a
    busy machine: the printed ratio is the paired one (the medians stay for the ms)."""
    from gpp_onnx import pipeline

    b = GraphBuilder((1, 3, 16, 16), seed=0)
    model = b.build(b.gemm(b.flatten(b.gap(b.act(b.conv("input", 32), "Relu"))), 4))
    onnx.save(model, tmp_path / "a.onnx")
    prune(tmp_path / "a.onnx", tmp_path / "b.onnx", ratio=0.5, latency=False)
    monkeypatch.setattr(latency, "medians", lambda *a, **k: [1e-3, 2e-3])
    monkeypatch.setattr(latency, "paired_ratio", lambda sessions, feeds, **k: 0.4)
    cmp = pipeline.compare(tmp_path / "a.onnx", tmp_path / "b.onnx")
    assert cmp.latency_ratio == 0.4 and cmp.latency_b == 2e-3
