"""torch.onnx's op registry, built once per process.

The dynamo exporter rebuilds its registry from onnxscript's torchlib on every export — parsing ~1,500 functions'
source, 0.9 s here, more than a third of lowering a tiny CNN — though it depends on nothing but the opset version.
Inside `reused()`, `ONNXRegistry.from_torchlib` returns a copy of the one built first for that opset: the same
functions in a fresh table, into which the exporter then registers graphopt's own ops. Where torch's private
exporter module differs from the one this was written against, `reused()` changes nothing."""
from __future__ import annotations

import contextlib
import functools
import threading

try:
    from torch.onnx._internal.exporter import _registration
    _FROM_TORCHLIB = _registration.ONNXRegistry.__dict__.get("from_torchlib")
except ImportError:      # another torch layout: export as torch does
    _registration, _FROM_TORCHLIB = None, None

_lock = threading.RLock()   # re-entrant: an export inside an export (a probe) patches again harmlessly


@functools.cache
def _built(opset_version: int):
    return _FROM_TORCHLIB.__func__(_registration.ONNXRegistry, opset_version)


def _copy(cls, opset_version=None):
    cached = _built(opset_version if opset_version is not None else _registration._constants.TORCHLIB_OPSET)
    registry = cls()
    registry._opset_version = cached._opset_version
    registry.functions = {target: list(metas) for target, metas in cached.functions.items()}
    return registry


@contextlib.contextmanager
def reused():
    """Exports inside take the cached registry (see the module docstring)."""
    if not isinstance(_FROM_TORCHLIB, classmethod) or not hasattr(_registration.ONNXRegistry(), "functions"):
        yield
        return
    with _lock:          # one export at a time patches; the copy it hands out is what torch would have built
        _registration.ONNXRegistry.from_torchlib = classmethod(_copy)
        try:
            yield
        finally:
            _registration.ONNXRegistry.from_torchlib = _FROM_TORCHLIB
