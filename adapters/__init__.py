"""Framework -> ONNX exporter adapters."""
