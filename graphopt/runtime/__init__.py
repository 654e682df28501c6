"""Executables made of executables: separately compiled segments run by a host dispatcher (early exit; the
branches of torch.cond), and the bundle a user ships them in (ONNX segments + manifest.json; `graphopt.load` runs it without
the model)."""
from .build import build_early_exit
from .control import HostProgram, has_cond, lower_conds
from .bundle import LoadedModule, export_bundle, load
from .dispatch import EarlyExitExecutable

__all__ = ["EarlyExitExecutable", "HostProgram", "has_cond", "lower_conds", "LoadedModule", "build_early_exit", "export_bundle", "load"]
