"""Public facades of the training commands: ``push`` (the push step alone), ``gpp`` (the
push/prune rounds of schedule.py within an epoch budget) and the README's ``demo``. Like
``pipeline.prune`` they take a path or an in-memory ModelProto, check before the work and
write atomically."""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx

from . import (batch, distributed, files, half, latency, preflight, report, schedule,
               training_report, verify, workdir)
from . import model as model_io
from .analysis import analyze_model
from .analysis.features import final_hidden_layer
from .config import DataOptions, PruneConfig, TrainOptions, check_type
from .data import iter_batches
from .errors import InputError
from .evaluation import data_input_shape
from .finetune import train_model
from .graph import GraphView
from .grow.phase import check_grow
from .pipeline import _short_of_target
from .start import check_paths, check_precision, load, start_run
from .push import PushReport, PushWeights, push_model
from .splits import LDA_PER_CLASS, load_data
from .schedule import GppOptions
from .schedule_options import MIN_ROUND_STEPS
from .stats import ModelStats
from .teacher import fidelity

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PushResult:
    output: Path | None
    report: PushReport
    model: onnx.ModelProto = field(repr=False)


def push(model, output=None, data: DataOptions | None = None,
         train: TrainOptions = TrainOptions(epochs=1.0), weights: PushWeights = PushWeights(),
         feature_tensor: str | None = None, seed: int = 0, input_shape=None) -> PushResult:
    """Train `model` with cross-entropy + the push loss (METHOD 4) for `train.epochs` on
    `data`; the result is checked (checker, onnxruntime) and written to `output` if given."""
    if data is None:
        raise InputError("push needs labelled data - pass --data (a folder, .npz, IDX file, "
                         "fashion-mnist or digits)")
    PruneConfig(data=data, train=train)._typed()   # options of the wrong type: one line
    check_type("weights", weights, PushWeights, "push_prune")
    if train.epochs <= 0:
        raise InputError(f"--epochs {train.epochs} must be > 0")
    src = None if isinstance(model, onnx.ModelProto) else model_io.model_path(model)
    dst = None if output is None else Path(output)
    check_paths(model, src, dst, data)
    input_shape = data_input_shape(model, input_shape, data.source, data.feeds)
    loaded, normalized, analysis = load(model if src is None else src, input_shape)
    config = PruneConfig(data=replace(data, labels=True), seed=seed, train=train).checked()
    check_precision(normalized, config)
    splits = load_data(analysis.view, config, per_class=LDA_PER_CLASS)
    feature = final_hidden_layer(analysis.view, feature_tensor)
    pushed, rep = push_model(normalized, splits.train, splits.val, feature, train, weights, seed)
    pushed = batch.declare(loaded.model, _float16_back(loaded.model, analysis.view, pushed))
    verify.check(pushed, "pushed model")
    verify.make_session(pushed, "pushed model")
    if dst is not None and distributed.is_writer():
        with files.Outputs() as out:   # the model and its report: both or neither
            out.save(pushed, dst)
            out.text(dst.with_suffix(".report.json"), report.to_json(
                {"input": str(src or "<in-memory model>"), "output": str(dst),
                 "weights": vars(weights), "train": vars(train), "push": vars(rep)}))
    return PushResult(dst, rep, pushed)


@dataclass(frozen=True)
class GppResult:
    output: Path | None
    report_path: Path | None
    before: ModelStats
    after: ModelStats
    accuracy_before: float
    rows: tuple[dict, ...]              # one per round (schedule.run_round)
    best: dict                          # the round and stage the result comes from
    epochs: float                       # training epochs spent
    latency_ratio: float | None
    report: dict = field(repr=False)
    model: onnx.ModelProto | None = field(default=None, repr=False)


def gpp(model, output=None, config: PruneConfig | None = None,
        options: GppOptions = GppOptions(), **fields) -> GppResult:
    """Grow-Push-Prune's push/prune loop (schedule.py): rounds of push -> score -> prune
    (with repair) -> fine-tune within ``options.budget_epochs``; the best held-out model
    that meets the target is checked and written to `output` (with its JSON report).
    `fields` are PruneConfig fields: ``gpp(m, "out.onnx", data=DataOptions("digits"),
    target_macs=0.5)``."""
    config = replace(config or PruneConfig(), **fields)._typed()
    check_type("options", options, GppOptions, "schedule")
    if config.data is None or config.data.labels is False:
        raise InputError("gpp needs labelled data (push trains on the classes) - pass --data "
                         "with labels (a folder, .npz, IDX file, fashion-mnist or digits); "
                         "without labels, prune with --finetune-epochs distils instead")
    src, dst, config, options = _gpp_checks(model, output, config, options)
    with workdir.held(options.work_dir):
        workdir.check_work(options)   # another run may have checkpointed here since the check
        return _gpp(model, src, dst, config, options)


def _gpp(model, src: Path | None, dst: Path | None, config: PruneConfig,
         options: GppOptions) -> GppResult:
    t0 = time.perf_counter()
    start = start_run(model if src is None else src, replace(config, latency=False),
                      LDA_PER_CLASS)
    options = options.checked(config, len(start.data.train.y))
    config = replace(config, timing=latency.timing_for(start.loaded.model, config.timing))
    if options.grow is not None:
        check_grow(start.analysis.view, options.grow_settings(config))
    run = schedule.Run(config, options, start.data, start.before, start.accuracy,
                       start.tolerance, {g.key: g.width for g in start.analysis.groups})
    best, state = schedule.run_schedule(start.normalized, run,
                                        workdir.fingerprint(start.normalized, config, options))
    best = batch.declare(start.loaded.model,
                         _float16_back(start.loaded.model, start.analysis.view, best))
    verify.check(best, "result")
    verify.make_session(best, "result")
    writer = distributed.is_writer()   # several processes: rank 0 times, writes, reports
    timing = (latency.measure(start.normalized, best,
                              latency.timing_feeds(start.analysis.view, config.timing),
                              options=config.timing, target=config.target_latency)
              if config.latency and writer else None)
    after = ModelStats(state.best["params"], state.best["macs"])
    fid = (fidelity(start.data.teacher, best, (x for x, _ in iter_batches(
        start.data.val, config.data.batch_size)), "result") if writer else None)
    ratio = timing.ratio if timing else None
    warnings = [w for w in (timing.warning(config.round_to) if timing else None,
                            _short_of_target(config, start.before, after, ratio,
                                             _grown_cost(state))) if w]
    data_report = training_report.gpp_report(
        src or "<in-memory model>", dst, config, options, state, start.before, after,
        start.accuracy, ratio, time.perf_counter() - t0, start.tolerance, fid, warnings)
    if state.grown is not None:  # how the rounds trimmed each grown module's branches
        data_report["grow"]["after"] = report.module_branches(
            analyze_model(best, config.input_shape))
    report_path = None
    if dst is not None and writer:
        with files.Outputs() as out:   # the model and its report: both or neither
            out.save(best, dst)
            report_path = out.text(dst.with_suffix(".report.json"), report.to_json(data_report))
    if options.work_dir is not None and writer:  # a finished run leaves nothing to resume
        workdir.remove(Path(options.work_dir))
    return GppResult(dst, report_path, start.before, after, start.accuracy, state.rows,
                     state.best, state.epochs, timing.ratio if timing else None, data_report,
                     best)


def _grown_cost(state) -> ModelStats | None:
    return None if state.grown is None else ModelStats(state.grown["params"],
                                                        state.grown["macs"])


def _gpp_checks(model, output, config: PruneConfig, options: GppOptions):
    """What gpp checks before the work: options, the input, output and work folder, the
    data's image size. Returns (input path or None, output path or None, config, options)
    with the input shape and the work folder settled."""
    config = replace(config, data=replace(config.data, labels=True)).checked()
    options.check_grow(config)
    src = None if isinstance(model, onnx.ModelProto) else model_io.model_path(model)
    dst = None if output is None else Path(output)
    if options.work_dir is None and dst is not None:
        options = replace(options, work_dir=dst.with_name(dst.name + ".gpp-work"))
    check_paths(model, src, dst, config.data)
    config = replace(config, input_shape=data_input_shape(model, config.input_shape,
                                                          config.data.source, config.data.feeds))
    workdir.check_work(options, tuple(files.stored_files(src) if src else ()),
                       () if dst is None else (dst, dst.with_suffix(".report.json")))
    if options.work_dir is not None:
        preflight.check_writable(Path(options.work_dir) / "state.json")
    return src, dst, config, options


def _float16_back(original: onnx.ModelProto, view: GraphView, trained: onnx.ModelProto
                  ) -> onnx.ModelProto:
    """`trained` with the input's float16-behind-Cast weights stored so where their values
    still are float16 ones; the others are written in float32, with a warning."""
    trained, widened = half.weights_back(original, view, trained)
    if widened:
        logger.warning("%s", widened)
    return trained


def demo(folder: Path, ratio: float = 0.5, epochs: float = 10, budget: float = 4,
         seed: int = 0) -> GppResult:
    """The README's main job on embedded data: train the digits CNN, then Grow-Push-Prune's
    push/prune rounds (``gpp``) remove `ratio` of its channels within `budget` epochs, and
    the summary shows accuracy, params, MACs, latency and every round."""
    from .samples import digits_cnn

    if distributed.is_writer():   # a file or an unwritable folder: before the training
        preflight.check_writable(folder / "digits_cnn.onnx")
        folder.mkdir(parents=True, exist_ok=True)
    data = DataOptions("digits")
    model = digits_cnn(seed)
    splits = load_data(GraphView(model), PruneConfig(data=data, seed=seed))
    # two rounds: the 1617 training digits give three rounds too few steps each
    config = PruneConfig(ratio=ratio, data=data, rounds=2, seed=seed)
    options = GppOptions(budget_epochs=budget)
    _check_demo_budget(options, config, len(splits.train))
    logger.info("training the sample digits CNN (%g epochs)", epochs)
    trained = train_model(model, splits.train, TrainOptions(epochs=epochs, lr=0.05), seed,
                          desc="training")
    src, out = folder / "digits_cnn.onnx", folder / "digits_cnn.pruned.onnx"
    if distributed.is_writer():
        files.save(trained, src)
        logger.info("wrote the trained sample model to %s", src)
        shutil.rmtree(out.with_name(out.name + ".gpp-work"), ignore_errors=True)  # killed
    distributed.barrier()  # the other processes read it once rank 0 has written it
    return gpp(src, out, config, options)


def _check_demo_budget(options: GppOptions, config: PruneConfig, train_size: int) -> None:
    """gpp's own check of the steps per round, before the demo trains its CNN and in the
    demo's flags: gpp's refusal came after the training and named --batch-size and
    --rounds, which demo does not take."""
    steps, enough, batches = options.steps(config, train_size)
    if steps["round"] < MIN_ROUND_STEPS:
        raise InputError(f"--budget-epochs {options.budget_epochs:g} gives the demo's "
                         f"{config.rounds} rounds fewer than {MIN_ROUND_STEPS} training steps "
                         f"each ({batches} batches an epoch) - use --budget-epochs {enough:g} "
                         "or more")
