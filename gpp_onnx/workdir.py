"""The gpp run's work folder: the fingerprint of a run, checkpoints after each finished
round (``round-K.onnx``, ``best.onnx``, ``state.json``; ``grown.onnx`` after the grow
phase) and the checks a fresh run or ``--resume`` makes before any work."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from pathlib import Path

try:
    import fcntl
except ImportError:   # (not POSIX: runs are not locked against each other)
    fcntl = None

import onnx

from . import distributed, files
from . import model as model_io
from .errors import GppError, InputError

logger = logging.getLogger(__name__)


def fingerprint(model: onnx.ModelProto, config, options) -> str:
    """The input model and every setting that changes what a round computes."""
    h = hashlib.sha256(model.SerializeToString(deterministic=True))
    h.update(json.dumps(_settings(config, options), sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def settings(config, options) -> dict:
    """The settings the fingerprint covers, flat ('train.lr': 0.01, ...), as state.json
    keeps them so that --resume can name the one that changed."""
    flat: dict = {}

    def walk(prefix, value):
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = json.loads(json.dumps(value, default=str))

    config_part, options_part = _settings(config, options)
    walk("", {**config_part, **options_part})
    return flat


def _settings(config, options) -> list:
    settings = config.to_dict()
    settings["train"].pop("device", None)
    if isinstance(settings.get("data"), dict):   # batch-preparing processes change nothing
        settings["data"].pop("workers", None)
    settings.pop("latency", None)
    settings.pop("timing", None)
    # each process trains on its share of a batch (BatchNorm's statistics, the rounding of
    # the averaged gradients): a 1-process run resumed by 2 ended with a model neither
    # computes
    settings["processes"] = distributed.world_size()
    opts = {"budget_epochs": options.budget_epochs, "push_share": options.push_share,
            "split": options.split,
            "acc_floor": options.acc_floor, "weights": vars(options.weights),
            "grow": None if options.grow is None else {
                "max_modules": options.grow.max_modules, "at": list(options.grow.at),
                "widths": vars(options.grow.widths), "min_gain": options.grow.min_gain,
                "share": options.grow_share}}
    return [settings, opts]


def save(work: Path, model, state, fingerprint: str,
                name: str | None = None, run_settings: dict | None = None) -> None:
    """Write `model` (``round-K.onnx`` or `name`), the best model and ``state.json``."""
    if not distributed.is_writer():  # several processes: rank 0 keeps the checkpoint
        return
    files.save(model, work / (name or f"round-{state.done}.onnx"))
    if state.best_model is not None:
        files.save(state.best_model, work / "best.onnx")
    files.write_text(work / "state.json", state.to_json(fingerprint, run_settings))
    logger.info("%s checkpointed in %s", f"round {state.done}" if name is None else "grow",
                work)


def _ours(work: Path) -> list[Path]:
    """The files of `work` a run writes (checkpoints, the state)."""
    return [p for p in work.iterdir() if p.is_file() and (
        p.name in ("best.onnx", "grown.onnx", "state.json")
        or re.fullmatch(r"round-\d+\.onnx", p.name)
        or re.fullmatch(r"\.(best|grown|round-\d+)\.onnx\..*\.tmp|\.state\.json\..*\.tmp",
                        p.name))] if work.is_dir() else []


def check_work(options, inputs: tuple[Path, ...] = (), outputs: tuple[Path, ...] = ()
               ) -> None:
    """Before any work: a fresh run needs a work folder without a run in it, --resume one
    with a run; neither the input model (`inputs`: its files) nor the `outputs` (the model
    and its report) may lie in it or be it, since a finished run removes its checkpoints."""
    work = options.work_dir
    if work is None:
        if options.resume:
            raise InputError("--resume needs the work folder of the run (--work-dir, or an "
                             "output path next to which it lies)")
        return
    folder = Path(work).resolve()
    for f in (*inputs, *outputs):
        if folder in Path(f).resolve().parents or folder == Path(f).resolve():
            verb = "holds" if folder != Path(f).resolve() else "is the path of"
            raise InputError(f"--work-dir {work} {verb} {f}, and the run writes and removes "
                             "checkpoints there - choose a folder of its own")
    path = Path(work) / "state.json"
    named = [p.name for p in _ours(Path(work)) if p.suffix == ".onnx"]
    if not options.resume and path.exists():
        raise InputError(f"{work} holds a previous run - pass --resume to continue it, or "
                         "remove it (or choose another --work-dir) to start again")
    if options.resume and not path.exists():
        raise InputError(f"--resume: {work} holds no run to continue (no state.json) - "
                         + (f"remove {work} (a run stopped while saving its first round "
                            "leaves checkpoints without one) and start again" if named else
                            "drop --resume to start one"))
    if not options.resume and named:
        raise InputError(f"{work} holds a checkpoint-named file ({named[0]}) a fresh run "
                         "would overwrite (a run stopped while saving its first round "
                         "leaves one) - remove it or choose another --work-dir")
    if options.resume:
        _check_files(Path(work), _saved(Path(work)))


@contextlib.contextmanager
def held(work: Path | None):
    """The work folder, locked for this run (an advisory lock on the folder, dropped when
    the process ends however it ends): a second run given the same folder (the same
    --work-dir, or the same -o) is refused while this one runs, instead of both
    checkpointing into it. A folder the lock created goes again if the run left it empty."""
    if work is None or fcntl is None or not distributed.is_writer():  # torchrun: rank 0
        yield
        return
    work = Path(work)
    created = not work.exists()
    try:
        work.mkdir(parents=True, exist_ok=True)
        fd = os.open(work, os.O_RDONLY)
    except OSError as err:
        raise InputError(f"cannot use the work folder {work} "
                         f"({err.strerror or type(err).__name__}) - choose another --work-dir"
                         ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise InputError(f"{work} is the work folder of another gpp run that is still "
                             "running - wait for it to end, or give this one another -o or "
                             "--work-dir") from None
        yield
    finally:
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                work.rmdir()


def _check_files(work: Path, saved: dict) -> None:
    """The checkpoints `saved` (a state.json) names are in `work`."""
    needed = ((["best.onnx"] if saved["best"] is not None else [])
              + ([f"round-{saved['done']}.onnx"] if saved["done"] else
                 ["grown.onnx"] if saved.get("grown") is not None else []))
    missing = [name for name in needed if not (work / name).is_file()]
    if missing:
        raise InputError(f"--resume: {work} lacks {missing[0]}, which its state.json names - "
                         f"remove {work} to start the run again")


_KEYS = {"fingerprint": (str,), "done": (int,), "epochs": (int, float), "rows": (list,),
         "best": (dict, type(None)), "stop": (str, type(None))}


def _saved(work: Path) -> dict:
    """The run's state.json; InputError where it is not one this tool wrote."""
    path = work / "state.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        saved, why = None, " ".join(str(err).split())[:120]
    else:
        missing = [k for k in _KEYS if not isinstance(saved, dict) or k not in saved]
        wrong = [k for k, types in _KEYS.items() if not missing and (
            not isinstance(saved[k], types) or isinstance(saved[k], bool))]
        why = (f"{', '.join(missing)} missing" if missing else
               f"{', '.join(wrong)} of the wrong type" if wrong else "")
    if why:
        raise InputError(f"--resume: {path} is not a state this tool wrote ({why}) - remove "
                         f"{work} to start the run again")
    return saved


def remove(work: Path) -> None:
    """After a finished run: its checkpoints and state, then the folder if nothing else
    is left in it (a folder the user gave keeps what was theirs)."""
    for p in _ours(Path(work)):
        p.unlink(missing_ok=True)
    try:
        Path(work).rmdir()
    except OSError:
        pass


def load(work: Path, model: onnx.ModelProto, fingerprint: str,
         run_settings: dict | None = None):
    """--resume: the saved state (``state.json``, as a dict), the best model so far (None
    before any) and the model the next round starts from: the last finished round's, else
    the grown one, else `model`."""
    saved = _saved(Path(work))
    if saved.get("fingerprint") != fingerprint:
        raise InputError(f"--resume: {work} holds a run of {_changed(saved, run_settings)} - "
                         "give the same model and options, or another --work-dir")
    _check_files(Path(work), saved)
    best = _checkpoint(Path(work) / "best.onnx") if saved["best"] is not None else None
    if saved["done"]:
        current = _checkpoint(Path(work) / f"round-{saved['done']}.onnx")
    elif saved.get("grown") is not None:
        current = _checkpoint(Path(work) / "grown.onnx")
    else:
        current = model
    return saved, best, current


def _changed(saved: dict, run_settings: dict | None) -> str:
    """What differs from the saved run: the settings by name (the run's value, then
    this one's), else the model; where the state predates saved settings, either."""
    before = saved.get("settings")
    if not isinstance(before, dict) or run_settings is None:
        return "another model or other settings"
    keys = sorted(k for k in set(before) | set(run_settings)
                  if before.get(k) != run_settings.get(k))
    if not keys:
        return "another model (with these settings)"
    named = ", ".join(f"{k} {before.get(k)!r} (now {run_settings.get(k)!r})"
                      for k in keys[:3])
    return "other settings: " + named + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def _checkpoint(path: Path) -> onnx.ModelProto:
    try:
        return model_io.load(path)
    except GppError:
        raise InputError(f"--resume: the checkpoint {path} is damaged (not a readable ONNX "
                         f"model) - remove {path.parent} to start the run again") from None
