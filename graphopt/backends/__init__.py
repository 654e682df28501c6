"""Backends: build an executable for a target from the optimized IR, and run it."""
from ..errors import InputError
from .auto import AutoBackend
from .base import Backend, BuildInputs, Executable
from .ort import OrtBackend
from .tvm import TvmBackend

BACKENDS: dict[str, type] = {"ort": OrtBackend, "tvm": TvmBackend, "auto": AutoBackend}


def get_backend(name: str | None, target) -> Backend:
    """The backend `name`, or the target's default (the measured choice, "auto", where it can be made)."""
    name = target.default_backend if name is None else name
    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    return BACKENDS[name]()


__all__ = ["AutoBackend", "BACKENDS", "Backend", "BuildInputs", "Executable", "OrtBackend", "TvmBackend", "get_backend"]
