"""graphopt operators: a rewrite with no ATen equivalent becomes `torch.ops.graphopt.<name>`.

An operator is four parts kept together, and `graphopt_op` refuses one without all four:
  reference  the PyTorch implementation (the decorated function; it defines the semantics),
  fake       shape/dtype propagation for torch.export,
  onnx       an onnxscript function, used by torch.onnx's `custom_translation_table`,
  relax      a converter for TVM's `from_exported_program(custom_convert_map=...)` (see relax_convert_map
             for what else it may ask for).
"""
from __future__ import annotations

from dataclasses import dataclass
import inspect
from functools import cache, partial
from typing import Callable, Sequence

import onnx
import torch
from onnxscript.values import Op, Opset


@dataclass(frozen=True)
class GraphoptOp:
    name: str
    overload: torch._ops.OpOverload      # torch.ops.graphopt.<name>.default
    onnx: Callable
    relax: Callable
    onnx_opset: int | None = None        # the opset its ONNX translation needs, where newer than the exporter's default


_OPS: dict[str, GraphoptOp] = {}


def graphopt_op(name: str, *, fake: Callable, onnx: Callable, relax: Callable,
                mutates_args: Sequence[str] = (), onnx_opset: int | None = None) -> Callable:
    """Decorator over the reference implementation: registers graphopt::<name> with its four parts."""
    if not all(callable(part) for part in (fake, onnx, relax)):
        raise TypeError(f"graphopt op {name!r} needs all four parts: reference, fake, onnx, relax")

    def wrap(reference: Callable):
        op = torch.library.custom_op(f"graphopt::{name}", mutates_args=tuple(mutates_args))(reference)
        op.register_fake(fake)
        _OPS[name] = GraphoptOp(name, getattr(torch.ops.graphopt, name).default, onnx, relax, onnx_opset)
        return op
    return wrap


def unregister(name: str) -> None:
    """Remove graphopt::<name> from graphopt and torch (for ops a test registers for its own duration)."""
    from torch._library.custom_ops import OPDEF_TO_LIB
    _OPS.pop(name, None)
    lib = OPDEF_TO_LIB.pop(f"graphopt::{name}", None)
    if lib is not None:
        lib._destroy()


def registered() -> dict[str, GraphoptOp]:
    return dict(_OPS)


@cache
def contrib_op(name: str) -> Op:
    """An ONNX Runtime contrib op (domain com.microsoft) for an onnxscript translation.

    The onnx package has no schemas for contrib ops and onnxscript needs one to trace a call, so
    the schema ONNX Runtime itself registers is copied into onnx's registry, once per op, with its
    optional outputs left off (graphopt's lowerings never read them)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as C
    found = [s for s in C.get_all_operator_schema() if s.name == name and s.domain == MICROSOFT]
    if not found:
        raise ValueError(f"onnxruntime has no contrib op {name!r}")
    ort_schema = max(found, key=lambda s: s.since_version)
    if not onnx.defs.has(name, MICROSOFT):
        onnx.defs.register_schema(_to_onnx_schema(ort_schema))
    return Op(Opset(MICROSOFT, 1), name)


MICROSOFT = "com.microsoft"


def _to_onnx_schema(s) -> onnx.defs.OpSchema:
    Param, Opt = onnx.defs.OpSchema.FormalParameter, onnx.defs.OpSchema.FormalParameterOption
    option = {0: Opt.Single, 1: Opt.Optional, 2: Opt.Variadic}

    def params(ps):
        return [Param(p.name, p.typeStr, param_option=option[int(p.option)]) for p in ps]
    attrs = [onnx.defs.OpSchema.Attribute(n, onnx.defs.OpSchema.AttrType(int(a.type)), "", required=a.required)
             for n, a in s.attributes.items()]
    types = [(t.type_param_str, list(t.allowed_type_strs), "") for t in s.type_constraints]
    required_outputs = [p for p in s.outputs if int(p.option) == 0]  # the exporter creates one value per output
    return onnx.defs.OpSchema(s.name, s.domain, s.since_version, inputs=params(s.inputs),
                              outputs=params(required_outputs),
                              type_constraints=types, attributes=attrs)


def onnx_translation_table() -> dict:
    """For torch.onnx.export(custom_translation_table=...)."""
    return {op.overload: op.onnx for op in _OPS.values()}


def onnx_opset(targets) -> int | None:
    """The ONNX opset a graph calling `targets` must be exported at: the newest any of its graphopt ops needs,
    or None (the exporter's default)."""
    return max((op.onnx_opset for op in _OPS.values() if op.onnx_opset and op.overload in targets), default=None)


def relax_convert_map(target="cpu", constant: Callable[[str], torch.Tensor | None] = lambda name: None) -> dict:
    """For tvm.relax.frontend.torch.from_exported_program(custom_convert_map=...), which looks
    converters up by the op's `__name__` ("attention.default") and calls them as f(node, importer).
    Converters may also take `target` (the graphopt Target the module is built for, or its name) and
    `constant` (an input placeholder's name → its tensor when it is a weight or constant, else None)."""
    from ..targets import get_target
    given = {"target": get_target(target), "constant": constant}
    converters = {}
    for op in _OPS.values():
        wanted = {k: v for k, v in given.items() if k in inspect.signature(op.relax).parameters}
        converters[op.overload.__name__] = partial(op.relax, **wanted) if wanted else op.relax
    return converters
