"""Executables made of executables: separately compiled segments run by a host dispatcher (early exit; the
branches of torch.cond; ONNX Runtime segments around TVM kernels). What a user ships is in graphopt.package."""
from .build import build_early_exit
from .control import HostProgram, has_cond, lower_conds
from .dispatch import EarlyExitExecutable
from .program import build_program

__all__ = ["EarlyExitExecutable", "HostProgram", "build_early_exit", "build_program", "has_cond", "lower_conds"]
