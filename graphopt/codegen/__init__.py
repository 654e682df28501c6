"""Code generation: the optimized IR lowered to a backend's input format."""
from .onnx import to_onnx

__all__ = ["to_onnx"]
