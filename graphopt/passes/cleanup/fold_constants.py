"""Constant folding: compute at compile time every op whose inputs are all weights or literals.

Only the frontier of each constant subgraph (values read by input-dependent ops or outputs) is
stored; a fold that would store a much larger tensor than it reads (a broadcast of a weight) is
skipped, because it trades a cheap op for memory traffic."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ...ir import Graph, op_name
from ..base import Pass, PassContext, PassResult, register

MIN_GROWTH_ALLOWED = 4096  # elements a fold may always produce, even from nothing (arange, zeros)


def _foldable(node: fx.Node) -> bool:
    if node.op != "call_function" or node.is_impure():
        return False
    if node.target is operator.getitem:
        return True
    if node.target is torch.ops.graphopt.dequantize.default:
        return False   # int8 weight + DequantizeLinear is what ORT's QDQ fusion turns into an integer kernel
    return isinstance(node.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded not in node.target.tags


@register
class FoldConstants(Pass):
    name = "fold_constants"
    phase = "canonicalize"
    summary = "evaluate ops whose inputs are all constants at compile time and store the results"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        values: dict[fx.Node, object] = {}
        for node in graph.fx.nodes:
            if node.op == "get_attr":
                values[node] = graph.constant(node)
            elif _foldable(node) and all(a in values for a in node.all_input_nodes):
                args, kwargs = fx.map_arg((node.args, node.kwargs), lambda a: values[a])
                with torch.no_grad():
                    values[node] = node.target(*args, **kwargs)

        result = PassResult()
        frontier = [n for n, v in values.items() if n.op == "call_function" and isinstance(v, torch.Tensor)
                    and any(u not in values for u in n.users)]   # interior nodes of constant subgraphs stay unstored
        reads = {n: sum(values[a].numel() for a in n.all_input_nodes if isinstance(values[a], torch.Tensor))
                 for n in frontier}
        for node in frontier:
            value, read = values[node], reads[node]
            if value.numel() > max(read, MIN_GROWTH_ALLOWED):
                result.skipped(f"%{node.name} ({op_name(node)}): would store {value.numel():,} elements "
                               f"computed from {read:,}")
                continue
            const = graph.add_constant(value.contiguous(), node.name, before=node)
            node.replace_all_uses_with(const)
            result.did(f"folded %{node.name} ({op_name(node)}) into a {tuple(value.shape)} constant")
        if result.changed:   # the folded subgraphs, now unread (the manager's DCE would keep impure ones)
            for node in reversed([n for n in values if n.op == "call_function"]):
                if not node.users:
                    graph.fx.erase_node(node)
        return result
