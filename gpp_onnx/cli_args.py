"""The command line's parser: every subcommand and its options (cli.py turns the parsed
arguments into configs and calls the public API)."""
from __future__ import annotations

import argparse

from .cli_types import (COUNT, FINITE, FRACTION, NONNEG, POSITIVE, SHARE, SOME, count,
                        floats, name_ratio, name_values, shape, widths)
from .config import DISTILL, DataOptions, LatencyOptions, TrainOptions, user_cache
from .errors import InputError
from .grow.loop import MIN_GAIN
from .importance import criterion_names
from .push import PushWeights
from .schedule_options import GPP_ROUNDS, SPLITS, GppOptions


SHAPE_HELP = ("concrete input shape, e.g. 1,3,224,224; NAME:1,3,224,224 per input "
              "(repeat for each input of a multi-input model)")


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block before them), exit code 2;
    subcommands' parsers are of this class too."""

    def error(self, message: str, prog: str | None = None):
        prog = prog or self.prog
        self.exit(2, f"{prog}: error: {message} - see '{prog} --help'\n")

    def parse_args(self, args=None, namespace=None):
        """As argparse's, with an unknown option blamed on the subcommand it was given to."""
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            command = getattr(parsed, "command", None)
            self.error(f"unrecognized arguments: {' '.join(extra)}",
                       f"{self.prog} {command}" if command else None)
        return parsed


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gpp-onnx", description="Make ONNX CNN classifiers "
                     "physically smaller (Grow-Push-Prune).")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors and results")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    an = sub.add_parser("analyze", help="table of channel groups and why some cannot be pruned")
    an.add_argument("model")
    an.add_argument("--input-shape", type=shape, action="append", help=SHAPE_HELP)

    _prune_parser(sub)
    _gpp_parser(sub)
    _profile_parser(sub)
    _push_parser(sub)
    _grow_parser(sub)

    ev = sub.add_parser("evaluate", help="top-1 accuracy through onnxruntime")
    ev.add_argument("model")
    _data_args(ev, held_out=False)
    ev.add_argument("--input-shape", type=shape, action="append", help=SHAPE_HELP)

    cmp = sub.add_parser("compare", help="params, MACs, file size and latency of two models")
    cmp.add_argument("model_a")
    cmp.add_argument("model_b")
    cmp.add_argument("--input-shape", type=shape, action="append", help=SHAPE_HELP)
    cmp.add_argument("--repeats", type=COUNT, default=30,
                     help="timed runs of each model, interleaved (default %(default)s)")
    _data_args(cmp, held_out=False)

    demo = sub.add_parser("demo", help="train a small CNN on the bundled digits, then push, "
                          "prune and fine-tune it in gpp rounds, report")
    demo.add_argument("--out", default="gpp-demo", help="folder for the demo's files")
    demo.add_argument("--ratio", type=FINITE, default=0.5,
                      help="fraction of each channel group the gpp rounds remove (widths "
                      "rounded up to the runtime's block; default %(default)s)")
    demo.add_argument("--epochs", type=NONNEG, default=10,
                      help="epochs training the small CNN (default %(default)s)")
    demo.add_argument("--budget-epochs", type=POSITIVE, default=4,
                      help="push and fine-tuning epochs of the gpp rounds (default %(default)s)")
    for command in sub.choices.values():   # -q / -v after the command too
        command.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                             help="only errors and results")
        command.add_argument("-v", "--verbose", action="store_true",
                             default=argparse.SUPPRESS, help="debug logging")
    return parser


def _prune_parser(sub) -> None:
    pr = sub.add_parser("prune", help="prune a model and write a verified smaller one")
    pr.add_argument("model")
    pr.add_argument("-o", "--output", required=True, help="path of the pruned model")
    _cut_args(pr)
    pr.add_argument("--rounds", type=COUNT, default=1,
                    help="prune in this many rounds (default %(default)s)")
    pr.add_argument("--mask-only", action="store_true",
                    help="keep the shapes; zero the removed channels' weights instead")
    pr.add_argument("--plan", help="replay a plan written by --plan-out")
    pr.add_argument("--plan-out", help="write the plan (JSON) here")
    _prune_training_args(pr)
    pr.add_argument("--finetune-epochs", type=NONNEG, default=0.0,
                    help="fine-tuning after each cut (needs --data): cross-entropy with "
                    "labels, distillation of the original's outputs without (default 0)")


def _gpp_parser(sub) -> None:
    gp = sub.add_parser("gpp", help="rounds of push -> prune (with repair) -> fine-tune within "
                        "an epoch budget; writes the best held-out model that meets the target")
    gp.add_argument("model")
    gp.add_argument("-o", "--output", required=True, help="path of the result")
    _cut_args(gp)
    gp.add_argument("--rounds", type=COUNT, default=GPP_ROUNDS, help="push/prune rounds "
                    f"(default {GPP_ROUNDS})")
    _prune_training_args(gp, labels_optional=False)
    gp.add_argument("--budget-epochs", type=POSITIVE, default=2.0,
                    help="training epochs in all (default %(default)s): --push-share of them "
                    "for the pushes, the rest for fine-tuning after the last cut (--split)")
    gp.add_argument("--push-share", type=SHARE, default=GppOptions.push_share,
                    help="share of the budget spent on push before the cuts (evenly over the "
                    "rounds); the rest fine-tunes")
    gp.add_argument("--split", choices=SPLITS, default=GppOptions.split,
                    help="fine-tune after every cut (even) or only after the last (final)")
    gp.add_argument("--acc-floor", type=NONNEG, default=GppOptions.acc_floor,
                    help="end the gradual rounds when held-out accuracy falls more than this "
                    "below the start (a MACs/params target not met yet: the rest of the cut "
                    "is made at once and fine-tuned with the epochs left)")
    _push_weight_args(gp, GppOptions.weights)
    gp.add_argument("--grow", type=count, default=0, metavar="N",
                    help="first grow up to N Inception modules (each kept while held-out "
                    "accuracy gains more than --min-gain), then prune back: the target "
                    "(--target-macs or --target-params; --ratio is refused) is a fraction of "
                    "the input model's cost, so --target-macs 1.0 prunes back to it")
    gp.add_argument("--grow-share", type=FINITE, default=GppOptions.grow_share,
                    help="with --grow: share of --budget-epochs spent growing, evenly over "
                    "the N modules; the rounds get the rest (default %(default)s)")
    _module_args(gp)
    gp.add_argument("--work-dir", help="checkpoints of finished rounds (default: OUTPUT.gpp-work)")
    gp.add_argument("--resume", action="store_true",
                    help="continue the run in the work folder after its last finished round")


def _cut_args(pr: argparse.ArgumentParser) -> None:
    """What to cut and how it is scored: the options prune and gpp share."""
    target = pr.add_mutually_exclusive_group()
    target.add_argument("--ratio", type=FINITE, help="remove this fraction of each prunable "
                        "group's channels (default 0.5)")
    target.add_argument("--target-macs", type=FINITE, help="keep this fraction of the MACs")
    target.add_argument("--target-params", type=FINITE, help="keep this fraction of the params")
    target.add_argument("--target-latency", type=FINITE, help="keep this fraction of the "
                        "onnxruntime CPU latency measured here (channels ranked globally by "
                        "utility per unit of latency; the cut model is timed and corrected)")
    pr.add_argument("--allocation", choices=["uniform", "global"],
                    help="the same ratio in every group (default for MACs/params targets, "
                    "where the budget the rounded widths leave is given back by utility per "
                    "cost) or "
                    "channels ranked globally by utility per unit of cost (default for "
                    "--target-latency)")
    pr.add_argument("--criterion", default="auto",
                    help=f"one of {', '.join(criterion_names())} (default: gpp with labelled "
                    "--data, fisher with unlabelled, else l1)")
    pr.add_argument("--eta", type=FINITE, help="threshold factor: remove channels whose utility "
                    "is below eta * std of their group's (METHOD 3)")
    pr.add_argument("--ignore", action="append", default=[], metavar="NAME",
                    help="keep this group whole (a group key, value or node name; repeatable)")
    pr.add_argument("--group-ratio", action="append", default=[], type=name_ratio,
                    metavar="NAME=R", help="this group's own ratio (repeatable)")
    pr.add_argument("--seed", type=SOME, default=0, help="seed of the data split, sampling "
                    "and training (default %(default)s)")
    pr.add_argument("--min-keep", type=COUNT, default=1,
                    help="channels every group keeps (default %(default)s)")
    pr.add_argument("--round-to", type=COUNT, help="kept widths are multiples of this (default: "
                    "the block onnxruntime's fast conv layout needs here, 8 or 16; 1: free)")
    pr.add_argument("--input-shape", type=shape, action="append", help=SHAPE_HELP)
    pr.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    _timing_args(pr, "latency-")


def _push_weight_args(p: argparse.ArgumentParser, w: PushWeights = PushWeights()) -> None:
    p.add_argument("--sep", type=NONNEG, default=w.sep, help="push: weight of class separation (default %(default)s)")
    p.add_argument("--cov", type=NONNEG, default=w.cov,
                   help="push: weight of the within-class covariance off the diagonal "
                   "(default %(default)s)")
    p.add_argument("--align", type=NONNEG, default=w.align,
                   help="push: weight of concentrating discriminant power on few neurons "
                   "(default %(default)s)")


def _prune_training_args(pr: argparse.ArgumentParser, labels_optional: bool = True) -> None:
    """Data, fine-tuning and repair options of prune (and gpp, which needs labels)."""
    _data_args(pr, scoring=True)
    pr.add_argument("--feature-tensor", help="value name of the final hidden layer "
                    "(default: the input of the last Gemm/MatMul)")
    if labels_optional:
        pr.add_argument("--no-labels", action="store_true",
                        help="ignore the data's labels: label-free criterion (fisher), repair "
                        "and distillation to the original model's outputs")
    pr.add_argument("--distill", type=NONNEG, metavar="W",
                    help="with labels: add W x the distillation loss (the original model as "
                    f"teacher) to cross-entropy (default {DISTILL:g}, chosen on validation "
                    "accuracy; 0: cross-entropy alone)")
    pr.add_argument("--temperature", type=POSITIVE, default=TrainOptions.temperature,
                    help="softmax temperature of the distillation KL (class outputs; "
                         "default %(default)s, chosen on held-out agreement)")
    pr.add_argument("--batchnorm", choices=["auto", "train", "frozen"], default="auto",
                    help="BatchNorm when fine-tuning: batch statistics (train) or the running "
                    "ones (frozen, which also keeps the BatchNorm put back on folded convs "
                    "off); auto: frozen without labels, train with")
    pr.add_argument("--no-renorm", dest="renorm", action="store_false",
                    help="fine-tune without the BatchNorm put back (for the length of the "
                    "fine-tune, batch statistics only) on convs an exporter folded one into")
    pr.add_argument("--lr", type=POSITIVE, default=None,
                    help="fine-tuning learning rate (default 0.01; 0.03 while BatchNorm is put "
                    "back on folded convs, chosen on validation data)")
    _device_args(pr)
    repair = pr.add_mutually_exclusive_group()   # both given: refused, not the last wins
    repair.add_argument("--repair", choices=["lsq", "bias", "none"], default="lsq",
                        help="after the cut (needs --data): lsq refits the following layers "
                        "to the original outputs (default), bias folds the removed channels' "
                        "means into the next biases, none leaves the weights as they are")
    repair.add_argument("--no-repair", action="store_const", const="none", dest="repair",
                        help="same as --repair none")


def _profile_parser(sub) -> None:
    pf = sub.add_parser("profile", help="per-group onnxruntime latency cost on this machine")
    pf.add_argument("model")
    pf.add_argument("--input-shape", type=shape, action="append", help=SHAPE_HELP)
    _timing_args(pf, "")
    pf.add_argument("--runs", type=COUNT, default=20, help="profiled runs (default %(default)s)")
    pf.add_argument("--json", help="write every group's cost-vs-width curve here "
                    "(python tools/plot_report.py latency FILE -o curves.png draws it)")


def _push_parser(sub) -> None:
    pu = sub.add_parser("push", help="train with cross-entropy + the push loss so the class "
                        "discriminants line up with few neurons (before pruning)")
    pu.add_argument("model")
    pu.add_argument("-o", "--output", required=True, help="path of the pushed model")
    _data_args(pu)
    pu.add_argument("--epochs", type=POSITIVE, default=1.0,
                    help="training epochs (default %(default)s)")
    pu.add_argument("--lr", type=POSITIVE, default=0.01,
                    help="learning rate (default %(default)s)")
    _device_args(pu)
    _push_weight_args(pu)
    pu.add_argument("--feature-tensor", help="value name of the final hidden layer")
    pu.add_argument("--seed", type=SOME, default=0,
                    help="seed of the data split and training (default %(default)s)")
    pu.add_argument("--input-shape", type=shape, action="append", help=SHAPE_HELP)


def _grow_parser(sub) -> None:
    gr = sub.add_parser("grow", help="insert Inception modules (function-preserving); with "
                        "--data train each and keep it while held-out accuracy gains")
    gr.add_argument("model")
    gr.add_argument("-o", "--output", required=True, help="path of the grown model")
    _data_args(gr)
    gr.add_argument("--max-modules", type=COUNT, default=3,
                    help="modules to grow at most (default %(default)s)")
    gr.add_argument("--epochs", type=NONNEG, help="training epochs after each module "
                    "(default: 2 with --data, else 0: insert only)")
    _module_args(gr)
    gr.add_argument("--lr", type=POSITIVE, default=0.01,
                    help="learning rate (default %(default)s)")
    _device_args(gr)
    gr.add_argument("--seed", type=SOME, default=0,
                    help="seed of the data split and training (default %(default)s)")
    gr.add_argument("--input-shape", type=shape, action="append", help=SHAPE_HELP)


def _device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the torch side trains (auto: cuda where torch sees a GPU)")
    p.add_argument("--amp", action="store_true", help="train in mixed precision (float16 "
                   "autocast with loss scaling) on CUDA; the model is written in float32. "
                   "Ignored on the CPU")


def _module_args(p: argparse.ArgumentParser) -> None:
    """Where modules grow and how wide, and what keeps them: the options grow and
    gpp --grow share."""
    p.add_argument("--at", action="append", default=[], metavar="VALUE",
                   help="grow after this value (a conv block's output; repeatable; "
                   "default: one per resolution stage, deepest first)")
    p.add_argument("--min-gain", type=FINITE, default=MIN_GAIN, help="held-out accuracy "
                   "points a module must add to be kept (default %(default)s)")
    p.add_argument("--branch-widths", type=widths, metavar="W3,W33,WP",
                   help="output widths of the 1x1->3x3, 1x1->3x3->3x3 and pool->1x1 "
                   "branches (default: C/2,C/4,C/4 of the input's C, multiples of 8)")


def _timing_args(p: argparse.ArgumentParser, prefix: str) -> None:
    """Where latency is measured (prune: --latency-threads/--latency-batch; profile:
    --threads/--batch)."""
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu",
                   help="onnxruntime provider to time (cuda needs onnxruntime-gpu)")
    p.add_argument(f"--{prefix}threads", dest="timing_threads", type=SOME, default=0,
                   help="onnxruntime intra-op threads when timing (default: its own choice)")
    p.add_argument(f"--{prefix}batch", dest="timing_batch", type=COUNT, default=1,
                   help="images per timed run (models with a dynamic batch)")
    p.add_argument("--no-latency-cache", action="store_true",
                   help="profile again instead of reusing the kernel profiles cached in "
                        "$XDG_CACHE_HOME/gpp-onnx (default ~/.cache/gpp-onnx)")


def _timing(args) -> LatencyOptions:
    return LatencyOptions(args.provider, args.timing_threads, args.timing_batch,
                          None if args.no_latency_cache else user_cache())


def _data_args(p: argparse.ArgumentParser, held_out: bool = True,
               scoring: bool = False) -> None:
    """The data options; `held_out`: the command holds images out (training commands),
    `scoring`: it scores channels on some of them (prune, gpp)."""
    p.add_argument("--data", help="images: a class-per-folder directory (or a folder of "
                   "images, no labels), an .npz with x (and y), IDX files, a CIFAR-10/100 "
                   "folder (FOLDER:test for its test split), 'fashion-mnist[:test]' or "
                   "'digits'; a model with several inputs: an .npz with an array named as "
                   "each input (and y), or images for one input and --feed for the others")
    p.add_argument("--feed", type=name_values, action="append", metavar="NAME=VALUES",
                   help="an input of a model with several that the data does not hold, the "
                   "same values for every sample, e.g. scale_factor=1,1 (repeat per input)")
    if held_out:
        p.add_argument("--val-split", type=FRACTION, default=DataOptions.val_split,
                       help="fraction of the images held out for accuracy, fidelity and the "
                       "choices made on them (default %(default)s)")
    p.add_argument("--limit", type=COUNT, help="use at most this many images")
    if scoring:
        p.add_argument("--per-class", type=COUNT, default=DataOptions.per_class,
                       help="images per class for scoring (default %(default)s)")
    p.add_argument("--batch-size", type=COUNT, default=DataOptions.batch_size,
                   help="images per batch (default %(default)s)")
    p.add_argument("--workers", type=SOME, help="processes that prepare batches (default: a "
                   "few for image folders, none for arrays)")
    p.add_argument("--mean", type=floats, help="per-channel mean subtracted after /255")
    p.add_argument("--std", type=floats, help="per-channel std divided after the mean")
    p.add_argument("--no-resize", action="store_true",
                   help="refuse images whose size differs from the model input")


# options that only say how the data is read: given without --data they were ignored
_DATA_ONLY = (("feed", "--feed"), ("mean", "--mean"), ("std", "--std"), ("limit", "--limit"),
              ("no_resize", "--no-resize"), ("workers", "--workers"),
              ("no_labels", "--no-labels"))


def _data_options(args) -> DataOptions | None:
    if not args.data:
        given = [opt for attr, opt in _DATA_ONLY
                 if getattr(args, attr, None) is not None and getattr(args, attr) is not False]
        if given:
            raise InputError(f"{given[0]} says how to read the data, and no --data was "
                             "given - add --data or leave it out")
        return None
    return DataOptions(args.data, args.mean, args.std, not args.no_resize, args.limit,
                       getattr(args, "val_split", DataOptions.val_split),
                       getattr(args, "per_class", DataOptions.per_class), args.batch_size,
                       args.workers, False if getattr(args, "no_labels", False) else None,
                       tuple(args.feed or ()))
