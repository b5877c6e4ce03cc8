"""Exception tree of gpp-onnx: every user-facing failure is a GppError with a one-line message naming the problem and the fix."""


class GppError(Exception):
    """Base class: the CLI prints str(err) on one line and exits with code 2."""


class InputError(GppError):
    """The model file or an argument cannot be used as given."""


class UnsupportedModelError(GppError):
    """The model uses something gpp-onnx cannot handle (quantized ops, control flow, ...)."""


class DataError(GppError):
    """Labelled data is missing, malformed or does not match the model."""


class VerificationError(GppError):
    """A produced model failed a check; nothing was written."""
