"""Plain-text tables for the CLI (analysis, prune summary, comparison)."""
from __future__ import annotations


def human(n: float, unit: str = "") -> str:
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


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
        first = g.members[0].value
        members = f"{first}" + (f" (+{len(g.members) - 1})" if len(g.members) > 1 else "")
        rows.append([g.key, g.width, len(g.members), "yes" if g.prunable else "no",
                     f"{100 * share.params:.1f}%", f"{100 * share.macs:.1f}%",
                     "" if g.prunable else g.reason])
    a = result.analysis
    head = (f"{len(a.groups)} channel groups, {len(a.prunable)} prunable; "
            f"{human(result.stats.params)} params, {human(result.stats.macs)} MACs")
    body = table(["group", "width", "members", "prunable", "params", "MACs", "why not"],
                 rows, "lrrlrrl")
    return head + "\n" + body


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
    removed = result.plan.removed_channels
    lines = [table(["", "before", "after", "after/before"], rows)]
    if rep["config"]["mask_only"]:
        lines.append("mask-only: the written model keeps the original shapes with the removed "
                     "channels zeroed; 'after' counts the equivalent pruned model")
    groups = sum(1 for v in result.plan.removed.values() if v)
    lines += [f"removed {removed} channels in {groups} groups; pruned == masked original "
              f"(relative error {result.equivalence_error:.1e})",
              f"wrote {result.output} (report: {result.report_path})"]
    return "\n".join(lines)


def comparison_table(cmp, name_a: str, name_b: str) -> str:
    rows = [["params", human(cmp.a.params), human(cmp.b.params),
             f"{cmp.b.params / max(cmp.a.params, 1):.3f}"],
            ["MACs", human(cmp.a.macs), human(cmp.b.macs), f"{cmp.b.macs / max(cmp.a.macs, 1):.3f}"],
            ["file size", human(cmp.bytes_a, "B"), human(cmp.bytes_b, "B"),
             f"{cmp.bytes_b / max(cmp.bytes_a, 1):.3f}"],
            ["latency (median)", f"{cmp.latency_a * 1e3:.2f} ms", f"{cmp.latency_b * 1e3:.2f} ms",
             f"{cmp.latency_ratio:.3f}"]]
    return table(["", name_a, name_b, "b/a"], rows)
