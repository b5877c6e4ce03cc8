"""`python -m gpp_onnx` is the `gpp-onnx` command."""
import sys

from .cli import main

sys.exit(main())
