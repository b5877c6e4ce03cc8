"""The images a round scores and repairs on: ``--per-class`` of each class (without labels,
per_class x 10 at random), more where the final hidden layer is wider than that (the LDA
needs more images than neurons), in whole batches where the input fixes one."""
from __future__ import annotations

import logging

import numpy as np

from . import batch
from .analysis import Analysis
from .analysis.features import final_hidden_layer
from .config import PruneConfig
from .importance import Evidence, get_criterion
from .splits import Splits

logger = logging.getLogger(__name__)


def evidence_for(analysis: Analysis, config: PruneConfig, data: Splits | None) -> Evidence:
    """What the criterion scores on: the scoring images and, for a criterion that reads
    it, the final hidden layer."""
    if data is None:
        return Evidence(seed=config.seed)
    per_class = config.data.per_class
    criterion = get_criterion(config.criterion, config.seed)
    needs_feature = getattr(criterion, "needs_feature", False) or config.feature_tensor is not None
    feature = final_hidden_layer(analysis.view, config.feature_tensor) if needs_feature else None
    if feature is not None and data.train.labelled:
        per_class = _lda_per_class(analysis, feature, data.train, per_class)
    scoring = images_per_class(data.train, per_class, config.seed)
    if feature is not None and data.train.labelled:
        _warn_if_too_few(analysis, feature, scoring)
    size, scoring = in_whole_batches(analysis, config, scoring)
    return Evidence(scoring, feature, config.train.device, size, config.seed)


def in_whole_batches(analysis: Analysis, config: PruneConfig, images):
    """(batch size, `images`) to run the model on: --batch-size and all of them, or for a
    model whose input still fixes the batch at b (normalising could not free it, ``batch``)
    b and the first multiple of b of them."""
    fixed = batch.fixed(analysis.view.model)
    if fixed is None:
        return config.data.batch_size, images
    return fixed, images.subset(np.arange(len(images) - len(images) % fixed))


UNLABELLED_CLASSES = 10  # without labels, scoring takes per_class x this many images


def _lda_per_class(analysis: Analysis, feature: str, train, per_class: int) -> int:
    """`per_class`, raised so the scoring images outnumber the final hidden layer's neurons
    plus the classes: with fewer, the layer's LDA classifier separates every scoring image
    by a margin that saturates its loss, whose gradient (the gpp utility) is then exactly
    0 for every channel and the cut arbitrary (a Paddle-style Flatten -> MatMul head over
    32x7x7 features with 32 images of each of 10 classes: accuracy 0.857 -> 0.713 right
    after a 50% cut, where 100 or more per class kept 0.857). Twice the neurons: with
    barely more images than neurons, S_w is near-singular and the loss still saturates."""
    neurons, classes = _neurons(analysis, feature), max(int(np.unique(train.y).size), 1)
    needed = -(-2 * (neurons + classes) // classes) if neurons else 0
    if needed <= per_class:
        return per_class
    logger.info("scoring: %d images per class instead of %d, so the %d neurons of '%s' "
                "are fewer than the scoring images", needed, per_class, neurons, feature)
    return needed


def _warn_if_too_few(analysis: Analysis, feature: str, scoring) -> None:
    """The data may hold fewer images than `_lda_per_class` asks for."""
    neurons = _neurons(analysis, feature)
    if len(scoring) < neurons + int(np.unique(scoring.y).size):
        logger.warning("only %d training images for the %d neurons of the final hidden layer "
                       "'%s': its LDA separates them all and the discriminant scores may be "
                       "0 - give more data or use --criterion taylor", len(scoring), neurons,
                       feature)


def _neurons(analysis: Analysis, feature: str) -> int:
    shape = analysis.view.shape(feature)
    return int(shape[1]) if shape and len(shape) > 1 else 0


def images_per_class(ds, per_class: int, seed: int):
    """`per_class` images of each class (without labels: per_class x 10 at random)."""
    rng = np.random.default_rng(seed)
    if not ds.labelled:
        return ds.subset(np.sort(rng.permutation(len(ds))[:per_class * UNLABELLED_CLASSES]))
    idx = np.concatenate([rng.permutation(np.flatnonzero(ds.y == c))[:per_class]
                          for c in np.unique(ds.y)])
    return ds.subset(np.sort(idx))
