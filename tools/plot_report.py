"""Plots for gpp-onnx results (needs matplotlib: a tools-only dependency).

    python tools/plot_report.py widths MODEL.report.json -o widths.png
    python tools/plot_report.py sweep SWEEP.json [SWEEP2.json ...] -o acc_vs_macs.png
    python tools/plot_report.py latency PROFILE.json -o cost_vs_width.png [--top 8]
    python tools/plot_report.py rounds MODEL.report.json -o rounds.png

``widths``: from the JSON report ``gpp_onnx.prune`` writes beside a pruned model
(``<name>.report.json``), one pair of bars per channel group: width before and kept width
after (groups that cannot be pruned are hatched).

``latency``: from the JSON of ``gpp-onnx profile MODEL --json FILE``, the estimated
onnxruntime latency of the model against the kept width of each of the `--top` groups
whose width controls the most latency (the others at full width).

``rounds``: from the JSON report of ``gpp-onnx gpp``, per round: held-out accuracy after
push, after the cut and after fine-tuning (left axis), MACs and params kept and S_w's
off-diagonal energy after push (right axis).

``sweep``: from the JSON of ``tools/fmnist_bench.py sweep``, test accuracy against the
fraction of MACs actually removed, one colour per criterion; solid lines right after the
cut (F=0), dashed after fine-tuning (one line style per fine-tune budget); the unpruned
accuracy as a horizontal line. Several sweep files give one panel each.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

COLOURS = {"gpp": "tab:red", "gpp-guided": "tab:orange", "gpp-deconv": "tab:purple",
           "taylor": "tab:blue", "l1": "tab:green", "l2": "tab:olive",
           "random": "tab:gray"}
STYLES = ["-", "--", ":", "-."]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def short_name(key: str) -> str:
    """'/features/features.4/b1/b1.0/Conv_output_0' -> 'features.4/b1.0' (readable labels)."""
    parts = [p for p in re.sub(r"_output_\d+$", "", key).split("/") if p]
    if len(parts) > 1 and "." not in parts[-1]:
        parts = parts[:-1]                      # the op name (Conv, Gemm, ...)
    parts = [p for i, p in enumerate(parts)
             if not (i + 1 < len(parts) and parts[i + 1].startswith(p + "."))]
    return "/".join(parts[-2:])[-28:]


def plot_widths(report_path: Path, out: Path, all_groups: bool = True) -> Path:
    plt = _plt()
    rep = json.loads(Path(report_path).read_text())
    groups = [g for g in rep["groups"] if all_groups or g["prunable"]]
    names = [short_name(g["key"]) for g in groups]
    before = [g["width"] for g in groups]
    after = [g["kept"] for g in groups]
    x = range(len(groups))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(groups) + 2), 3.8), dpi=90)
    ax.bar([i - 0.2 for i in x], before, 0.4, label="before", color="lightgray",
           edgecolor="gray")
    bars = ax.bar([i + 0.2 for i in x], after, 0.4, label="after", color="tab:red")
    for b, g in zip(bars, groups):
        if not g["prunable"]:
            b.set_hatch("//")
            b.set_color("white")
            b.set_edgecolor("tab:red")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("channels")
    cfg, ratios = rep.get("config", {}), rep.get("ratios", {})
    src = Path(rep["input"])
    title = (f"{src.parent.name}/{src.name}: criterion {cfg.get('criterion')}, "
             f"MACs kept {ratios.get('macs', float('nan')):.2f}, "
             f"params kept {ratios.get('params', float('nan')):.2f}")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_latency(profile_path: Path, out: Path, top: int = 8) -> Path:
    plt = _plt()
    prof = json.loads(Path(profile_path).read_text())
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=90)
    total = prof["total_seconds"] * 1e3
    for g in prof["groups"][:top]:
        kept = [k / g["width"] for k, _ in g["curve"]]
        ax.plot(kept, [t * 1e3 / total for _, t in g["curve"]], marker="o", markersize=3,
                label=f"{short_name(g['key'])} ({g['width']})")
    ax.set_xlabel("kept fraction of the group's width (others at full width)")
    ax.set_ylabel("estimated latency / original")
    ax.set_title(f"onnxruntime CPU, {total:.2f} ms per run, widths padded to "
                 f"multiples of {prof['block']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_sweeps(paths: list[Path], out: Path, titles: list[str] | None = None) -> Path:
    plt = _plt()
    states = [json.loads(Path(p).read_text()) for p in paths]
    fig, axes = plt.subplots(1, len(states), figsize=(4.8 * len(states), 3.8), dpi=90,
                             squeeze=False)
    for n, (ax, state) in enumerate(zip(axes[0], states)):
        rows = [r for r in state["rows"] if "error" not in r]
        budgets = sorted({r["finetune_epochs"] for r in rows})
        criteria = sorted({r["criterion"] for r in rows}, key=lambda c: (c != "gpp", c))
        for c in criteria:
            for k, f in enumerate(budgets):
                pts = sorted((r["removed_macs"], 100 * r["test_accuracy"]) for r in rows
                             if r["criterion"] == c and r["finetune_epochs"] == f)
                if not pts:
                    continue
                label = f"{c}, " + ("after cut" if f == 0 else f"fine-tuned {f:g} ep")
                ax.plot(*zip(*pts), STYLES[k % len(STYLES)], marker="o", ms=3.5,
                        color=COLOURS.get(c), label=label)
        base = state.get("base", {}).get("test_accuracy")
        if base is not None:
            ax.axhline(100 * base, color="black", lw=0.8, ls=":",
                       label=f"unpruned {100 * base:.2f}%")
        ax.set_xlabel("fraction of MACs removed")
        ax.set_ylabel("test accuracy (%)")
        lo = min([100 * r["test_accuracy"] for r in rows] + [100])
        ax.set_ylim(max(0, lo - 3), 100)
        ax.grid(alpha=0.3)
        title = titles[n] if titles and n < len(titles) else Path(state["model"]).parent.name
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=6.5, loc="lower left")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_rounds(report_path: Path, out: Path) -> Path:
    plt = _plt()
    rep = json.loads(Path(report_path).read_text())
    rows = rep["rounds"]
    x = [r["round"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=90)
    for key, label, style in (("accuracy_after_push", "after push", "o-"),
                              ("accuracy_after_cut", "after cut", "s--"),
                              ("accuracy_after_finetune", "after fine-tune", "^-")):
        pts = [(r["round"], 100 * r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), style, label=label)
    ax.axhline(100 * rep["before"]["accuracy"], color="black", lw=0.8, ls=":",
               label="start")
    ax.set_xlabel("round")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_xticks(x)
    right = ax.twinx()
    for key, label, colour in (("macs", "MACs kept", "tab:gray"),
                               ("params", "params kept", "tab:brown")):
        right.plot(x, [r[key] / max(rep["before"][key], 1) for r in rows], ":", marker="x",
                   color=colour, label=label)
    off = [(r["round"], r["offdiag_after_push"]) for r in rows
           if r.get("offdiag_after_push") is not None]
    if off:
        right.plot(*zip(*off), "d:", color="tab:purple", label="S_w off-diagonal")
    right.set_ylabel("fraction")
    right.set_ylim(0, 1.05)
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="lower left")
    ax.set_title(f"gpp: {rep['epochs_used']:.2f} epochs, result from round "
                 f"{rep['best']['round']} ({rep['best']['stage']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def _refuse(message: str) -> None:
    print(f"plot_report: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("widths", help="per-group width before/after from a prune report")
    w.add_argument("report")
    w.add_argument("-o", "--out", required=True)
    w.add_argument("--prunable-only", action="store_true")
    s = sub.add_parser("sweep", help="accuracy vs MACs removed from fmnist_bench sweep JSONs")
    s.add_argument("sweeps", nargs="+")
    s.add_argument("-o", "--out", required=True)
    s.add_argument("--titles", help="panel titles separated by ';'")
    lat = sub.add_parser("latency", help="estimated latency vs kept width per group, from "
                         "'gpp-onnx profile --json'")
    lat.add_argument("profile")
    lat.add_argument("-o", "--out", required=True)
    lat.add_argument("--top", type=int, default=8)
    r = sub.add_parser("rounds", help="accuracy, cost and S_w per round, from a gpp report")
    r.add_argument("report")
    r.add_argument("-o", "--out", required=True)
    args = p.parse_args(argv)
    # a prune report and a profile's JSON both hold "groups": each kind is told by a key
    # the other lacks (a profile given to 'widths' ended in a KeyError traceback)
    needs = {"rounds": ("report", ("epochs_used", "rounds"), "a gpp report (gpp-onnx gpp)"),
             "widths": ("report", ("groups", "ratios"), "a prune report (gpp-onnx prune)"),
             "latency": ("profile", ("total_seconds", "groups"),
                         "'gpp-onnx profile --json' output"),
             "sweep": ("sweeps", ("model", "rows"), "a tools/fmnist_bench.py sweep JSON")}
    attr, keys, what = needs[args.cmd]
    paths = getattr(args, attr)
    for path in paths if isinstance(paths, list) else [paths]:
        try:
            rep = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            _refuse(f"cannot read {path} ({err}); give {what}")
        missing = [k for k in keys if not isinstance(rep, dict) or rep.get(k) is None]
        if missing:
            _refuse(f"{path} has no '{missing[0]}'; '{args.cmd}' needs {what}")
    if args.cmd == "rounds":
        out = plot_rounds(Path(args.report), Path(args.out))
    elif args.cmd == "latency":
        out = plot_latency(Path(args.profile), Path(args.out), args.top)
    elif args.cmd == "widths":
        out = plot_widths(Path(args.report), Path(args.out), not args.prunable_only)
    else:
        out = plot_sweeps([Path(x) for x in args.sweeps], Path(args.out),
                          args.titles.split(";") if args.titles else None)
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
