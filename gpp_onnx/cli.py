"""Command line: parse -> config -> public API -> exit code (0 ok, 2 bad input/model)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import pipeline, report
from .config import PruneConfig
from .errors import GppError
from .importance import criterion_names

logger = logging.getLogger("gpp_onnx")


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a shape like 1,3,224,224") from None
    if not dims or min(dims) <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' must list positive sizes")
    return dims


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpp-onnx", description="Make ONNX CNN classifiers "
                                     "physically smaller (Grow-Push-Prune).")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors and results")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    an = sub.add_parser("analyze", help="table of channel groups and why some cannot be pruned")
    an.add_argument("model")
    an.add_argument("--input-shape", type=_shape, help="concrete input shape, e.g. 1,3,224,224")

    pr = sub.add_parser("prune", help="prune a model and write a verified smaller one")
    pr.add_argument("model")
    pr.add_argument("-o", "--output", required=True, help="path of the pruned model")
    target = pr.add_mutually_exclusive_group()
    target.add_argument("--ratio", type=float, help="remove this fraction of each prunable "
                        "group's channels (default 0.5)")
    target.add_argument("--target-macs", type=float, help="keep this fraction of the MACs")
    target.add_argument("--target-params", type=float, help="keep this fraction of the params")
    pr.add_argument("--criterion", default="l1", help=f"one of {', '.join(criterion_names())}")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--min-keep", type=int, default=1, help="channels every group keeps")
    pr.add_argument("--round-to", type=int, default=1, help="kept widths are multiples of this")
    pr.add_argument("--mask-only", action="store_true",
                    help="keep the shapes; zero the removed channels' weights instead")
    pr.add_argument("--plan", help="replay a plan written by --plan-out")
    pr.add_argument("--plan-out", help="write the plan (JSON) here")
    pr.add_argument("--input-shape", type=_shape, help="concrete input shape, e.g. 1,3,224,224")
    pr.add_argument("--no-latency", action="store_true", help="skip the latency measurement")

    cmp = sub.add_parser("compare", help="params, MACs, file size and latency of two models")
    cmp.add_argument("model_a")
    cmp.add_argument("model_b")
    cmp.add_argument("--input-shape", type=_shape)
    cmp.add_argument("--repeats", type=int, default=30)

    demo = sub.add_parser("demo", help="prune the embedded sample CNN end to end")
    demo.add_argument("--out", default="gpp-demo", help="folder for the demo's files")
    demo.add_argument("--ratio", type=float, default=0.5)
    return parser


def _run(args) -> int:
    if args.command == "analyze":
        print(report.analysis_table(pipeline.analyze(args.model, args.input_shape)))
    elif args.command == "prune":
        config = PruneConfig(ratio=args.ratio, target_macs=args.target_macs,
                             target_params=args.target_params, criterion=args.criterion,
                             seed=args.seed, min_keep=args.min_keep, round_to=args.round_to,
                             mask_only=args.mask_only, input_shape=args.input_shape,
                             latency=not args.no_latency)
        result = pipeline.prune(args.model, args.output, config, plan_path=args.plan,
                                plan_out=args.plan_out)
        print(report.prune_summary(result))
    elif args.command == "compare":
        cmp = pipeline.compare(args.model_a, args.model_b, args.input_shape, args.repeats)
        print(report.comparison_table(cmp, Path(args.model_a).name, Path(args.model_b).name))
    elif args.command == "demo":
        result = pipeline.demo(Path(args.out), args.ratio)
        print(report.prune_summary(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="gpp-onnx: %(message)s", stream=sys.stderr)
    try:
        return _run(args)
    except GppError as err:
        print(f"gpp-onnx: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gpp-onnx: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
