"""The summaries and JSON reports of the training commands: push, gpp (its rounds, its
grow phase) and grow. The shared pieces (tables, fidelity) are report.py's."""
from __future__ import annotations

from .push import share_text
from .report import fidelity_table, human, table


def push_summary(result) -> str:
    r = result.report
    rows = [["top-1 accuracy (held-out)", f"{r.accuracy_before:.4f}", f"{r.accuracy_after:.4f}"],
            ["S_w off-diagonal energy", share_text(r.offdiag_before),
             share_text(r.offdiag_after)]]
    return "\n".join([f"push on {r.feature}: {r.steps} steps",
                      table(["", "before", "after"], rows),
                      f"wrote {result.output}" if result.output else "nothing written"])


def gpp_rounds_table(rows, before) -> str:
    """Per round: accuracy after push / cut / fine-tune, cost kept, S_w's off-diagonal
    energy after push, training epochs used so far."""
    def f(v, fmt=".4f"):
        return "" if v is None else format(v, fmt)
    body = [[r["round"], f(r.get("accuracy_after_push")), f(r.get("accuracy_after_cut")),
             f(r.get("accuracy_after_finetune")), f(r["params"] / max(before.params, 1), ".3f"),
             f(r["macs"] / max(before.macs, 1), ".3f"), f(r.get("offdiag_after_push"), ".3f"),
             f(r.get("epochs_used"), ".2f")] for r in rows]
    return table(["round", "acc. push", "acc. cut", "acc. fine-tune", "params kept",
                  "MACs kept", "S_w off-diag.", "epochs so far"], body)


def gpp_grow_lines(grow: dict | None, before) -> list[str]:
    """The grow phase of `gpp --grow`: per module where, branch widths grown -> in the
    result, added cost, held-out accuracy, kept; then the phase's epochs."""
    if grow is None:
        return []
    after = {m["output"]: m["branches"] for m in grow.get("after") or []}
    rows = []
    for m in grow["modules"]:
        grown = [stop - start for start, stop in m["branches"].values()]
        widths = "/".join(map(str, grown))
        if m["output"] in after:
            widths += " -> " + "/".join(str(v["width"]) for v in after[m["output"]].values())
        rows.append([m["index"], m["at"], f"{m['size'][0]}x{m['size'][1]}", widths,
                     human(m["params"]), human(m["macs"]),
                     "" if m["accuracy"] is None else f"{m['accuracy']:.4f}",
                     "" if m["gain_points"] is None else f"{m['gain_points']:+.2f}",
                     "yes" if m["kept"] else "no"])
    head = ["module", "at", "size", "1x1/3x3/3x3dbl/pool (grown -> result)", "+params",
            "+MACs", "accuracy", "gain (pts)", "kept"]
    return [table(head, rows, "llllrrrrl"),
            f"grow: kept {grow['kept']} of {len(grow['modules'])} module(s), "
            f"{grow['epochs']:.2f} epochs ({grow['epochs_per_module']:.2f} per module, "
            f"{grow['round_epochs']:.2f} left to the rounds); "
            f"params {human(before.params)} -> {human(grow['params'])}, MACs "
            f"{human(before.macs)} -> {human(grow['macs'])}"]


def gpp_summary(result) -> str:
    b, a = result.before, result.after
    acc = result.best["accuracy"]
    rows = [["params", human(b.params), human(a.params), f"{a.params / max(b.params, 1):.3f}"],
            ["MACs", human(b.macs), human(a.macs), f"{a.macs / max(b.macs, 1):.3f}"],
            ["top-1 accuracy (held-out)", f"{result.accuracy_before:.4f}", f"{acc:.4f}",
             f"{acc - result.accuracy_before:+.4f}"]]
    if result.latency_ratio is not None:
        rows.append(["latency (onnxruntime)", "", "", f"{result.latency_ratio:.3f}"])
    lines = [table(["", "before", "after", "after/before"], rows),
             *gpp_grow_lines(result.report.get("grow"), b),
             gpp_rounds_table(result.rows, b),
             f"result: round {result.best['round']} after {result.best['stage']}; "
             f"{result.epochs:.2f} training epochs used"]
    rep = result.report
    if rep.get("fidelity"):
        lines.append(fidelity_table(rep["fidelity"], {"before": "before", "result": "result"}))
    errors = [r["equivalence_relative_error"] for r in result.rows
              if r.get("equivalence_relative_error") is not None]
    if errors and rep.get("equivalence_tolerance") is not None:
        lines.append(f"every cut: pruned == masked (relative error at most {max(errors):.1e} "
                     f"< tolerance {rep['equivalence_tolerance']:.1e}; the model's own noise "
                     f"{rep['model_noise']:.1e})")
    if result.report.get("stopped"):
        lines.append(f"stopped early: {result.report['stopped']}")
    lines.append(f"wrote {result.output} (report: {result.report_path})" if result.output
                 else "nothing written (result.model holds the result)")
    lines += [f"warning: {w}" for w in rep.get("warnings", ())]
    return "\n".join(lines)


def gpp_report(src, dst, config, options, state, before, after, acc_before, latency,
               seconds, tolerance=None, fidelity=None, warnings=()) -> dict:
    """`tolerance`: the pruned == masked check's (verify.Tolerance); `fidelity`: the written
    model's to the original on the held-out inputs (teacher.fidelity)."""
    from .teacher import identical_rows

    return {
        "input": str(src), "output": None if dst is None else str(dst),
        "config": config.to_dict(), "seconds": round(seconds, 3),
        "schedule": {"budget_epochs": options.budget_epochs, "push_share": options.push_share,
                     "split": options.split,
                     "acc_floor": options.acc_floor, "push_weights": vars(options.weights),
                     "round_budget_epochs": options.round_budget(),
                     "work_dir": None if options.work_dir is None else str(options.work_dir)},
        "epochs_used": state.epochs, "stopped": state.stop, "best": state.best,
        "before": {"params": before.params, "macs": before.macs, "accuracy": acc_before},
        "after": {"params": after.params, "macs": after.macs, "accuracy": state.best["accuracy"]},
        "ratios": {"params": after.params / max(before.params, 1),
                   "macs": after.macs / max(before.macs, 1), "latency": latency},
        "rounds": list(state.rows),
        "equivalence_tolerance": None if tolerance is None else tolerance.value,
        "model_noise": None if tolerance is None else tolerance.noise,
        "fidelity": None if not fidelity else {"before": identical_rows(fidelity),
                                               "result": fidelity},
        "warnings": list(warnings),     # lines the summary shows (a slower model)
        "grow": None if state.grown is None else dict(state.grown, share=options.grow_share,
                                                      round_epochs=options.round_budget()),
    }




def grow_summary(result) -> str:
    def acc(v):
        return "" if v is None else f"{v:.4f}"

    rows = [[r.module.index, r.module.at, f"{r.module.height}x{r.module.width}",
             "/".join(map(str, (r.module.channels, *r.module.widths))), human(r.params),
             human(r.macs), acc(r.accuracy),
             "" if r.gain is None else f"{r.gain:+.2f}", "yes" if r.kept else "no"]
            for r in result.modules]
    b, a = result.before, result.after
    lines = [table(["module", "at", "size", "1x1/3x3/3x3dbl/pool", "params", "MACs",
                    "accuracy", "gain (pts)", "kept"], rows, "llllrrrrl"),
             f"params {human(b.params)} -> {human(a.params)}, MACs {human(b.macs)} -> "
             f"{human(a.macs)}" + (f", held-out accuracy {acc(result.accuracy_before)} -> "
                                   f"{acc(result.accuracy_after)}"
                                   if result.accuracy_before is not None else ""),
             f"kept {len(result.kept)} of {len(result.modules)} module(s); each computed what "
             "the model before it computed when inserted (relative error < 1e-5)",
             f"wrote {result.output} (report: {result.report_path})" if result.output
             else "nothing written (result.model holds the grown model)"]
    return "\n".join(lines)
