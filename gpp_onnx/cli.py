"""Command line: parse -> config -> public API -> exit code (0 ok, 2 bad input/model)."""
from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path

from . import files
from . import distributed, pipeline, preflight, push_prune, report, training_report
from .config import DISTILL, PruneConfig, TrainOptions, with_lr
from .errors import GppError, InputError
from .grow.loop import MIN_GAIN
from .cli_args import _data_options, _timing, build_parser
from .cli_types import input_shape
from .progress import ProgressHandler
from .push import PushWeights
from .schedule import GppOptions

logger = logging.getLogger("gpp_onnx")


def _modules(args, max_modules: int):
    """--at, --branch-widths, --min-gain (grow and gpp --grow)."""
    from .grow import GrowConfig, Widths

    return GrowConfig(max_modules=max_modules, at=tuple(args.at),
                      widths=Widths(*(args.branch_widths or (None, None, None))),
                      min_gain=args.min_gain)


def _grow_config(args):
    epochs = args.epochs if args.epochs is not None else (2.0 if args.data else 0.0)
    return replace(_modules(args, args.max_modules), data=_data_options(args),
                   train=TrainOptions(epochs=epochs, lr=args.lr, batch_size=args.batch_size,
                                      device=args.device, amp=args.amp),
                   seed=args.seed, input_shape=input_shape(args.input_shape))


def _prune_config(args) -> PruneConfig:
    train = with_lr(replace(PruneConfig().train, epochs=getattr(args, "finetune_epochs", 0.0),
                            batch_size=args.batch_size, device=args.device, amp=args.amp,
                            distill=DISTILL if args.distill is None else args.distill,
                            temperature=args.temperature,
                            batchnorm=args.batchnorm, renorm=args.renorm), args.lr)
    return PruneConfig(ratio=args.ratio, target_macs=args.target_macs,
                       target_params=args.target_params, target_latency=args.target_latency,
                       allocation=args.allocation, criterion=args.criterion,
                       eta=args.eta, rounds=args.rounds, seed=args.seed, min_keep=args.min_keep,
                       round_to=args.round_to, mask_only=getattr(args, "mask_only", False),
                       input_shape=input_shape(args.input_shape), latency=not args.no_latency,
                       timing=_timing(args), data=_data_options(args), train=train,
                       feature_tensor=args.feature_tensor, repair=args.repair,
                       ignore=tuple(args.ignore), group_ratios=tuple(args.group_ratio))


def _gpp_options(args) -> GppOptions:
    """gpp's schedule options; its grow options only with --grow N."""
    if not args.grow:
        given = [flag for flag, on in (
            ("--at", args.at), ("--branch-widths", args.branch_widths),
            ("--grow-share", args.grow_share != GppOptions.grow_share),
            ("--min-gain", args.min_gain != MIN_GAIN)) if on]
        if given:
            raise InputError(f"{given[0]} sets how gpp grows - add --grow N (modules to "
                             "grow) or drop it")
    return GppOptions(args.budget_epochs, args.push_share, args.split, args.acc_floor,
                      PushWeights(args.sep, args.cov, args.align),
                      Path(args.work_dir) if args.work_dir else None, args.resume,
                      _modules(args, args.grow) if args.grow else None, args.grow_share)


def _run(args) -> int:
    if getattr(args, "device", "auto") == "cuda":   # a GPU torch cannot use: before the work
        from .torch_backend import resolve_device

        resolve_device("cuda")
    if args.command == "analyze":
        _out(report.analysis_table(pipeline.analyze(args.model, input_shape(args.input_shape))))
    elif args.command == "prune":
        result = pipeline.prune(args.model, args.output, _prune_config(args),
                                plan_path=args.plan, plan_out=args.plan_out)
        _out(report.prune_summary(result))
    elif args.command == "gpp":
        _out(training_report.gpp_summary(push_prune.gpp(args.model, args.output, _prune_config(args),
                                              _gpp_options(args))))
    elif args.command == "profile":
        if args.json:
            preflight.check_side_output(Path(args.json), "--json", Path(args.model))
        prof = pipeline.profile(args.model, input_shape(args.input_shape), _timing(args),
                                args.runs)
        _out(report.profile_table(prof))
        if args.json and distributed.is_writer():
            files.write_text(args.json, report.to_json(vars(prof)))
            _out(f"wrote {args.json}")
    elif args.command == "push":
        res = push_prune.push(args.model, args.output, _data_options(args),
                            TrainOptions(epochs=args.epochs, lr=args.lr,
                                         batch_size=args.batch_size, device=args.device,
                                         amp=args.amp),
                            PushWeights(args.sep, args.cov, args.align), args.feature_tensor,
                            args.seed, input_shape(args.input_shape))
        _out(training_report.push_summary(res))
    elif args.command == "grow":
        from .grow import grow

        _out(training_report.grow_summary(grow(args.model, args.output, _grow_config(args))))
    elif args.command == "evaluate":
        if not args.data:
            raise InputError("evaluate needs --data (labelled images)")
        acc, n = pipeline.evaluate(args.model, _data_options(args),
                                   input_shape(args.input_shape))
        _out(f"top-1 accuracy {acc:.4f} on {n} images")
    elif args.command == "compare":
        cmp = pipeline.compare(args.model_a, args.model_b, input_shape(args.input_shape),
                               args.repeats, _data_options(args))
        _out(report.comparison_table(cmp, Path(args.model_a).name, Path(args.model_b).name))
    elif args.command == "demo":
        result = push_prune.demo(Path(args.out), args.ratio, args.epochs, args.budget_epochs)
        _out(training_report.gpp_summary(result))
    return 0


def _out(text: str) -> None:
    """A result on stdout. A stdout that cannot take it (a log file on a full disk) is a
    one-line error, not a bug that wrote nothing: the run's files are written by then."""
    if sys.stdout is None:    # closed (>&-)
        return
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as err:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # drop what is left
        raise InputError(f"cannot write the results to standard output "
                         f"({err.strerror or type(err).__name__}) - files the run wrote are "
                         "complete; free some space where it goes, or redirect it") from None


def _err(text: str) -> None:
    """An error line on stderr. A stderr that has gone (`2>&1 | head -1`) keeps the exit
    code as it is: the line raised BrokenPipeError, and the run exited 1, as for a bug."""
    try:
        print(text, file=sys.stderr)
        sys.stderr.flush()
    except (OSError, AttributeError, ValueError):   # broken, closed
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        except OSError:
            pass


def _quiet_onnxruntime(verbose: bool) -> None:
    """onnxruntime's optimizer logs warnings (e.g. "UnsqueezeElimination cannot remove
    node", 80 lines on shufflenet) through its process-wide logger, not the session's;
    the CLI shows them with -v only."""
    try:
        import onnxruntime as ort
    except ImportError:  # reported where a session is needed
        return
    ort.set_default_logger_severity(2 if verbose else 3)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (kill, timeout, a batch scheduler, torchrun stopping the others), ended like
    Ctrl-C: a temporary file or a model without its report is removed, not left behind."""


def _terminate(signum, frame):
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ours = threading.current_thread() is threading.main_thread()  # only it takes handlers
    previous = signal.signal(signal.SIGTERM, _terminate) if ours else None
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    handler = ProgressHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("gpp-onnx: %(message)s"))
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    _quiet_onnxruntime(args.verbose)
    try:
        with _world(args):
            return _reporting(args)
    except GppError as err:  # the torchrun environment itself
        _err(f"gpp-onnx: error: {err}")
        return 2
    finally:
        if ours:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        handler.close_line()
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def _reporting(args) -> int:
    """_run with errors as one line and an exit code (2: bad input, 1: a bug)."""
    try:
        return _run(args)
    except distributed.RanksDisagree as err:  # raised on every rank: rank 0 says it
        if distributed.is_writer():
            _err(f"gpp-onnx: error: {err}")
        return 2
    except GppError as err:
        _err(f"gpp-onnx: error{_rank_tag()}: {err}")
        return _alone(2)
    except KeyboardInterrupt as err:
        work = (getattr(args, "work_dir", None)
                or (args.output + ".gpp-work" if args.command == "gpp" else None))
        kept = (f"; the finished rounds are kept in {work} - rerun with --resume to go on"
                if work and (Path(work) / "state.json").exists() else "")
        if distributed.is_writer():  # Ctrl-C reaches every process; rank 0 says it once
            _err(f"gpp-onnx: interrupted; no output was written{kept}")
        # under torchrun another process may sit in a collective step that would wait for
        # this one at the last barrier: end now (torchrun stops the others)
        return _alone(143 if isinstance(err, _Terminated) else 130)   # 128 + the signal
    except BrokenPipeError:  # the reader of stdout went away (`| head`): end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return _alone(141)   # as a shell reports a process ended by SIGPIPE
    except Exception as err:
        if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
            # the machine's memory, not a bug (torch's CUDA one is an OutOfMemoryError)
            text = " ".join(str(err).split())[:160]
            _err(f"gpp-onnx: error{_rank_tag()}: out of memory ({text}) - nothing was "
                 "written; lower --batch-size, --limit or --input-shape, or use a machine "
                 "with more memory")
            return _alone(2)
        if isinstance(err, OSError) and err.errno == errno.ENAMETOOLONG:  # any path
            name = str(err.filename or "a path")
            name = name if len(name) <= 60 else name[:60] + "..."
            _err(f"gpp-onnx: error{_rank_tag()}: {name}: the name is too long for the file "
                 "system - nothing was written; use a shorter path")
            return _alone(2)
        if distributed.world_size() > 1 and (  # gloo: "Connection closed/reset by peer"
                "by peer" in str(err) or type(err).__name__.startswith("Dist")):
            _err(f"gpp-onnx: error{_rank_tag()}: another process stopped (its error is "
                 "above) - nothing was written")
            return _alone(2)
        if args.verbose:      # a bug: say so on one line; -v shows the traceback
            raise
        _err(f"gpp-onnx: internal error{_rank_tag()}: {type(err).__name__}: {err} - nothing "
             "was written; rerun with -v for the traceback and please report it")
        return _alone(1)


def _alone(code: int) -> int:
    """`code` for an error this process met on its own. Under torchrun the other processes
    may be waiting for it in a collective step, and ending the run normally would wait
    for them at the last barrier: the process exits now instead, and torchrun stops the
    others (an error every process meets together is RanksDisagree, ended normally)."""
    if distributed.world_size() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


@contextlib.contextmanager
def _world(args):
    """Under torchrun (WORLD_SIZE > 1): the process group for this run; the other ranks
    than 0 log only errors and print no results."""
    started = distributed.setup(os.environ, getattr(args, "device", "auto"))
    quiet = started and not distributed.is_writer()
    level = logger.level
    try:
        if quiet:
            logger.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
            yield
    finally:
        logger.setLevel(level)
        if started:
            try:
                distributed.teardown()
            except Exception:  # another process ended first (an error or Ctrl-C it met)
                _err(f"gpp-onnx: error{_rank_tag()}: another process stopped - nothing was "
                     "written")
                _alone(2)


def _rank_tag() -> str:
    return f" (rank {distributed.rank()})" if distributed.world_size() > 1 else ""


if __name__ == "__main__":
    sys.exit(main())
