"""graphopt operators: a rewrite with no ATen equivalent becomes `torch.ops.graphopt.<name>`.

An operator is four parts kept together, and `graphopt_op` refuses one without all four:
  reference  the PyTorch implementation (the decorated function; it defines the semantics),
  fake       shape/dtype propagation for torch.export,
  onnx       an onnxscript function, used by torch.onnx's `custom_translation_table`,
  relax      a converter for TVM's `from_exported_program(custom_convert_map=...)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass(frozen=True)
class GraphoptOp:
    name: str
    overload: torch._ops.OpOverload      # torch.ops.graphopt.<name>.default
    onnx: Callable
    relax: Callable


_OPS: dict[str, GraphoptOp] = {}


def graphopt_op(name: str, *, fake: Callable, onnx: Callable, relax: Callable,
                mutates_args: Sequence[str] = ()) -> Callable:
    """Decorator over the reference implementation: registers graphopt::<name> with its four parts."""
    if not all(callable(part) for part in (fake, onnx, relax)):
        raise TypeError(f"graphopt op {name!r} needs all four parts: reference, fake, onnx, relax")

    def wrap(reference: Callable):
        op = torch.library.custom_op(f"graphopt::{name}", mutates_args=tuple(mutates_args))(reference)
        op.register_fake(fake)
        _OPS[name] = GraphoptOp(name, getattr(torch.ops.graphopt, name).default, onnx, relax)
        return op
    return wrap


def registered() -> dict[str, GraphoptOp]:
    return dict(_OPS)


def onnx_translation_table() -> dict:
    """For torch.onnx.export(custom_translation_table=...)."""
    return {op.overload: op.onnx for op in _OPS.values()}
