"""Training: one loop (``Trainer``) and loss objects (``CrossEntropy``, ``PushLoss``).

Importing this package imports torch; the rest of gpp-onnx imports it only when training.
"""
from .losses import CrossEntropy, PushLoss
from .trainer import Tapped, Trainer

__all__ = ["CrossEntropy", "PushLoss", "Tapped", "Trainer"]
