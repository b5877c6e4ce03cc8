"""The Grow-Push-Prune schedule (METHOD 4): rounds of push -> score -> prune (with repair)
-> fine-tune, until the target is met or held-out accuracy falls more than a floor below
the start.

Each round runs the steps in ``STEPS``; a step is a function
``(model, state, run) -> (model, state, row)`` where ``run`` is the fixed context of the
whole run (data, settings, the original's statistics) and ``row`` the figures it adds to
the round's report row. No step reads or writes files; ``run_schedule`` checkpoints
between rounds.

* **Budget.** ``budget_epochs`` training epochs in all: ``push_share`` of them push
  (cross-entropy + the push loss) before each of the K cuts, evenly; the rest fine-tunes
  with cross-entropy, after the last cut (``split="final"``: the next round's push, which
  includes cross-entropy, recovers the earlier cuts) or evenly after every cut
  (``"even"``). Round k's cut keeps ``f^(k/K)`` of the original cost
  (``rounds.make_plan``), so the target is met after the last round. Defaults (K=3,
  share 0.25, final) were chosen on the validation split of two Fashion-MNIST VGG nets at
  90% MACs removed with 2 epochs (global allocation): final/0.25 0.8944 and 0.8918, even/0.5 0.8918 and
  0.8828, one round 0.8870-0.8908 (docs/fashion-mnist.md).
* **Grow** (``GppOptions.grow``, METHOD 5). Before the rounds, ``grow_step`` grows up to
  N Inception modules (``grow.loop.grow_model``: each trained ``budget x grow_share / N``
  epochs and kept while held-out accuracy gains more than ``min_gain`` points); the
  rounds then share the other ``budget x (1 - grow_share)`` epochs (those of modules
  never tried are not spent). The target stays a fraction f of the *input's* cost, so
  round k cuts the grown model (cost G) to ``G (f I / G)^(k/K)`` of the input's cost I:
  the rounds' plan is made for the fraction ``f I / G`` of the grown model
  (``Run.round_targets``), and a model meets the target when its cost is below f I.
* **Best model.** Each model met on the way that meets the target (right after a cut,
  after a fine-tune) is a candidate; the one with the best held-out accuracy is the result,
  so a fine-tune that lowers accuracy never makes the result worse.
* **Stopping.** After the last round; when a cut meets the target before the last round
  (kept widths are rounded, so a round can overshoot its share; that round's fine-tune
  then takes all the epochs the rounds have left); when held-out accuracy falls more than
  ``acc_floor`` below the start's; when nothing is left to prune. The floor judges each
  cut once it has been trained on: a round that fine-tunes (or the last) by its best
  model after the cut and the fine-tune; a cut left to the next round's push (``split=
  "final"``) by that push's result. A cut is never judged before any training: the
  untrained cuts before the last round sit far below the start by design. When the
  floor is crossed with a MACs or params target that no model has met yet, the gradual
  cuts end: no more pushes, the next cut goes straight to the target and its fine-tune
  takes every epoch left (``State.at_once``; on the Fashion-MNIST Inception net at 0.25
  of the MACs the pushes took two of three seeds below the default floor, and the
  schedule run to its end kept 0.888 held-out against a start of 0.904). Otherwise the
  result is the best candidate so far, and an error if none met the target.
* **Checkpoints and resume** (``workdir.py``). After each round the work folder holds ``round-K.onnx`` (the
  model the next round starts from), ``best.onnx`` and ``state.json`` (a fingerprint of
  the input model and the settings, the rows, the best candidate). ``resume`` continues
  after the last finished round. A round is a function of the model it starts from, the
  seed and its number (every random draw is seeded from them), so a resumed run ends with
  the model an uninterrupted one writes.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx

from . import workdir
from .analysis import analyze_model
from .analysis.features import final_hidden_layer
from .config import PruneConfig
from .errors import DataError
from .evaluation import accuracy
from .finetune import train_model
from .grow.phase import grow_phase
from .push import offdiag_share, push_model
from .rounds import one_round
from .schedule_options import GppOptions
from .stats import ModelStats

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class State:
    done: int = 0                              # rounds finished
    epochs: float = 0.0                        # training epochs spent
    rows: tuple[dict, ...] = ()                # one per finished round
    best: dict | None = None                   # round, stage, accuracy, params, macs
    stop: str | None = None                    # why the run ended early
    cost: tuple[int, int] | None = None        # params, MACs of the current model
    grown: dict | None = None                  # the grow phase's row, once it ran
    at_once: str | None = None                 # why the rest of the cut is made at once
    best_model: onnx.ModelProto | None = field(default=None, repr=False, compare=False)

    def to_json(self, fingerprint: str, settings: dict | None = None) -> str:
        return json.dumps({"fingerprint": fingerprint, "done": self.done,
                           "epochs": self.epochs, "rows": list(self.rows), "best": self.best,
                           "stop": self.stop, "grown": self.grown, "at_once": self.at_once,
                           "settings": settings}, indent=1)


@dataclass(frozen=True)
class Run:
    """What every step of a run reads and none changes."""
    config: PruneConfig                        # its train.epochs are ignored (budget)
    options: GppOptions
    data: object                               # splits.Splits
    before: ModelStats
    accuracy: float                            # the start's held-out accuracy
    tolerance: object                          # verify.Tolerance of the original
    widths: dict = field(default_factory=dict)  # the original's group widths, by key
    start: ModelStats | None = None            # the grown model's cost (None: no grow)

    def push_epochs(self, k: int) -> float:
        return self.options.round_budget() * self.options.push_share / self.config.rounds

    def finetune_epochs(self, k: int) -> float:
        rest = self.options.round_budget() * (1 - self.options.push_share)
        if self.options.split == "final":
            return rest if k == self.config.rounds else 0.0
        return rest / self.config.rounds

    def round_targets(self) -> tuple[PruneConfig, ModelStats]:
        """The config and the cost round k's plan interpolates from: the input's, or after
        a grow the grown model's with the target (a fraction of the input's cost)
        restated as a fraction of it."""
        if self.start is None:
            return self.config, self.before
        c = self.config
        if c.target_macs is not None:
            c = replace(c, target_macs=min(1.0, c.target_macs * self.before.macs
                                           / max(self.start.macs, 1)))
        else:
            c = replace(c, target_params=min(1.0, c.target_params * self.before.params
                                             / max(self.start.params, 1)))
        return c, self.start


def grow_step(model, state: State, run: Run):
    """The grow phase before round 1 (grow.phase): modules kept while they pay."""
    grown, row = grow_phase(model, run.options.grow_settings(run.config), run.data)
    state = replace(state, epochs=state.epochs + row["epochs"], grown=row,
                    cost=(row["params"], row["macs"]))
    state = _consider(state, run, grown, 0, "grow", row["accuracy"], row["params"],
                      row["macs"])
    return grown, state, row


def push_step(model, state: State, run: Run):
    k = state.done + 1
    epochs = run.push_epochs(k)
    if epochs <= 0 or state.at_once:
        return model, state, {}
    train = replace(run.config.train, epochs=epochs)
    feature = _feature(model, run.config)
    pushed, rep = push_model(model, run.data.train, run.data.val, feature, train,
                             run.options.weights, seed=run.config.seed + 1000 * k)
    row = {"accuracy_after_push": rep.accuracy_after, "offdiag_before_push": rep.offdiag_before,
           "offdiag_after_push": rep.offdiag_after, "push_epochs": epochs}
    state = replace(state, epochs=state.epochs + epochs)
    if state.rows and not _judged(state.rows[-1], run):  # the previous cut, now trained on
        state = _floor(state, run, rep.accuracy_after, k, cut_follows=True)
    return pushed, state, row


def prune_step(model, state: State, run: Run):
    k = state.done + 1
    config, base = run.round_targets()
    config = replace(config, train=replace(config.train, epochs=0.0))
    if state.at_once:  # the floor ended the gradual cuts: round k of k goes to the target
        config = replace(config, rounds=k)
    analysis = analyze_model(model, config.input_shape).keeping(config.ignore)
    if not analysis.prunable:
        return model, replace(state, stop="nothing left to prune"), {}
    cut = one_round(analysis, config, run.data, k, None, base, run.tolerance, run.widths)
    row = {"removed_channels": cut.plan.removed_channels, "params": cut.params,
           "macs": cut.macs, "accuracy_after_cut": cut.accuracy_cut,
           "equivalence_relative_error": cut.error}
    state = _consider(replace(state, cost=(cut.params, cut.macs)), run, cut.model, k, "cut",
                      cut.accuracy_cut, cut.params, cut.macs)
    return cut.model, state, row


def finetune_step(model, state: State, run: Run):
    k = state.done + 1
    if state.stop:
        return model, state, {}
    epochs = run.finetune_epochs(k)
    rounds = run.config.rounds
    if state.at_once or (k < rounds and _meets_target(run, k, *state.cost)):
        # no cut is left to make: the floor sent this round's cut straight to the target,
        # or kept widths, rounded, took it there before the last round. The rounds end
        # here and this fine-tune takes every epoch they have left
        epochs = run.options.round_budget() - _round_epochs(state)
        if not state.at_once:
            why = f"the target was met in round {k} of {rounds}; its fine-tune took the "
        elif k < rounds:
            why = (f"{state.at_once}; the rest of the cut was made at once and fine-tuned "
                   "with the ")
        else:
            why = (f"{state.at_once}; the last round went on, as no model had met the target; "
                   "its fine-tune took the ")
        why += f"{epochs:.2f} epochs left"
        state = replace(state, stop=why)
    if epochs <= 0:
        return model, state, {}
    teacher = run.data.teacher if run.config.train.distill_weight > 0 else None  # --distill W
    # after a grow, the BatchNorm put back on folded convs (train.renorm) lowered held-out
    # accuracy (two seeds, docs/grow.md): the rounds of a grown model fine-tune without it
    train = replace(run.config.train, epochs=epochs,
                    renorm=run.config.train.renorm and run.options.grow is None)
    tuned = train_model(model, run.data.train, train, run.config.seed + k, teacher=teacher)
    acc = accuracy(tuned, run.data.val)
    logger.info("round %d: accuracy after fine-tuning %.4f", k, acc)
    row = {"accuracy_after_finetune": acc, "finetune_epochs": epochs}
    params, macs = state.cost  # fine-tuning changes weights, not widths
    state = _consider(replace(state, epochs=state.epochs + epochs), run, tuned, k, "fine-tune",
                      acc, params, macs)
    return tuned, state, row


STEPS = (push_step, prune_step, finetune_step)


def run_round(model, state: State, run: Run) -> tuple[onnx.ModelProto, State]:
    """One round: every step in turn; the round's row gathers what each reported."""
    k = state.done + 1
    row: dict = {"round": k}
    for step in STEPS:
        model, state, part = step(model, state, run)
        row.update(part)
        if state.stop:
            break
    if "params" not in row:  # nothing was cut
        return model, state
    row["epochs_used"] = state.epochs
    row["offdiag_after_round"] = _offdiag(model, run)
    best = max(row[key] for key in ("accuracy_after_cut", "accuracy_after_finetune")
               if row.get(key) is not None)
    row["accuracy"] = best
    if _judged(row, run):
        state = _floor(state, run, best, k, cut_follows=k < run.config.rounds)
    return model, replace(state, done=k, rows=state.rows + (row,))


def _round_epochs(state: State) -> float:
    """Training epochs the rounds have spent (the grow phase's not counted)."""
    return state.epochs - (state.grown["epochs"] if state.grown else 0.0)


def _judged(row: dict, run: Run) -> bool:
    """Whether the floor judged this round's cut in the round itself (it was fine-tuned,
    or it is the last); otherwise the next round's push result judges it."""
    return row.get("accuracy_after_finetune") is not None or row["round"] >= run.config.rounds


def _floor(state: State, run: Run, accuracy: float, k: int, cut_follows: bool) -> State:
    """Stop when `accuracy` is more than the floor below the start's; with a cost target
    no model has met yet and a cut still to come, make the rest of the cut at once."""
    if state.stop or state.at_once or run.accuracy - accuracy <= run.options.acc_floor:
        return state
    why = (f"held-out accuracy {accuracy:.4f} fell more than {run.options.acc_floor:g} "
           f"below the start's {run.accuracy:.4f} in round {k}")
    cost_target = run.config.target_macs is not None or run.config.target_params is not None
    if cost_target and state.best is None and cut_follows:
        logger.warning("%s: the rest of the cut is made at once", why)
        return replace(state, at_once=why)
    return replace(state, stop=why)


def run_schedule(model: onnx.ModelProto, run: Run, fingerprint: str
                 ) -> tuple[onnx.ModelProto, State]:
    """All rounds (from the checkpoint when resuming); returns the best model and the state."""
    state = State()
    work = run.options.work_dir
    # named when --resume is refused
    settings = workdir.settings(run.config, run.options) if work is not None else None
    if work is not None:
        model, state = _open_work(work, model, run, fingerprint, settings)
    if run.options.grow is not None and state.grown is None:
        logger.info("grow: up to %d module(s)", run.options.grow.max_modules)
        model, state, _ = grow_step(model, state, run)
        if work is not None:
            workdir.save(work, model, state, fingerprint, "grown.onnx", settings)
    if state.grown is not None:  # the rounds interpolate from the grown model's cost
        run = replace(run, start=ModelStats(state.grown["params"], state.grown["macs"]))
    while state.done < run.config.rounds and not state.stop:
        logger.info("round %d of %d", state.done + 1, run.config.rounds)
        model, state = run_round(model, state, run)
        if work is not None and state.rows and state.rows[-1]["round"] == state.done:
            workdir.save(work, model, state, fingerprint, run_settings=settings)
    if state.best_model is None:
        why = state.stop or "the target was not reached"
        kept = (f"; the finished rounds are kept in {work} (remove it, or give another "
                "--work-dir, to run again)" if work is not None else "")
        raise DataError(f"no model met the target ({why}){kept} - loosen --acc-floor, give "
                        "a larger --budget-epochs or more --rounds, or a milder target")
    return state.best_model, state


def _consider(state: State, run: Run, model, k: int, stage: str, acc, params: int,
              macs: int) -> State:
    """Keep `model` as the best so far if it meets the target and beats the best."""
    if acc is None or not _meets_target(run, k, params, macs):
        return state
    if state.best is not None and acc <= state.best["accuracy"]:
        return state
    best = {"round": k, "stage": stage, "accuracy": acc, "params": params, "macs": macs}
    return replace(state, best=best, best_model=model)


def _meets_target(run: Run, k: int, params: int, macs: int) -> bool:
    c = run.config
    if c.target_macs is not None:
        return macs <= c.target_macs * run.before.macs * (1 + 1e-9)
    if c.target_params is not None:
        return params <= c.target_params * run.before.params * (1 + 1e-9)
    return k == c.rounds  # ratio, latency, eta: spread over the rounds


def _feature(model, config: PruneConfig) -> str:
    from .graph import GraphView

    return final_hidden_layer(GraphView(model, config.input_shape), config.feature_tensor)


def _offdiag(model, run: Run) -> float:
    return offdiag_share(model, run.data.val, _feature(model, run.config))


def _open_work(work: Path, model, run: Run, fingerprint: str, settings: dict | None = None):
    """A fresh work folder, or (resume) the model and state after its last finished round."""
    workdir.check_work(run.options)
    if not run.options.resume:
        return model, State()
    saved, best, current = workdir.load(work, model, fingerprint, settings)
    state = State(saved["done"], saved["epochs"], tuple(saved["rows"]), saved["best"],
                  saved["stop"], grown=saved.get("grown"), at_once=saved.get("at_once"),
                  best_model=best)
    logger.info("resuming after %s from %s", f"round {state.done} of {run.config.rounds}"
                if state.done or state.grown is None else "the grow phase", work)
    return current, state
