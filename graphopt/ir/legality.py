"""Whether a group of nodes may become one fused op, decided on the networkx view."""
from __future__ import annotations

import networkx as nx


def fusion_blocker(view: nx.DiGraph, group: list[str]) -> str | None:
    """None if `group` (in dataflow order, its last node the fused op's output) can be fused, else why.

    An inner result read outside the group would have to be computed twice. When no inner result
    escapes, no path can leave the group and come back, so the fused op cannot depend on itself:
    this one check also rules out cycles."""
    members = set(group)
    for name in group[:-1]:
        outside = [u for u in view.successors(name) if u not in members]
        if outside:
            return f"%{name} is also used by {len(outside)} node(s) outside the fusion (%{outside[0]})"
    return None
