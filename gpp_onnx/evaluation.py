"""Data for a model, and top-1 accuracy through onnxruntime (the deployment path)."""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

from . import distributed
from .arrays import Fed, constants_for, load_arrays, load_inputs, read_inputs, whole_inputs
from .batching import feeds, padded, row_input, rows
from .data import DataSpec, Dataset, check_labels, iter_batches, load_dataset
from .errors import DataError
from .graph import DEFAULT_IMAGE_SIDE, GraphView, is_nhwc
from .npz import is_npz, npz_names, read_npz, read_npz_arrays
from .verify import make_session, outputs

logger = logging.getLogger(__name__)


def data_input_shape(model, input_shape, source: str | None, feeds=()):
    """`input_shape`, or, where it is None and the model's one 4-D image input leaves its
    height and width free, that input at the size of `source`'s images (as stored; an image
    folder: its first image's) when they are no larger than 224 on either side. Without
    data a free side is probed at 224 (``graph.DEFAULT_IMAGE_SIDE``); blowing small images
    (28x28) up to it would run the model on another size than its data, at many times the
    cost, while larger images stay resized down to it, which bounds time and memory
    (--input-shape sets any size). A model with several inputs: the sizes of the arrays
    named as its inputs, or, where `feeds` (--feed) leave one input for images, that
    input's as above. `model`: a ModelProto or a path."""
    if input_shape is not None or source is None:
        return input_shape
    if not isinstance(model, onnx.ModelProto):
        try:
            model = onnx.load_model(str(model), load_external_data=False)
        except Exception:                # unreadable: loading says so, with its own message
            return None
    inits = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in inits]
    fed = dict(feeds)
    data = [v for v in inputs if v.name not in fed]
    if len(inputs) > 1 and (len(data) != 1 or _by_name(source, data)):
        return _inputs_shape(data, source)
    shape = _one_input_shape(data[0], source) if data else None
    return shape if len(inputs) == 1 or shape is None else {data[0].name: shape}


def _one_input_shape(value, source: str) -> tuple | None:
    """The shape of input `value` (a ValueInfoProto) at `source`'s sizes where it leaves
    some free (``data_input_shape``), else None."""
    fixed = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
             for d in value.type.tensor_type.shape.dim]
    if len(fixed) != 4:
        return _array_input_shape(value.name, fixed, source)
    nhwc = is_nhwc(fixed)
    sides, channel = ((1, 2), 3) if nhwc else ((2, 3), 1)
    if all(fixed[a] is not None for a in sides):
        return None
    from .sources import native_shape

    c, h, w = native_shape(source)
    if max(h, w) > DEFAULT_IMAGE_SIDE:
        logger.info("input '%s' takes images of any size: the data's (%dx%d) are resized to "
                    "%d on each free side (--input-shape sets another size)", value.name,
                    h, w, DEFAULT_IMAGE_SIDE)
        return None
    shape = [fixed[0] or 1, *fixed[1:]]      # a batch the model fixes stays
    for axis, size in zip((channel, *sides), (c, h, w)):
        shape[axis] = size if shape[axis] is None else shape[axis]
    logger.info("input '%s' takes images of any size: run at the data's %dx%d "
                "(--input-shape sets another)", value.name, shape[sides[0]],
                shape[sides[1]])
    return tuple(shape)


def _array_input_shape(name: str, fixed: list, source: str) -> tuple | None:
    """A non-image input with free axes besides the batch's (audio features of any
    length): those axes at the size of an .npz's x, where its rank fits."""
    if len(fixed) < 2 or None not in fixed[1:] or not is_npz(source):
        return None
    x = read_npz(Path(source).expanduser())[0]
    if x.ndim != len(fixed):
        return None
    shape = [fixed[0] or 1] + [d if d is not None else int(n)
                               for d, n in zip(fixed[1:], x.shape[1:])]
    logger.info("input '%s' takes any size on some axes: run at the data's %s "
                "(--input-shape sets another)", name, tuple(shape[1:]))
    return tuple(shape)


def _inputs_shape(inputs: list, source: str) -> dict | None:
    """The inputs of a model with several whose sizes are free besides the batch's, at
    the sizes of the .npz arrays named as them (``arrays.load_inputs``), where it has
    them all; None otherwise (loading the data says what is wrong)."""
    def fixed(d) -> bool:
        return d.HasField("dim_value") and d.dim_value > 0

    path = Path(source).expanduser()
    dims = {v.name: v.type.tensor_type.shape.dim for v in inputs}
    free = {name: len(d) for name, d in dims.items() if not all(map(fixed, d[1:]))}
    if not free or not is_npz(path):
        return None
    try:
        arrays = read_npz_arrays(path, tuple(dims), "")[0]
    except DataError:
        return None
    if any(arrays[name].ndim != rank for name, rank in free.items()):
        return None
    # dim 0 as the model fixes it (a batch, or the size of an input fed whole:
    # ``arrays.whole_inputs``), else 1
    shapes = {name: (dims[name][0].dim_value if fixed(dims[name][0]) else 1,
                     *map(int, arrays[name].shape[1:])) for name in free}
    logger.info("inputs %s take any size on some axes: run at the data's %s (--input-shape "
                "NAME:... sets another)", ", ".join(shapes),
                ", ".join(str(s[1:]) for s in shapes.values()))
    return shapes


def check_inputs_source(view: GraphView, source: str, feeds=()) -> None:
    """A model with several inputs takes --data as an .npz holding an array under each
    input's name (``arrays.load_inputs``), or as images for the one input `feeds` (--feed)
    leaves: DataError, before any work, where it does not."""
    if len(view.inputs) > 1:
        rest = _data_inputs(view, feeds, source)[0]
        if _by_name(source, rest):
            read_inputs(source, rest, whole_inputs(view.inputs))


def _by_name(source: str, rest) -> bool:
    """Whether `source` is read as an array per input named as the input (`rest`: the
    inputs the data feeds): for several, and for one unless it is an image source (no
    .npz, or an .npz with x and no array of that input's name)."""
    if len(rest) > 1 or not is_npz(source):
        return len(rest) > 1
    names = npz_names(source)
    return "x" not in names or rest[0].name in names


def _data_inputs(view: GraphView, feeds, source: str) -> tuple[list, dict]:
    """(the inputs the data feeds, --feed values as arrays for the others); DataError for
    --feed on a one-input model or on every input, or of an input `source` holds."""
    if not feeds:
        return view.inputs, {}
    names = ", ".join(s.name for s in view.inputs)
    if len(view.inputs) < 2:
        raise DataError(f"--feed gives the inputs of a model with several, and this one has "
                        f"one ({names}) - leave --feed out")
    constants = constants_for(view.inputs, feeds, whole_inputs(view.inputs))
    rest = [s for s in view.inputs if s.name not in constants]
    if not rest:
        raise DataError(f"--feed gives every input ({names}), so the data feeds none - leave "
                        "out the --feed of the input the data holds")
    held = [n for n in constants if n != "y" and n in npz_names(source)]
    if held:
        raise DataError(f"--feed gives '{held[0]}', which {source} also holds - leave out the "
                        "--feed or the array")
    return rest, constants


def dataset_for(view: GraphView, source: str, mean=None, std=None, resize: bool = True,
                limit: int | None = None, seed: int = 0, workers: int | None = None,
                labels: bool | None = None, feeds=()) -> Dataset:
    """Load `source` shaped for the model's input and check labels fit its output
    (`labels`: True requires them, False ignores them, None uses them where present).
    A 4-D input takes images, NCHW or NHWC (last axis 1 or 3 and axis 1 not); any other
    rank takes an .npz's rows as they are (:mod:`gpp_onnx.arrays`), and so do the inputs
    of a model with several (an array per input, named as the input), except those given
    the same values for every sample by `feeds` ((name, values) pairs, --feed); where
    they leave one input and the source is no .npz, or an .npz with x and no array of that
    input's name, it is read as for a one-input model."""
    rest, constants = _data_inputs(view, feeds, source)
    if len(view.inputs) > 1 and _by_name(source, rest):
        whole = whole_inputs(view.inputs)
        ds = load_inputs(source, rest, labels, limit, seed, whole)
        if constants:
            ds = replace(ds, x=Fed(ds.x, "", constants, whole))
        return _checked_labels(view, ds, view.batch_input)
    spec = rest[0]
    pixels = np.dtype(spec.dtype) == np.uint8 and len(spec.shape) == 4
    if np.dtype(spec.dtype).kind != "f" and not pixels:
        raise DataError(f"input '{spec.name}' takes {np.dtype(spec.dtype).name} values and "
                        "--data feeds float32 (images scaled to [0, 1]) or uint8 images - "
                        "export the model with a float input (the cast and scaling outside "
                        "the graph), or prune it without --data (magnitude criteria)")
    if len(spec.shape) != 4:
        ds = load_arrays(source, spec.shape[1:], spec.name, labels, limit, seed)
    else:
        nhwc = is_nhwc(spec.shape)
        c, h, w = (spec.shape[3], *spec.shape[1:3]) if nhwc else spec.shape[1:]
        ds = load_dataset(DataSpec(source, c, h, w, mean=mean, std=std, resize=resize,
                                   limit=limit, seed=seed, workers=workers, labels=labels,
                                   layout="NHWC" if nhwc else "NCHW", pixels=pixels))
    if len(view.inputs) > 1:
        ds = replace(ds, x=Fed(ds.x, spec.name, constants, whole_inputs(view.inputs)))
    return _checked_labels(view, ds, view.batch_input)


def _checked_labels(view: GraphView, ds: Dataset, spec) -> Dataset:
    """`ds`, whose labels (where it has them) fit the model's first output."""
    if not ds.labelled:
        return ds
    out_shape = check_class_scores(view)
    rows = view.probe_feeds[spec.name].shape[0]
    if out_shape[0] != rows:   # a graph that mixes its batch (kept fixed: model.normalize)
        raise DataError(f"output '{view.output_names[0]}' has {out_shape[0]} rows for a batch "
                        f"of {rows} images, so its classes cannot be matched to images - "
                        "prune this model without --data")
    check_labels(ds, int(out_shape[1]))
    classes = ds.num_classes
    if out_shape[1] != classes:
        # another output holding exactly one score per class is the likelier logits
        match = [n for n in view.output_names[1:]
                 if (s := view.shape(n)) is not None and len(s) == 2 and s[1] == classes]
        if match:
            raise DataError(f"the model's first output '{view.output_names[0]}' has "
                            f"{out_shape[1]} values and its output '{match[0]}' {classes}, "
                            f"one per class of the data - gpp-onnx reads the first output "
                            "as the class scores: export the model with the class scores "
                            "first")
    return ds


def check_class_scores(view: GraphView) -> tuple:
    """The first output's shape as (N, classes), refused unless it is (N, classes) or a
    conv classifier's (N, classes, 1, 1) (SqueezeNet, the model zoo's caffe2 classics),
    read as its (N, classes) scores (``class_scores``): labels index its classes."""
    out_shape = view.shape(view.output_names[0])
    if out_shape is not None and len(out_shape) > 2 and all(d == 1 for d in out_shape[2:]):
        return tuple(out_shape[:2])
    if out_shape is None or len(out_shape) != 2:
        scores = [n for n in view.output_names[1:]
                  if (s := view.shape(n)) is not None and len(s) == 2]
        if scores:
            raise DataError(f"the model's first output '{view.output_names[0]}' has shape "
                            f"{out_shape} and its output '{scores[0]}' "
                            f"{view.shape(scores[0])} - gpp-onnx reads the first output as "
                            "the class scores: export the model with the class scores first")
        shown = out_shape if out_shape is None or not view.dynamic_batch else \
            "(N, " + ", ".join(map(str, out_shape[1:])) + ")"
        raise DataError(f"output '{view.output_names[0]}' has shape {shown}; a classifier "
                        "gives (N, classes) - pass a classification model; other models "
                        "work without labels (prune --no-labels, compare A B --data)")
    return out_shape


def class_scores(logits):
    """(N, classes) scores of a classifier's first output: a conv classifier's (N, classes,
    1, 1) flattened (``check_class_scores`` admits no other extra axes); numpy or torch."""
    return logits.reshape(logits.shape[0], -1) if logits.ndim > 2 else logits


EVAL_BYTES = 512 << 20   # about what one evaluation batch may hold, activations included
ACTIVATION_FACTOR = 16   # activations per image against its input (resnet18, 224 px: ~10x)


def eval_batch_size(image_shape, batch_size: int = 256) -> int:
    """`batch_size`, made smaller for large images: onnxruntime holds a batch's live
    activations at once, and a CNN's run to about 10x its input (resnet18 at 224 px: 6.1
    MB per image), so a batch of 256 such images took 1.5 GB. At most 256 28-px images,
    55 at 224 px (3 channels)."""
    per_image = 4 * int(np.prod(image_shape)) * ACTIVATION_FACTOR
    return max(1, min(batch_size, EVAL_BYTES // max(per_image, 1)))


def accuracy(model: onnx.ModelProto, ds: Dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy of `model` on `ds` (labelled) through onnxruntime, in batches of at
    most `batch_size` (``eval_batch_size``); in a distributed run each process counts its
    contiguous share of `ds` and the counts are summed (every rank returns the same
    figure)."""
    if not ds.labelled:
        raise DataError(f"{ds.source}: accuracy needs labels and the data has none - compare "
                        "the model with its original instead (gpp-onnx compare A B --data ...)")
    i, k = distributed.part()
    total = len(ds)
    if k > 1:
        ds = ds.subset(np.arange(total * i // k, total * (i + 1) // k))
    session = make_session(model, "model under evaluation")
    first = row_input(session.get_inputs(), ds.x)
    name, fixed_batch = first.name, first.shape[0]
    if isinstance(fixed_batch, int) and fixed_batch > 0:
        batch_size = fixed_batch
    else:
        batch_size = eval_batch_size(np.shape(ds.x)[1:], batch_size)
    correct = 0
    for x, y in iter_batches(ds, batch_size):
        if rows(x) != batch_size and isinstance(fixed_batch, int):
            x = padded(x, batch_size)
        logits = outputs(session, feeds(x, name))[0][: len(y)]
        if not np.all(np.isfinite(logits)):
            raise DataError("the model produced NaN/inf outputs on the data - check the "
                            "input scaling (--mean/--std)")
        correct += int((class_scores(logits).argmax(axis=1) == y).sum())
    return distributed.all_sum(correct) / total
