"""The IR as plain data, for another process of ours (a Ray worker evaluating planner candidates).

A captured Graph does not pickle: its GraphModule regenerates its code on unpickling and drops every node's
meta["val"] (the FakeTensors passes read shapes and dtypes from), and FakeTensors themselves do not pickle. `to_wire`
writes what rebuilding the same graph takes: per node its op, its target (an operator by its qualified name, a Python
function by module and name), its arguments with other nodes named, its FakeTensor as (shape, stride, dtype,
device), its module path; the weights as tensors; the input/output specs. `from_wire` rebuilds it with the same node
names, its FakeTensors made again in one fake mode of its own. Only static shapes travel: a graph with symbolic dims
(a dynamic batch) raises UnsupportedError and is evaluated where it is.

What travels is data (strings, numbers, tensors, torch dtypes); targets resolve only to torch operators and to
functions of a few standard modules, never to arbitrary code."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from ..errors import UnsupportedError
from .graph import Graph, _fetch

KEPT_META = ("nn_module_stack",)
FUNCTION_MODULES = ("operator", "_operator", "builtins", "math", "torch")


@dataclass(frozen=True)
class _Ref:          # another node, by name
    name: str


@dataclass(frozen=True)
class _Fake:         # a FakeTensor, made again on arrival
    shape: tuple
    stride: tuple
    dtype: torch.dtype
    device: str


def to_wire(graph: Graph) -> dict:
    """The graph as plain data (see the module docstring); UnsupportedError where it cannot travel."""
    nodes, weights = [], {}
    for n in graph.fx.nodes:
        if n.op not in ("placeholder", "get_attr", "call_function", "output"):
            raise UnsupportedError(f"%{n.name} is a {n.op} node: only placeholders, weights and calls travel")
        if n.op == "get_attr":
            value = _fetch(graph.module, n.target)
            if not isinstance(value, torch.Tensor):
                raise UnsupportedError(f"%{n.name} reads a {type(value).__name__}, not a tensor")
            weights[n.target] = value.detach()
        args, kwargs = fx.map_arg((n.args, n.kwargs), lambda a: _Ref(a.name))
        meta = {k: n.meta[k] for k in KEPT_META if k in n.meta}
        if "val" in n.meta:
            meta["val"] = _value(n.meta["val"], n)
        nodes.append((n.op, n.name, _target(n), args, kwargs, meta))
    return {"nodes": nodes, "weights": weights, "in_spec": graph.in_spec, "out_spec": graph.out_spec,
            "codegen": getattr(graph.fx._codegen, "pytree_info", None)}


def from_wire(data: dict) -> Graph:
    """The Graph `to_wire` wrote, with the same node names and fresh FakeTensors."""
    g, made = fx.Graph(), {}
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    for op, name, target, args, kwargs, meta in data["nodes"]:
        args, kwargs = _resolve((args, kwargs), made)
        node = g.create_node(op, _callable(target), args, kwargs, name=name)
        if node.name != name:
            raise UnsupportedError(f"node %{name} came back as %{node.name}")
        node.meta.update({k: v for k, v in meta.items() if k != "val"})
        if "val" in meta:
            node.meta["val"] = _fake(meta["val"], mode)
        made[name] = node
    if data["codegen"] is not None:
        g._codegen = fx.graph._PyTreeCodeGen(data["codegen"])
    module = fx.GraphModule(dict(data["weights"]), g)
    module._in_spec, module._out_spec = data["in_spec"], data["out_spec"]
    return Graph(module, data["in_spec"], data["out_spec"])


def _target(n: fx.Node) -> Any:
    t = n.target
    if isinstance(t, str):
        return t
    if isinstance(t, torch._ops.OpOverload):
        return ("op", t._schema.name, t._overloadname)
    module, name = getattr(t, "__module__", None), getattr(t, "__qualname__", None)
    if module is not None and name is not None and module.split(".")[0] in FUNCTION_MODULES:
        return ("fn", module, name)
    raise UnsupportedError(f"%{n.name} calls {t!r}, which has no name another process can resolve")


def _callable(target: Any) -> Any:
    if isinstance(target, str):
        return target
    kind, a, b = target
    if kind == "op":
        namespace, name = a.split("::")
        if namespace == "graphopt":
            from .. import ops  # noqa: F401  (registers graphopt's operators)
        return getattr(getattr(getattr(torch.ops, namespace), name), b or "default")
    if a.split(".")[0] not in FUNCTION_MODULES:
        raise UnsupportedError(f"a node calls {a}.{b}: only functions of {', '.join(FUNCTION_MODULES)} resolve")
    obj = importlib.import_module(a)
    for part in b.split("."):
        obj = getattr(obj, part)
    return obj


def _value(v: Any, n: fx.Node) -> Any:
    if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        raise UnsupportedError(f"%{n.name} has a symbolic value ({v}): graphs with dynamic dims stay where they are")
    if isinstance(v, torch._subclasses.FakeTensor):
        if any(not isinstance(d, int) for d in (*v.shape, *v.stride())):
            raise UnsupportedError(f"%{n.name} has a symbolic shape {tuple(v.shape)}: graphs with dynamic dims stay "
                                   "where they are")
        return _Fake(tuple(v.shape), tuple(v.stride()), v.dtype, str(v.device))
    if isinstance(v, torch.Tensor):
        return v.detach()
    if isinstance(v, (list, tuple)):
        return type(v)(_value(x, n) for x in v)
    if v is None or isinstance(v, (int, float, bool, str, torch.dtype, torch.device)):
        return v
    raise UnsupportedError(f"%{n.name}'s value is a {type(v).__name__}, which does not travel")


def _fake(v: Any, mode: FakeTensorMode) -> Any:
    if isinstance(v, _Fake):
        with mode:
            return torch.empty_strided(v.shape, v.stride, dtype=v.dtype, device=v.device)
    if isinstance(v, (list, tuple)):
        return type(v)(_fake(x, mode) for x in v)
    return v


def _resolve(tree: Any, made: dict) -> Any:
    if isinstance(tree, _Ref):
        return made[tree.name]
    if isinstance(tree, tuple):
        return tuple(_resolve(x, made) for x in tree)
    if isinstance(tree, list):
        return [_resolve(x, made) for x in tree]
    if isinstance(tree, dict):
        return {k: _resolve(x, made) for k, x in tree.items()}
    if isinstance(tree, slice):
        return slice(_resolve(tree.start, made), _resolve(tree.stop, made), _resolve(tree.step, made))
    return tree
