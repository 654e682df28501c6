"""A stable, readable text form of the IR: one line per op, weights inline as @name."""
from __future__ import annotations

import torch
import torch.fx as fx

from .graph import Graph, op_name   # text depends on the graph, never the other way

_DTYPES = {
    torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
    torch.bool: "b8", torch.complex64: "c64",
}


def type_str(node: fx.Node) -> str:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return f"{_DTYPES.get(val.dtype, str(val.dtype))}[{','.join(str(d) for d in val.shape)}]"
    if isinstance(val, (tuple, list)):
        return "(" + ", ".join(type_str_of(v) for v in val) + ")"
    return type(val).__name__ if val is not None else "?"


def type_str_of(val) -> str:
    if isinstance(val, torch.Tensor):
        return f"{_DTYPES.get(val.dtype, str(val.dtype))}[{','.join(str(d) for d in val.shape)}]"
    return type(val).__name__


def _arg(a) -> str:
    if isinstance(a, fx.Node):
        return f"@{a.target}" if a.op == "get_attr" else f"%{a.name}"
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_arg(x) for x in a)
        return f"[{inner}]"
    if isinstance(a, torch.dtype):
        return _DTYPES.get(a, str(a))
    if isinstance(a, float):
        return f"{a:.6g}"
    return str(a)


def node_line(node: fx.Node) -> str:
    args = [_arg(a) for a in node.args] + [f"{k}={_arg(v)}" for k, v in node.kwargs.items()]
    return f"%{node.name} = {op_name(node)}({', '.join(args)}) : {type_str(node)}"


def graph_text(graph: Graph) -> str:
    ins = ", ".join(f"%{n.name}: {type_str(n)}" for n in graph.inputs)
    lines = [f"graph({ins}) {{"]
    for n in graph.fx.nodes:
        if n.op == "call_function":
            lines.append("  " + node_line(n))
        elif n.op == "call_module":
            lines.append(f"  %{n.name} = module {n.target}({', '.join(_arg(a) for a in n.args)})")
    (out,) = graph.fx.find_nodes(op="output")
    lines.append(f"  return {_arg(out.args[0])}")
    lines.append("}")
    weights = [graph.constant(n) for n in graph.fx.find_nodes(op="get_attr")]
    weights = [w for w in weights if isinstance(w, torch.Tensor)]
    lines.append(f"# {len(weights)} weights, {sum(w.numel() for w in weights):,} elements")
    return "\n".join(lines) + "\n"
