"""No-op removal: ops that return their input unchanged (for every input the graph accepts).

Each rule maps an op to a check returning the input the node is an identity of, or None. Shape
comparisons are syntactic on symbolic dims, so a dynamic graph is never specialised."""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import guard_or_false

from ...ir import Graph, op_name, same_shape, tensor_meta
from ..base import Pass, PassContext, PassResult, register

aten = torch.ops.aten
Rule = Callable[[fx.Node], "fx.Node | None"]


def _input(node: fx.Node) -> fx.Node | None:
    x = node.args[0]
    return x if isinstance(x, fx.Node) and tensor_meta(x) is not None else None


def _same_value_type(node: fx.Node) -> fx.Node | None:
    """The input, when the node's output has its exact shape and dtype."""
    x = _input(node)
    if x is None or tensor_meta(node) is None:
        return None
    return x if same_shape(x, node) and tensor_meta(x).dtype == tensor_meta(node).dtype else None


def _copy(node):          # clone / alias / lift_fresh_copy of an already contiguous tensor
    # Values alone would allow dropping any copy, but torch.export's reshape→view decomposition
    # (used again by the ONNX exporter) depends on the contiguity a copy establishes.
    x = _same_value_type(node)
    return x if x is not None and guard_or_false(tensor_meta(x).is_contiguous()) else None


def _dropout(node):       # dropout in eval (train=False) or with p=0
    p, train = (list(node.args[1:3]) + [node.kwargs.get("p", 0.5), node.kwargs.get("train", True)])[:2]
    return _input(node) if (not train or p == 0) else None


def _to_same_dtype(node):  # _to_copy without a dtype/device/layout change
    if set(node.kwargs) - {"dtype", "memory_format", "layout", "device"}:
        return None
    x = _same_value_type(node)
    dev = node.kwargs.get("device")
    return x if x is not None and (dev is None or tensor_meta(x).device == dev) else None


def _permute(node):       # permute by the identity permutation
    dims = list(node.args[1])
    return _input(node) if dims == sorted(dims) and (not dims or dims[0] >= 0) else None


def _slice(node):         # a step-1 slice that keeps every element
    step = node.args[4] if len(node.args) > 4 else 1
    return _same_value_type(node) if step == 1 else None


def _arith_identity(neutral: float) -> Rule:   # x + 0, x - 0, x * 1, x / 1 with a scalar
    def rule(node):
        other = node.args[1]
        if isinstance(other, (int, float)) and not isinstance(other, bool) and other == neutral \
                and node.kwargs.get("alpha", 1) == 1:
            return _same_value_type(node)
        return None
    return rule


def _metadata_holds(node: fx.Node) -> bool:
    """export's `_assert_tensor_metadata(x, size, stride, dtype, ...)` holds for every input when the
    IR's own type of x already says so (only dtype/device/layout checks are judged)."""
    x = tensor_meta(node.args[0])
    size, stride, dtype = (list(node.args[1:4]) + [None, None, None])[:3]
    dtype = node.kwargs.get("dtype", dtype)
    device, layout = node.kwargs.get("device"), node.kwargs.get("layout")
    return (x is not None and size is None and stride is None and (dtype is None or dtype == x.dtype)
            and (device is None or device == x.device) and (layout is None or layout == x.layout))


RULES: dict[object, Rule] = {
    aten.clone.default: _copy,
    aten.alias.default: _copy,
    aten.lift_fresh_copy.default: _copy,
    aten.dropout.default: _dropout,
    aten._to_copy.default: _to_same_dtype,
    aten.reshape.default: _same_value_type,   # capture turned views into reshapes
    aten.expand.default: _same_value_type,
    aten.permute.default: _permute,
    aten.slice.Tensor: _slice,
    aten.add.Scalar: _arith_identity(0), aten.add.Tensor: _arith_identity(0),
    aten.sub.Scalar: _arith_identity(0), aten.sub.Tensor: _arith_identity(0),
    aten.mul.Scalar: _arith_identity(1), aten.mul.Tensor: _arith_identity(1),
    aten.div.Scalar: _arith_identity(1), aten.div.Tensor: _arith_identity(1),
}


@register
class RemoveNoops(Pass):
    name = "remove_noops"
    phase = "canonicalize"
    summary = "remove identity ops: same-shape reshapes/expands/slices, copies, eval dropout, same-dtype casts"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        for node in list(graph.ops()):
            if node.target is aten._assert_tensor_metadata.default and _metadata_holds(node):
                result.did(f"removed %{node.name} (metadata assert on %{node.args[0].name}): true by the IR's types")
                graph.fx.erase_node(node)
                continue
            rule = RULES.get(node.target)
            source = rule(node) if rule else None
            if source is None:
                continue
            node.replace_all_uses_with(source)
            graph.fx.erase_node(node)
            result.did(f"removed %{node.name} ({op_name(node)}): identity of %{source.name}")
        return result
