"""gpp-onnx: Grow-Push-Prune structural pruning for ONNX CNN classifiers."""
from .config import PruneConfig
from .errors import GppError, InputError, UnsupportedModelError, VerificationError
from .grow import GrowConfig, GrowResult, grow
from .importance import register_criterion
from .pipeline import analyze, compare, profile, prune
from .plan import PrunePlan
from .stepwise import StepPruner

__version__ = "0.1.0"

__all__ = ["GppError", "GrowConfig", "GrowResult", "InputError", "PruneConfig", "PrunePlan",
           "StepPruner", "UnsupportedModelError", "VerificationError", "analyze", "compare",
           "grow", "profile", "prune", "register_criterion", "__version__"]
