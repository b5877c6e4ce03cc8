"""Global allocation and latency targets: the budget goes where the utility per cost is."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from gpp_onnx import latency
from gpp_onnx.allocate import fill, plan_global
from gpp_onnx.analysis import analyze_model
from gpp_onnx.cli import main
from gpp_onnx.latency_model import LatencyModel, plan_for_latency
from gpp_onnx.model import normalize
from gpp_onnx.plan import PrunePlan, kept_elements, plan_by_ratio
from gpp_onnx.samples import GraphBuilder


def _chain(widths=(32, 32, 32), side=16) -> onnx.ModelProto:
    b = GraphBuilder((1, 3, side, side), seed=0)
    x = "input"
    for w in widths:
        x = b.act(b.conv(x, w), "Relu")
    return b.build(b.gemm(b.flatten(b.gap(x)), 4))


def _analysis(model):
    return analyze_model(normalize(model))


def _linear_cost(analysis, weights: dict[str, float]):
    """An independent cost: sum over groups of weight * kept channels."""
    def cost(kept):
        total = 0.0
        for g in analysis.prunable:
            m = g.members[0]
            n = len(kept[m.value]) // m.elements.shape[1] if m.value in kept else g.width
            total += weights[g.key] * n
        return total
    return cost


def test_global_allocation_cuts_the_expensive_group_first():
    analysis = _analysis(_chain())
    keys = [g.key for g in analysis.prunable]
    scores = {k: np.linspace(1, 2, 32) for k in keys}   # the same utilities everywhere
    weights = {k: 1.0 for k in keys}
    weights[keys[1]] = 10.0                               # one group costs 10x per channel
    cost = _linear_cost(analysis, weights)
    goal = 0.7 * cost({})
    plan = plan_global(analysis, scores, "d", cost, goal)
    assert cost(kept_elements(analysis, plan)) <= goal
    removed = {k: len(plan.removed[k]) for k in keys}
    assert removed[keys[1]] > max(removed[k] for k in keys if k != keys[1])
    assert plan.meta["allocation"] == "global"


def _random_scores(seed: int):
    """The 3-conv chain, random scores and a cost of one unit per kept channel."""
    analysis = _analysis(_chain())
    keys = [g.key for g in analysis.prunable]
    rng = np.random.default_rng(seed)
    scores = {k: rng.random(32) for k in keys}
    return analysis, keys, scores, _linear_cost(analysis, {k: 1.0 for k in keys})


def _kept_are_the_best(plan, scores, key) -> list[int]:
    kept = sorted(set(range(32)) - set(plan.removed[key]))
    assert min(scores[key][kept]) >= max(scores[key][list(plan.removed[key])])
    return kept


def test_global_allocation_keeps_the_floor_and_the_best_channels():
    analysis, keys, scores, cost = _random_scores(0)
    plan = plan_global(analysis, scores, "d", cost, 0.01 * cost({}), min_keep=3, round_to=4)
    for k in keys:
        kept = _kept_are_the_best(plan, scores, k)               # lowest scores go
        assert len(kept) >= 3 and len(kept) % 4 == 0              # floor, then multiple


def test_fill_spends_what_is_left_on_the_cheapest_channels_and_stops_at_the_goal():
    analysis = _analysis(_chain())
    keys = [g.key for g in analysis.prunable]
    scores = {k: np.linspace(1, 2, 32) for k in keys}
    cost = _linear_cost(analysis, {keys[0]: 1.0, keys[1]: 10.0, keys[2]: 2.0})
    half = plan_by_ratio(analysis, scores, 0.5, "d", round_to=4)   # 16 of each go: cost 208
    assert cost(kept_elements(analysis, half)) == 208
    # 20 left: group 0's 16 channels cost 16; then a block of 4 of group 2 (8) no longer
    # fits, nor one of group 1 (40)
    plan = fill(analysis, half, scores, cost, 228.0, round_to=4)
    assert plan.removed[keys[0]] == ()
    assert plan.removed[keys[1]] == half.removed[keys[1]]
    assert plan.removed[keys[2]] == half.removed[keys[2]]
    assert cost(kept_elements(analysis, plan)) == 224
    assert plan.meta["filled_from"] == pytest.approx(208 / 228)


def test_fill_gives_back_the_best_scored_channels_in_blocks_and_skips_fixed_groups():
    analysis, keys, scores, cost = _random_scores(1)
    start = plan_by_ratio(analysis, scores, 0.75, "d", round_to=4)    # 8 kept of each
    plan = fill(analysis, start, scores, cost, 8 * 3 + 12.0, round_to=4, fixed={keys[1]})
    assert plan.removed[keys[1]] == start.removed[keys[1]]
    assert cost(kept_elements(analysis, plan)) == 36    # the 12 left, in blocks of 4
    for k in keys:
        kept = _kept_are_the_best(plan, scores, k)
        assert len(kept) % 4 == 0 and set(plan.removed[k]) <= set(start.removed[k])


def _conv_macs(widths, cin=3, side=16, k=3) -> int:
    """MACs of a chain of same-padded 3x3 convs of these output widths."""
    total = 0
    for w in widths:
        total, cin = total + cin * w * k * k * side * side, w
    return total


def test_a_macs_target_spends_the_budget_the_rounded_uniform_widths_leave(tmp_path):
    src = tmp_path / "m.onnx"
    full = (24, 40, 24)
    onnx.save(_chain(widths=full, side=16), src)
    out = tmp_path / "p.onnx"
    assert main(["-q", "prune", str(src), "--target-macs", "0.4", "--round-to", "8",
                 "--no-latency", "-o", str(out)]) == 0
    kept = [int(i.dims[0]) for i in onnx.load(out).graph.initializer if len(i.dims) == 4]
    goal = 0.4 * _conv_macs(full)
    assert _conv_macs(kept) <= goal
    # the uniform ratio alone keeps 16 of each (0.28 of the MACs); no group could take
    # another block of 8 within the target
    assert _conv_macs(kept) > _conv_macs((16, 16, 16))
    for i, w in enumerate(kept):
        if w < full[i]:
            wider = kept[:i] + [min(w + 8, full[i])] + kept[i + 1:]
            assert _conv_macs(wider) > goal


def test_early_rounds_round_widths_to_the_block_the_last_round_needs():
    """Round 1 of 3 has a mild goal that 8-channel blocks reach, but the last round's
    goal needs blocks of 4: round 1 already rounds to 4, as the last round does, where
    the same goal in a single round rounds to 8."""
    from gpp_onnx.config import PruneConfig
    from gpp_onnx.rounds import _plan_for_cost

    analysis = _analysis(_chain(widths=(32, 32, 32), side=8))
    rng = np.random.default_rng(0)
    scores = {g.key: rng.random(g.width) + 0.1 for g in analysis.prunable}

    def plan(fraction, rounds, k):
        return _plan_for_cost(analysis, PruneConfig(target_macs=fraction, rounds=rounds),
                              scores, "d", k, None, (8, 4, 2, 1), {}, {})

    first, last = plan(0.03, 3, 1), plan(0.03, 3, 3)
    alone = plan(0.03 ** (1 / 3), 1, 1)
    assert alone.meta["round_to"] == 8
    assert first.meta["round_to"] == last.meta["round_to"] == 4
    for g in analysis.prunable:
        assert (g.width - len(first.removed[g.key])) % 4 == 0


def test_latency_model_charges_kernels_to_channels_and_falls_with_the_cut():
    analysis = _analysis(_chain(widths=(32, 64, 64), side=32))
    feeds = analysis.view.probe_feeds
    model = LatencyModel.profile(analysis, feeds, runs=5)
    assert model.fixed < 0.2 * model.total          # almost all time is tied to channels
    assert model.estimate({}) == pytest.approx(model.total)
    keys = [g.key for g in analysis.prunable]
    half = {k: tuple(range(g.width // 2)) for k, g in zip(keys, analysis.prunable)}
    kept = kept_elements(analysis, PrunePlan(half, {g.key: g.width for g in analysis.prunable},
                                             "d"))
    assert model.estimate(kept) < 0.8 * model.total


def test_latency_target_corrects_the_goal_by_what_it_measures(monkeypatch):
    analysis = _analysis(_chain(widths=(32, 64, 64), side=32))
    measured = iter([0.7, 0.45, 0.51])
    monkeypatch.setattr(latency, "paired_ratio", lambda sessions, feeds, budget_s: next(measured))
    keys = [g.key for g in analysis.prunable]
    scores = {g.key: np.arange(g.width, dtype=float) + 1 for g in analysis.prunable}
    found = plan_for_latency(analysis, scores, "d", 0.5, analysis.view.probe_feeds)
    goals = [g for g, _ in found.tries]
    second = 0.5 * 0.5 / 0.7                     # scaled by target / measured
    third = second + (0.5 - 0.45) * (0.5 - second) / (0.7 - 0.45)   # between both sides
    assert goals == pytest.approx([0.5, second, third])
    assert found.measured == 0.51            # within 3% of the target: the loop stops there
    assert len(found.tries) == 3 and set(found.plan.removed) <= set(keys)


@pytest.mark.parametrize("allocation", [None, "uniform"])
def test_target_latency_from_the_cli_writes_a_verified_plan(tmp_path, allocation):
    src = tmp_path / "m.onnx"
    onnx.save(_chain(widths=(32, 64, 64), side=32), src)
    out = tmp_path / "p.onnx"
    extra = ["--allocation", allocation] if allocation else []
    assert main(["-q", "prune", str(src), "--target-latency", "0.6", *extra, "-o",
                 str(out)]) == 0
    report = json.loads((tmp_path / "p.report.json").read_text())
    meta = report["plan"]["meta"]
    assert meta["allocation"] == (allocation or "global") and meta["latency_tries"]
    assert report["after"]["macs"] < report["before"]["macs"]


@pytest.mark.parametrize("argv", [["--ratio", "0.5", "--allocation", "global"],
                                  ["--target-latency", "0"], ["--target-latency", "1.5"]])
def test_bad_latency_and_allocation_options_exit_2(tmp_path, argv, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(_chain(), src)
    out = tmp_path / "p.onnx"
    assert main(["-q", "prune", str(src), *argv, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and not out.exists()


def test_profile_command_prices_every_prunable_group(tmp_path, capsys):
    import gpp_onnx

    src = tmp_path / "m.onnx"
    onnx.save(_chain(widths=(32, 64, 64), side=32), src)
    out = tmp_path / "prof.json"
    assert main(["-q", "profile", str(src), "--runs", "3", "--json", str(out)]) == 0
    assert "latency share" in capsys.readouterr().out
    prof = json.loads(out.read_text())
    prunable = {g.key for g in gpp_onnx.analyze(src).analysis.prunable}
    assert {g["key"] for g in prof["groups"]} == prunable
    for g in prof["groups"]:
        assert 0 < g["share"] < 1 and g["curve"][-1][0] == g["width"]
        times = [t for _, t in g["curve"]]
        assert times == sorted(times)          # a narrower group never costs more


def test_kernel_profiles_are_cached_per_model_and_timing(tmp_path, monkeypatch):
    from gpp_onnx import latency_model
    from gpp_onnx.config import LatencyOptions

    analysis = _analysis(_chain(widths=(32, 64, 64), side=32))
    feeds = analysis.view.probe_feeds
    options = LatencyOptions(cache=str(tmp_path))
    first = LatencyModel.profile(analysis, feeds, runs=3, options=options)
    assert len(list((tmp_path / "latency").glob("*.json"))) == 1

    def no_profiling(*args, **kwargs):
        raise AssertionError("profiled again although the cache holds this model")

    monkeypatch.setattr(latency_model, "_kernel_times", no_profiling)
    again = LatencyModel.profile(analysis, feeds, runs=3, options=options)
    assert again.total == first.total
    with pytest.raises(AssertionError, match="profiled again"):   # other threads: other key
        LatencyModel.profile(analysis, feeds, runs=3,
                             options=LatencyOptions(threads=1, cache=str(tmp_path)))


def test_a_groups_latency_share_does_not_depend_on_the_points_of_its_curve():
    from gpp_onnx.latency_model import group_costs

    analysis = _analysis(_chain(widths=(32, 64, 64), side=32))
    model = LatencyModel.profile(analysis, analysis.view.probe_feeds, runs=3)
    one = {r["key"]: r["share"] for r in group_costs(analysis, model, points=1)}
    eight = {r["key"]: r["share"] for r in group_costs(analysis, model, points=8)}
    assert one == pytest.approx(eight) and all(v > 0 for v in one.values())


@pytest.mark.parametrize("entry", ['[]', '"x"', '{"kernels": []}', '{"kernels": {"a": "b"}}',
                                   '{"kernels": {}}', "not json", '{"kernels": {"a": NaN}}',
                                   '{"kernels": {"a": -1.0}}', '{"kernels": {"a": Infinity}}',
                                   '{"kernels": {"a": 0.0, "b": 0}}'])
def test_a_damaged_cache_entry_is_measured_again(entry, tmp_path):
    from gpp_onnx.config import LatencyOptions

    analysis = _analysis(_chain(widths=(32, 64, 64), side=32))
    feeds = analysis.view.probe_feeds
    options = LatencyOptions(cache=str(tmp_path))
    first = LatencyModel.profile(analysis, feeds, runs=3, options=options)
    (path,) = (tmp_path / "latency").glob("*.json")
    path.write_text(entry)
    again = LatencyModel.profile(analysis, feeds, runs=3, options=options)
    assert again.total > 0
    assert {k.values for k in again.kernels} == {k.values for k in first.kernels}
    assert "kernels" in json.loads(path.read_text())       # replaced by the new profile


def test_cuda_without_onnxruntime_gpu_is_refused_before_the_work(tmp_path, capsys):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    src = tmp_path / "m.onnx"
    onnx.save(_chain(), src)
    out = tmp_path / "p.onnx"
    assert main(["-q", "prune", str(src), "--provider", "cuda", "-o", str(out)]) == 2
    assert main(["-q", "profile", str(src), "--provider", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("onnxruntime-gpu" in line for line in err)
    assert not out.exists()


def test_a_profile_cut_short_by_a_full_temporary_folder_is_a_one_line_error(
        tmp_path, monkeypatch, capsys):
    import onnxruntime as ort

    real = ort.InferenceSession.end_profiling

    def cut_short(self):       # what onnxruntime leaves on a full disk: the first 4 KiB
        path = real(self)
        with open(path, "r+b") as f:
            f.truncate(4096)
        return path

    monkeypatch.setattr(ort.InferenceSession, "end_profiling", cut_short)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    src = tmp_path / "m.onnx"
    onnx.save(_chain(widths=(32, 64, 64), side=32), src)
    assert main(["-q", "profile", str(src), "--no-latency-cache"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "TMPDIR" in err[0] and str(tmp_path) in err[0]
    assert "internal error" not in err[0]


def test_kernel_profiles_are_cached_under_xdg_cache_home_where_it_is_set(tmp_path, monkeypatch):
    src = tmp_path / "m.onnx"
    onnx.save(_chain(), src)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert main(["-q", "profile", str(src)]) == 0
    assert len(list((tmp_path / "xdg" / "gpp-onnx" / "latency").glob("*.json"))) == 1
    assert not (tmp_path / "home").exists()
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")    # ignored, as the rule says
    assert main(["-q", "profile", str(src)]) == 0
    assert len(list((tmp_path / "home" / ".cache" / "gpp-onnx" / "latency").glob("*.json"))) == 1
