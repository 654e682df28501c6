"""Code generation: the optimized IR lowered to a backend's input format."""
from .onnx import to_onnx
from .relax import to_relax

__all__ = ["to_onnx", "to_relax"]
