"""Reports: plain-text tables for the CLI and the JSON report written beside a model."""
from __future__ import annotations

import json
import math

import numpy as np


def human(n: float, unit: str = "") -> str:
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def plural(n: int, word: str) -> str:
    """'1 group', '2 groups', '3 worker processes'."""
    return f"{n} {word}" + ("" if n == 1 else "es" if word.endswith("s") else "s")


def table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or "l" + "r" * (len(headers) - 1)
    lines = []
    for n, row in enumerate(cells):
        parts = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def analysis_table(result) -> str:
    rows = []
    for g in result.analysis.groups:
        share = result.shares[g.key]
        rows.append([g.key, g.width, len(g.members), "yes" if g.prunable else "no",
                     f"{100 * share.params:.1f}%", f"{100 * share.macs:.1f}%",
                     "" if g.prunable else g.reason])
    a = result.analysis
    shapes = ", ".join(f"'{s.name}': {'x'.join(map(str, s.shape))}" for s in a.view.inputs)
    head = (f"{len(a.groups)} channel groups, {len(a.prunable)} prunable; "
            f"{human(result.stats.params)} params, {human(result.stats.macs)} MACs "
            f"(input {shapes}; --input-shape sets free sizes)")
    body = table(["group", "width", "members", "prunable", "params", "MACs", "why not"],
                 rows, "lrrlrrl")
    return "\n".join([head, body, *grown_modules(a)])


def grown_modules(analysis) -> list[str]:
    """One line per module `gpp-onnx grow` inserted: each branch's channel group and width."""
    return [f"grown module {m['module']}: " + ", ".join(
        f"{b} -> group {v['group']} ({v['width']})" for b, v in m["branches"].items())
        for m in module_branches(analysis)]


def module_branches(analysis) -> list[dict]:
    """Per module `gpp-onnx grow` inserted (its Concat is named grow<k>.concat): its name,
    output value and each branch's channel group and width."""
    from .grow.module import BRANCHES

    found = []
    for node in analysis.view.nodes:
        if node.op_type != "Concat" or not node.name.startswith("grow") \
                or not node.name.endswith(".concat"):
            continue
        branches = {}
        for branch, value in zip(BRANCHES, node.input):
            key = next((g.key for g in analysis.groups if value in g.values), "?")
            branches[branch] = {"group": key, "width": int(analysis.view.shape(value)[1])}
        found.append({"module": node.name[:-len(".concat")], "output": node.output[0],
                      "branches": branches})
    return found


def planned_latency(result) -> tuple[float, int]:
    """A latency target's planned ratio to the input model and the cuts timed for it: each
    round timed its cut against the model before it, so the rounds' ratios multiply."""
    metas = [r.plan.meta for r in (result.rounds or ())] or [result.plan.meta]
    planned = math.prod(m.get("latency_measured", float("nan")) for m in metas)
    return planned, sum(len(m.get("latency_tries", [])) for m in metas)


def prune_summary(result) -> str:
    rep = result.report
    b, a = rep["before"], rep["after"]
    rows = [["params", human(b["params"]), human(a["params"]), f"{a['params'] / b['params']:.3f}"],
            ["MACs", human(b["macs"]), human(a["macs"]),
             f"{a['macs'] / max(b['macs'], 1):.3f}"],
            ["file size", human(b["file_bytes"], "B"), human(a["file_bytes"], "B"),
             f"{a['file_bytes'] / b['file_bytes']:.3f}"]]
    if result.latency_ratio is not None:
        rows.append(["latency (onnxruntime)", "", "", f"{result.latency_ratio:.3f}"])
    asked = rep["config"].get("target_latency")
    if asked is not None:
        planned, tries = planned_latency(result)
        rows.append([f"latency target {asked:g}", "", "",
                     f"{planned:.3f} when planned ({tries} cuts timed)"])
    if b.get("accuracy") is not None:
        rows.append(["top-1 accuracy (held-out)", f"{b['accuracy']:.4f}", f"{a['accuracy']:.4f}",
                     f"{a['accuracy'] - b['accuracy']:+.4f}"])
    # over all rounds: each later round cuts the model the one before left
    removed = sum(g["width"] - g["kept"] for g in rep["groups"])
    lines = [table(["", "before", "after", "after/before"], rows)]
    if len(rep["rounds"]) > 1 or b.get("accuracy") is not None:
        lines.append(rounds_table(rep["rounds"], b["macs"]))
    if rep.get("labels") is False:
        how = rep.get("distillation")
        lines.append("no labels: " + (f"fine-tuned to the original's outputs ({how})" if how
                                      else "the original's outputs are the reference"))
    if rep.get("fidelity"):
        lines.append(fidelity_table(rep["fidelity"]))
    cut_kept = [str(r["round"]) for r in rep["rounds"] if r.get("kept") == "cut"]
    if cut_kept:
        lines.append(f"kept the repaired cut, not the fine-tuned model, in round(s) "
                     f"{', '.join(cut_kept)}: fine-tuning did worse on the held-out data")
    if rep["config"]["mask_only"]:
        lines.append("mask-only: the written model keeps the original shapes with the removed "
                     "channels zeroed; 'after' counts the equivalent pruned model")
    groups = sum(1 for g in rep["groups"] if g["kept"] < g["width"])
    lines += [f"loaded: {note}" for note in result.notes]
    tol = result.tolerance
    lines += [f"removed {plural(removed, 'channel')} in {plural(groups, 'group')}; pruned == "
              "masked original "
              f"(relative error {result.equivalence_error:.1e} < tolerance {tol.value:.1e}; "
              f"the model's own noise {tol.noise:.1e})" + _float64_note(rep["rounds"]),
              f"wrote {result.output} (report: {result.report_path})" if result.output
              else "nothing written (result.model holds the pruned model)"]
    lines += [f"warning: {w}" for w in rep.get("warnings", ())]
    return "\n".join(lines)


def _float64_note(rounds: list[dict]) -> str:
    errs = [r["equivalence_relative_error_float64"] for r in rounds
            if r.get("equivalence_relative_error_float64") is not None]
    return f"; in float64 {max(errs):.1e}" if errs else ""


def rounds_table(rounds: list[dict], macs_before: int) -> str:
    def acc(v):
        return "" if v is None else f"{v:.4f}"
    rows = [[r["round"], r["removed_channels"], f"{r['macs'] / max(macs_before, 1):.3f}",
             acc(r["accuracy_after_cut"]), acc(r["accuracy_after_finetune"])] for r in rounds]
    # the accuracy is measured on the model the round keeps: after its repair, if any
    cut = "acc. after cut + repair" if any(r.get("repair") for r in rounds) else "acc. after cut"
    return table(["round", "channels cut", "MACs kept", cut, "acc. after fine-tune"], rows)


FIDELITY_STAGES = {"before": "before", "after_cut": "after cut", "after_repair": "after repair",
                   "after_finetune": "after fine-tune"}


def fidelity_table(stages: dict, headers: dict | None = None,
                   title: str = "fidelity to the original (held-out)") -> str:
    """Per output and measure, one column per stage (``{stage: {output: row}}``; stages
    that did not happen are None)."""
    headers = headers or FIDELITY_STAGES
    done = [k for k in headers if stages.get(k)]
    outputs = list(stages[done[0]]) if done else []
    rows = []
    for out in outputs:
        for measure, label in (("relative_error", "relative error"),
                               ("top1_agreement", "top-1 agreement"),
                               ("agreement", "values equal")):
            if measure in stages[done[0]][out]:
                rows.append([f"{out}: {label}"] + [f"{stages[k][out][measure]:.4f}"
                                                   for k in done])
    return table([title] + [headers[k] for k in done], rows)


def fidelity_stages(rounds) -> dict | None:
    """The last round's fidelity (every round measures against the original) with the
    original itself as 'before'."""
    from .teacher import identical_rows

    fid = rounds[-1].fidelity
    if not fid:
        return None
    return {"before": identical_rows(fid["cut"]), "after_cut": fid["cut"],
            "after_repair": fid.get("repaired"), "after_finetune": fid.get("finetuned")}


def _unsigned_zero(value: float, digits: int) -> float:
    """`value` rounded to `digits`, a measured -0.0 (noise around nothing) shown as 0.0."""
    return round(value, digits) + 0.0


def profile_table(prof, top: int = 30) -> str:
    rows = [[r["key"], r["width"], f"{_unsigned_zero(100 * r['share'], 1):.1f}%",
             f"{_unsigned_zero(r['us_per_channel'], 2):.2f}"] for r in prof.groups[:top]]
    head = (f"onnxruntime latency {prof.total_seconds * 1e3:.2f} ms per run, "
            f"{100 * prof.fixed_seconds / max(prof.total_seconds, 1e-12):.1f}% not tied to "
            f"channels; widths padded to multiples of {prof.block}")
    body = table(["group", "width", "latency share", "us per channel"], rows, "lrrr")
    more = len(prof.groups) - top
    return "\n".join([head, body] + ([f"... {more} more groups"] if more > 0 else []))


def comparison_table(cmp, name_a: str, name_b: str) -> str:
    body = _comparison_rows(cmp, name_a, name_b)
    if getattr(cmp, "fidelity", None) is None:
        return body
    head = {"fidelity": f"{name_b} vs {name_a}"}
    title = f"fidelity on {cmp.images} inputs of {cmp.source}"
    return "\n".join([body, fidelity_table({"fidelity": cmp.fidelity}, head, title)])


def _comparison_rows(cmp, name_a: str, name_b: str) -> str:
    rows = [["params", human(cmp.a.params), human(cmp.b.params),
             f"{cmp.b.params / max(cmp.a.params, 1):.3f}"],
            ["MACs", human(cmp.a.macs), human(cmp.b.macs), f"{cmp.b.macs / max(cmp.a.macs, 1):.3f}"],
            ["file size", human(cmp.bytes_a, "B"), human(cmp.bytes_b, "B"),
             f"{cmp.bytes_b / max(cmp.bytes_a, 1):.3f}"],
            ["latency (median)", f"{cmp.latency_a * 1e3:.2f} ms", f"{cmp.latency_b * 1e3:.2f} ms",
             f"{cmp.latency_ratio:.3f}"]]
    return table(["", name_a, name_b, "b/a"], rows)


def group_rows(analysis, plan, scores: dict) -> list[dict]:
    """One JSON row per channel group: width, kept width, why kept whole, utilities."""
    rows = []
    for g in analysis.groups:
        removed = plan.removed.get(g.key, ())
        row = {"key": g.key, "width": g.width, "kept": g.width - len(removed),
               "prunable": g.prunable, "reason": g.reason}
        if g.key in scores:
            row["utility"] = [float(f"{v:.4g}") for v in np.asarray(scores[g.key]).tolist()]
        rows.append(row)
    return rows


def _final_widths(rounds) -> list[dict]:
    """The first round's group rows (widths of the input, its utilities) with the width
    each group keeps after the last round (the later rounds cut the cut model)."""
    rows = [dict(row) for row in rounds[0].groups]
    later = {}
    for r in rounds[1:]:
        later.update({row["key"]: row["kept"] for row in r.groups})
    for row in rows:
        row["kept"] = later.get(row["key"], row["kept"])
    return rows


def json_report(src, dst, config, rounds, before, after, latency, acc_before, seconds,
                loading: dict | None = None, tolerance=None, warnings=(),
                sizes: tuple[int, int] = (0, 0), distillation: str | None = None) -> dict:
    """`loading`: what loading changed (opsets, sort); `tolerance`: a verify.Tolerance;
    `warnings`: lines the summary shows (a slower model); `sizes`: bytes before/after;
    `distillation`: the distillation loss per output, in words, where one was used."""
    last = rounds[-1]
    return {
        "input": str(src), "output": None if dst is None else str(dst),
        "config": config.to_dict(), "seconds": round(seconds, 3), "loading": loading,
        "warnings": list(warnings),
        "labels": None if config.data is None else config.data.labels,
        "distillation": distillation, "fidelity": fidelity_stages(rounds),
        "before": {"params": before.params, "macs": before.macs,
                   "file_bytes": sizes[0], "accuracy": acc_before},
        "after": {"params": after.params, "macs": after.macs,
                  "file_bytes": sizes[1],
                  "accuracy": last.accuracy_tuned if last.finetuned else last.accuracy_cut},
        "ratios": {"params": after.params / max(before.params, 1),
                   "macs": after.macs / max(before.macs, 1), "latency": latency},
        "equivalence_relative_error": max(r.error for r in rounds),
        "equivalence_tolerance": None if tolerance is None else tolerance.value,
        "model_noise": None if tolerance is None else tolerance.noise,
        "model_noise_sources": None if tolerance is None else {
            "optimizer": tolerance.optimizer_noise, "rounding": tolerance.rounding_noise,
            "float32_vs_float64": tolerance.float32_noise},
        "rounds": [{"round": r.number, "params": r.params, "macs": r.macs,
                    "removed_channels": r.plan.removed_channels,
                    "accuracy_after_cut": r.accuracy_cut,
                    "accuracy_after_finetune": r.accuracy_tuned, "fidelity": r.fidelity,
                    "kept": r.kept,
                    "equivalence_relative_error": r.error, "repair": r.repair,
                    "equivalence_relative_error_float32": r.error_float32,
                    "equivalence_relative_error_float64": r.error_float64,
                    "criterion": r.plan.meta.get("criterion_report")} for r in rounds],
        "groups": _final_widths(rounds),
        "plan": json.loads(last.plan.to_json()),
    }


def to_json(data: dict) -> str:
    return json.dumps(data, indent=1, default=_jsonable)


def _jsonable(obj):
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, (tuple, set)):
        return list(obj)
    return str(obj)
