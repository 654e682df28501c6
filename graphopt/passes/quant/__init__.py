"""Quantization lowering: int8 static/dynamic and int4 layers, and the mixed-precision planner."""
from . import plan, quantize  # noqa: F401
