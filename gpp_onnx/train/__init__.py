"""Training: one loop (``Trainer``) and loss objects (``CrossEntropy``, ``PushLoss``,
``Distill``).

Importing this package imports torch; the rest of gpp-onnx imports it only when training.
"""
from .losses import CrossEntropy, Distill, PushLoss
from .trainer import Tapped, Trainer

__all__ = ["CrossEntropy", "Distill", "PushLoss", "Tapped", "Trainer"]
