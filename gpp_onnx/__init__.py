"""gpp-onnx: Grow-Push-Prune structural pruning for ONNX CNN classifiers."""
from .config import PruneConfig
from .errors import GppError, InputError, UnsupportedModelError, VerificationError
from .pipeline import analyze, compare, prune
from .plan import PrunePlan

__version__ = "0.1.0"

__all__ = ["GppError", "InputError", "PruneConfig", "PrunePlan", "UnsupportedModelError",
           "VerificationError", "analyze", "compare", "prune", "__version__"]
