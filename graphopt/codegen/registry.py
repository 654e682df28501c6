"""What torch.onnx's exporter redoes on every export that graphopt's exports need not: its op registry, built once
per process (`reused`), and its decompositions, skipped for a graph that has nothing left to decompose
(`already_decomposed`).

The dynamo exporter rebuilds its registry from onnxscript's torchlib on every export — parsing ~1,500 functions'
source, 0.9 s here, more than a third of lowering a tiny CNN — though it depends on nothing but the opset version.
Inside `reused()`, `ONNXRegistry.from_torchlib` returns a copy of the one built first for that opset (built without
parsing that source at all: `_from_torchlib`): the same functions in a fresh table, into which the exporter then
registers graphopt's own ops. Where torch's private
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
    try:
        return _from_torchlib(opset_version)
    except Exception:    # noqa: BLE001 - another torch or onnxscript layout: the registry as torch builds it
        return _FROM_TORCHLIB.__func__(_registration.ONNXRegistry, opset_version)


def _from_torchlib(opset_version: int):
    """The registry `ONNXRegistry.from_torchlib` builds, the same functions in the same order, without reading the
    source of each traced torchlib function: onnxscript's `get_torchlib_ops` parses it for a domain torch then drops
    (0.7 s of the 2.7 s a process's first export spent building its registry here)."""
    from onnxscript.function_libs.torch_lib import ops, registration   # noqa: F401 - importing registers them
    from torch.onnx._internal.exporter._torchlib import _torchlib_registry
    registry = _registration.ONNXRegistry()
    registry._opset_version = opset_version
    for meta in _torchlib_registry.get_torchlib_ops():
        registry._register(meta.fx_target, meta)
    for name, functions in registration.default_registry.items():
        if name.startswith("internal::"):
            continue
        for function, is_complex in [(f, False) for f in functions.overloads] + [(f, True) for f in functions.complex]:
            try:                 # as torch does: one function that fails to register does not fail the registry
                target = _registration._get_overload(name)
                if target is not None:
                    registry._register(target, _registration.OnnxDecompMeta(
                        onnx_function=function, fx_target=target, signature=None, is_complex=is_complex))
            except Exception:    # noqa: BLE001, S112
                continue
    registry._cleanup_registry_based_on_opset_version()
    return registry


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
