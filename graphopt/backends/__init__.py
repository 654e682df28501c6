"""Backends: build an executable for a target from the optimized IR, and run it."""
from ..errors import InputError
from .auto import AutoBackend
from .base import Backend, BuildInputs, Executable
from .ort import OrtBackend
from .tvm import TvmBackend

BACKENDS: dict[str, type] = {"ort": OrtBackend, "tvm": TvmBackend, "auto": AutoBackend}


def default_backend(target) -> str:
    """ONNX Runtime, except for arm64: 'auto' there ships both ONNX and TVM's library (see AutoBackend)."""
    return "auto" if target.name == "arm64" else "ort"


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    return BACKENDS[name]()


__all__ = ["AutoBackend", "BACKENDS", "Backend", "BuildInputs", "Executable", "OrtBackend", "TvmBackend", "default_backend", "get_backend"]
