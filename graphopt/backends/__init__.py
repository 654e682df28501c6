"""Backends: build an executable for a target from the optimized IR, and run it."""
from .base import Backend, BuildInputs, Executable, get_backend

__all__ = ["Backend", "BuildInputs", "Executable", "get_backend"]
