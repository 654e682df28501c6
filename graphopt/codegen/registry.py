"""What torch.onnx's exporter redoes on every export that graphopt's exports need not: its op registry, built once
per process (`reused`), and its decompositions, skipped for a graph that has nothing left to decompose
(`already_decomposed`).

The dynamo exporter rebuilds its registry from onnxscript's torchlib on every export — parsing ~1,500 functions'
source, 0.9 s here, more than a third of lowering a tiny CNN — though it depends on nothing but the opset version.
Inside `reused()`, `ONNXRegistry.from_torchlib` returns a copy of the one built first for that opset: the same
functions in a fresh table, into which the exporter then registers graphopt's own ops. Where torch's private
exporter module differs from the one this was written against, `reused()` changes nothing."""
from __future__ import annotations

import contextlib
import functools
import threading

import torch

try:
    from torch.onnx._internal.exporter import _registration
    _FROM_TORCHLIB = _registration.ONNXRegistry.__dict__.get("from_torchlib")
except ImportError:      # another torch layout: export as torch does
    _registration, _FROM_TORCHLIB = None, None
try:
    from torch.onnx._internal.exporter import _decomp, _fx_passes
    _DECOMPOSE = _fx_passes.decompose_with_registry
except (ImportError, AttributeError):
    _decomp, _fx_passes, _DECOMPOSE = None, None, None

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


@functools.cache
def _table(implemented: frozenset):
    return _decomp.create_onnx_friendly_decomposition_table(set(implemented))


def _decompose_if_needed(program, registry):
    """torch.onnx's decomposition step, only where the program has an op its table decomposes."""
    table = _table(frozenset(_decomp.get_onnx_implemented_overloads(registry)))
    if any(n.op == "call_function" and n.target in table for gm in program.graph_module.modules()
           if isinstance(gm, torch.fx.GraphModule) for n in gm.graph.nodes):
        return _DECOMPOSE(program, registry)
    return program


@contextlib.contextmanager
def already_decomposed():
    """Exports inside skip torch.onnx's decompositions where no op of the program is in its table. The exporter
    re-runs them on every program (run_decompositions retraces the whole graph: 2.8 s of BERT-base's 19 s compile),
    for ops ONNX lacks; graphopt's captured graph was decomposed by capture, so there is nothing left to do. For
    graphopt's IR graphs only: a module straight from the user still needs torch's functionalization."""
    if _DECOMPOSE is None or not hasattr(_decomp, "create_onnx_friendly_decomposition_table"):
        yield
        return
    with _lock:
        _fx_passes.decompose_with_registry = _decompose_if_needed
        try:
            yield
        finally:
            _fx_passes.decompose_with_registry = _DECOMPOSE
