"""Torch backend: execute an ONNX graph as a trainable ``torch.nn.Module``.

``OnnxModule(model, device)`` runs the graph with torch ops (weights are
``nn.Parameter`` s mapped to their ONNX initializer names); ``write_back`` copies trained
values into a copy of the ONNX model; ``resolve_device`` turns 'auto' / 'cpu' / 'cuda'
into a ``torch.device``.
"""
from .module import OnnxModule, resolve_device
from .writeback import write_back
from .ops import register, registry

__all__ = ["OnnxModule", "register", "registry", "resolve_device", "write_back"]
