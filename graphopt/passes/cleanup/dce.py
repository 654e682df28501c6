"""Dead-code elimination: drop nodes (and weights) whose results reach no output."""
from __future__ import annotations

from ...ir import Graph, op_name
from ..base import Pass, PassContext, PassResult, register


@register
class DeadCodeElimination(Pass):
    name = "dce"
    phase = "cleanup"
    summary = "remove nodes and weights whose results no output uses"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        before = {n.name: op_name(n) for n in graph.ops()}
        graph.eliminate_dead_code()   # keeps side-effecting nodes (asserts, in-place ops)
        graph.tidy()                  # and the weights only they read
        after = {n.name for n in graph.ops()}
        result = PassResult()
        for name, op in before.items():
            if name not in after:
                result.did(f"removed %{name} ({op}): result unused")
        return result
