"""Executables made of executables: separately compiled segments run by a host dispatcher (early exit),
and the bundle a user ships them in (ONNX segments + manifest.json; `graphopt.load` runs it without
the model)."""
from .build import build_early_exit
from .bundle import LoadedModule, export_bundle, load
from .dispatch import EarlyExitExecutable

__all__ = ["EarlyExitExecutable", "LoadedModule", "build_early_exit", "export_bundle", "load"]
