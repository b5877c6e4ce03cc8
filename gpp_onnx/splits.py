"""A run's data: the source loaded for the model's input, split into training and held-out
images (class-stratified, seeded), checked for what the run needs (the images per class
the class discriminants need), and, for pruning, the original model as teacher. Every
process of a distributed run must load the same split (``data_digest``)."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from . import distributed
from .analysis import Analysis
from .config import PruneConfig
from .data import split
from .errors import DataError
from .evaluation import dataset_for
from .graph import GraphView
from .teacher import Teacher, describe, output_kinds

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Splits:
    train: object
    val: object
    teacher: Teacher | None = None      # the original model's outputs, per batch


FEW_HELD_OUT = 100  # fewer held-out images than this: their accuracy moves by over a point
LDA_PER_CLASS = 2   # LDA's within-class scatter needs two training images of every class


def load_data(view: GraphView, config: PruneConfig, analysis: Analysis | None = None,
              per_class: int = 0) -> Splits | None:
    """The data split into training and held-out parts; with `analysis` (of the original),
    the original as teacher too. `per_class`: the training images every class needs (the
    class discriminants of push: ``LDA_PER_CLASS``), checked before anything is said
    about the split."""
    if config.data is None:
        return None
    opts = config.data
    ds = dataset_for(view, opts.source, opts.mean, opts.std, opts.resize, opts.limit, config.seed,
                     opts.workers, opts.labels, opts.feeds)
    if opts.val_split > 0:
        train, val = _split(ds, opts.val_split, config.seed, opts.limit)
        if _short(train, per_class):
            # a class of exactly `per_class` images lost one to the held-out split (one of
            # every class is held out first), though it has what the discriminants need
            # (a class of two digits was refused, and no smaller --val-split helped):
            # such classes stay whole in training; splits that leave enough are unchanged
            try:
                train, val = split(ds, opts.val_split, config.seed, reserve=per_class)
            except DataError:   # nothing left to hold out: _check_per_class says why
                pass
    else:
        train = val = ds
    _check_per_class(train, per_class)
    if opts.val_split <= 0:
        logger.warning("--val-split 0: nothing is held out, so every 'held-out' figure (and "
                       "the choice between models) is measured on the training images")
    if 0 < len(val) < FEW_HELD_OUT and val is not train:
        logger.warning("only %d held-out images: each is %.1f%% of a held-out accuracy, so "
                       "the figures and the choices made on them are noisy - hold out more "
                       "(--val-split) or give more data", len(val), 100 / len(val))
    logger.info("data: %d training and %d held-out images, %s from %s", len(train), len(val),
                f"{ds.num_classes} classes" if ds.labelled else "no labels", ds.source)
    distributed.check_same("data", data_digest(ds, train, val), "start every process with "
                           "the same --data, --limit, --val-split and --seed")
    teacher = None
    if analysis is not None:
        teacher = Teacher(analysis.view.detached, output_kinds(analysis))
        if not ds.labelled:
            logger.info("no labels: the original model is the teacher - criterion %s, "
                        "repair to its outputs, fine-tuning on %s", config.criterion,
                        describe(teacher.kinds))
            if config.train.distill == 0 and config.train.epochs > 0:
                logger.warning("--distill 0 is ignored without labels: matching the "
                               "original's outputs is the fine-tune's only loss")
    return Splits(train, val, teacher)


def _split(ds, fraction: float, seed: int, limit: int | None):
    """`split`, naming --limit where it kept too few images of every class to hold any out
    (5 images of each of 10 classes with --limit 8: one of 8 classes each, and the error
    said 'give two or more of a class' of data that had them)."""
    try:
        return split(ds, fraction, seed)
    except DataError:
        if limit is None:
            raise
        kept, more = (("at most one image of each class", "above the number of classes")
                      if ds.labelled else ("one image", "to 2 or more"))
        raise DataError(f"{ds.source}: --limit {limit} keeps {kept}, so none can be held out; "
                        f"raise --limit {more} (or give --val-split 0)") from None


def _short(train, needed: int) -> bool:
    """Whether some class of the data has fewer than `needed` training images."""
    if needed <= 1 or not train.labelled:
        return False
    return bool(np.unique(np.asarray(train.y), return_counts=True)[1].min() < needed)


def _check_per_class(train, needed: int) -> None:
    """Every class the labels use has `needed` training images. Labels index the model's
    outputs, so classes the data lacks (a validation set without some) are simply absent
    from the discriminants (they were refused, with advice to renumber the classes present,
    which relabels the model's outputs)."""
    if needed <= 0 or not train.labelled:
        return
    labels, counts = np.unique(np.asarray(train.y), return_counts=True)
    if counts.min() < needed:
        c = int(labels[counts.argmin()])
        raise DataError(f"{train.source}: class {c} has {counts.min()} training image(s); the "
                        f"class discriminants need at least {needed} of every class - "
                        "give more data (or a smaller --val-split)")


def data_digest(ds, train, val) -> dict[str, object]:
    """What the processes of one run must agree on: source, images picked, labels."""
    return {"source": ds.source, "classes": ds.classes, "size": (len(train), len(val)),
            "images": (train.x.index.tobytes(), val.x.index.tobytes()),
            "labels": tuple(None if s.y is None else s.y.tobytes() for s in (train, val)),
            "input": getattr(ds.x, "spec", ds.x.shape[1:])}  # Images: decoding spec; Arrays: rows
