"""gpp-onnx: Grow-Push-Prune structural pruning for ONNX CNN classifiers."""
from .config import DataOptions, PruneConfig, TrainOptions
from .errors import GppError, InputError, UnsupportedModelError, VerificationError
from .grow import GrowConfig, GrowResult, grow
from .importance import register_criterion
from .pipeline import analyze, compare, profile, prune
from .push_prune import gpp, push
from .schedule import GppOptions
from .plan import PrunePlan
from .stepwise import StepPruner

__version__ = "0.1.0"

__all__ = ["DataOptions", "GppError", "GppOptions", "GrowConfig", "GrowResult", "InputError",
           "PruneConfig", "PrunePlan", "StepPruner", "TrainOptions", "UnsupportedModelError",
           "VerificationError", "analyze", "compare", "gpp", "grow", "profile", "prune", "push",
           "register_criterion", "__version__"]
