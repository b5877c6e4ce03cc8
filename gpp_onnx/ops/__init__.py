"""Per-op channel rules, one module per op family, one registry (`base.lookup`).

The rule modules are imported here explicitly so that the registry is complete as soon
as `gpp_onnx.ops` is imported.
"""
from . import conv, elementwise, layout, linear, norm, recurrent, route  # noqa: F401  (registration)
from .base import (ROLE_CHAN, ROLE_IN, ROLE_OUT, AnalysisContext, NodeChannels, OpRule,
                   ParamSlice, Tie, lookup, registered_ops)

__all__ = ["ROLE_CHAN", "ROLE_IN", "ROLE_OUT", "AnalysisContext", "NodeChannels", "OpRule",
           "ParamSlice", "Tie", "lookup", "registered_ops"]
