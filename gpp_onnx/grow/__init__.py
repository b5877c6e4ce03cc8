"""Grow: Inception modules inserted into a CNN without changing what it computes
(METHOD 5). ``host``: where a module can go and how the consumers take its extra
channels; ``module``: the module and its function-preserving start; ``loop``: add,
train, keep while validation accuracy gains; ``phase``: that loop as the grow phase of
``gpp --grow``."""
from .host import NotGrowable, Position, auto_positions, position
from .module import Module, Widths, insert_module
from .loop import GrowConfig, ModuleRow
from .api import GrowResult, grow

__all__ = ["GrowConfig", "GrowResult", "Module", "ModuleRow", "NotGrowable", "Position",
           "Widths", "auto_positions", "grow", "insert_module", "position"]
