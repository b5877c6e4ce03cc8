"""PyTorch -> ONNX export adapter.

``export_torch`` turns an ``nn.Module`` into one self-contained ``.onnx`` file with a
dynamic batch dimension. Two torch exporters are supported:

* ``"legacy"`` (TorchScript tracing, ``dynamo=False``): fast. In eval mode its constant
  folding fuses BatchNorm into the preceding Conv (folded tensors get ``onnx::Conv_N``
  names), and it de-duplicates byte-identical initializers: the copies become
  ``Identity`` nodes fed by one shared initializer (typical for all-zero folded biases).
  Supports opsets up to 20.
* ``"dynamo"`` (``torch.export`` + onnxscript, ``dynamo=True``): slower (seconds).
  Its optimizer also folds BatchNorm into Conv but keeps the Conv parameter names
  (``c1.weight`` then holds *folded* values) and drops an all-zero folded bias. Its
  lowest opset is 18 (lower requests are raised to 18 here), and by default it writes
  weights to an external ``<file>.data`` sidecar; we keep them inline below 2 GB.

``load_torchvision`` builds a randomly initialised torchvision model (never downloads),
working around a torchvision build whose compiled ops do not match the installed torch.
"""
from __future__ import annotations

import logging
import pathlib
import sys
import types
import warnings

import onnx
import torch

logger = logging.getLogger(__name__)

MIN_OPSET = 11
DYNAMO_MIN_OPSET = 18
try:
    from torch.onnx import _constants as _torch_onnx_constants

    LEGACY_MAX_OPSET = _torch_onnx_constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
except (ImportError, AttributeError):  # pragma: no cover - older/newer torch
    LEGACY_MAX_OPSET = 20
_PROTOBUF_LIMIT = 2 * 1024**3 - 64 * 1024**2  # keep a margin below protobuf's 2 GiB cap
_EXPORTERS = ("legacy", "dynamo")


def _check_opset(opset: int, exporter: str) -> int:
    """Validate ``opset`` for ``exporter``; return the opset actually used."""
    max_opset = onnx.defs.onnx_opset_version()
    valid_int = isinstance(opset, int) and not isinstance(opset, bool)
    if not valid_int or not MIN_OPSET <= opset <= max_opset:
        raise ValueError(f"opset must be an int in {MIN_OPSET}..{max_opset} (installed onnx), "
                         f"got {opset!r}")
    if exporter == "legacy" and opset > LEGACY_MAX_OPSET:
        raise ValueError(f"the legacy exporter supports opsets up to {LEGACY_MAX_OPSET}, got {opset}; "
                         "use exporter='dynamo' for newer opsets")
    if exporter == "dynamo" and opset < DYNAMO_MIN_OPSET:
        logger.warning("dynamo exporter has no opset %d implementations; exporting at opset %d",
                       opset, DYNAMO_MIN_OPSET)
        return DYNAMO_MIN_OPSET
    return opset


def _sample(model: torch.nn.Module, input_shape) -> torch.Tensor:
    """A deterministic random input on the model's device (global RNG untouched)."""
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d <= 0 for d in shape):
        raise ValueError(f"input_shape must be positive ints, got {input_shape!r}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=gen).to(device)


def _param_bytes(model: torch.nn.Module) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def export_torch(model: torch.nn.Module, path, input_shape=(1, 3, 224, 224), *,
                 exporter: str = "legacy", opset: int = 17, dynamic_batch: bool = True,
                 input_name: str = "input", output_name: str = "logits") -> pathlib.Path:
    """Export ``model`` (switched to eval mode, left there) to ``path``; return the path.

    The result passes ``onnx.checker.check_model``; with ``dynamic_batch`` the first
    input/output dimension is the symbolic ``"batch"``.
    """
    if exporter not in _EXPORTERS:
        raise ValueError(f"exporter must be one of {_EXPORTERS}, got {exporter!r}")
    opset = _check_opset(opset, exporter)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    args = (_sample(model, input_shape),)
    common = dict(input_names=[input_name], output_names=[output_name],
                  opset_version=opset, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        if exporter == "legacy":
            axes = {input_name: {0: "batch"}, output_name: {0: "batch"}} if dynamic_batch else None
            torch.onnx.export(model, args, str(path), dynamo=False, dynamic_axes=axes,
                              do_constant_folding=True, **common)
        else:
            external = _param_bytes(model) >= _PROTOBUF_LIMIT
            shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
            torch.onnx.export(model, args, str(path), dynamo=True, dynamic_shapes=shapes,
                              external_data=external, **common)
    onnx.checker.check_model(str(path))
    logger.info("exported %s via %s exporter (opset %d) to %s", type(model).__name__,
                exporter, opset, path)
    return path


def _import_torchvision():
    """Import torchvision; stub out its meta registrations if its C++ ops are missing."""
    try:
        import torchvision
    except RuntimeError as exc:  # e.g. "operator torchvision::nms does not exist"
        logger.info("plain torchvision import failed (%s); retrying without its meta "
                    "registrations", exc)
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        stub = "torchvision._meta_registrations"
        sys.modules[stub] = types.ModuleType(stub)
        import torchvision
    return torchvision


def load_torchvision(name: str, **kwargs) -> torch.nn.Module:
    """Build torchvision classification model ``name`` with random weights (no downloads)."""
    if kwargs.get("weights") is not None or kwargs.get("pretrained"):
        raise ValueError("load_torchvision never downloads weights; drop 'weights'/'pretrained'")
    kwargs.pop("weights", None)
    kwargs.pop("pretrained", None)
    torchvision = _import_torchvision()
    return torchvision.models.get_model(name, weights=None, **kwargs)


def sample_input_shape(name: str, batch: int = 1) -> tuple[int, int, int, int]:
    """A reasonable NCHW export shape for torchvision classifier ``name``.

    inception_v3 needs >= 75 px and is designed for 299; ViT / Swin / MaxViT are built
    for exactly 224 (the default for everything else too).
    """
    side = 299 if name.startswith("inception") else 224
    return (batch, 3, side, side)
