"""SmoothQuant for static int8 linears: outlier input channels move into the weights."""
from __future__ import annotations

import torch
import torch.fx as fx

from ...ir import Graph
from ..calibration import observe

aten = torch.ops.aten


def smooth(graph: Graph, batches, linears: list[fx.Node], alpha: float) -> list[str]:
    """SmoothQuant: a few input channels of a transformer's linears carry outliers that a per-tensor
    activation scale cannot hold. Divide each input channel by s_j = max|x_j|^α / max|W_j|^(1−α) and
    multiply the weights' columns by it — the product is unchanged, the activation is flat enough to
    quantize. Linears reading the same tensor (q, k, v) share s."""
    groups: dict[fx.Node, list[fx.Node]] = {}
    for n in linears:
        groups.setdefault(n.args[0], []).append(n)
    x_max: dict[fx.Node, torch.Tensor] = {}

    def on_node(n, _args, out):
        if n in groups:
            m = out.detach().abs().reshape(-1, out.shape[-1]).amax(0)
            x_max[n] = torch.maximum(x_max[n], m) if n in x_max else m
    observe(graph, batches, [], on_node)
    notes = []
    for x, group in groups.items():
        if x not in x_max:
            continue
        w_max = torch.stack([graph.constant(n.args[1]).float().abs().amax(0) for n in group]).amax(0)
        s = (x_max[x].clamp(min=1e-5) ** alpha / w_max.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
        inv = graph.add_constant(1.0 / s, f"{x.name}_smooth", before=group[0])
        scaled = graph.call(aten.mul.Tensor, (x, inv), before=group[0])
        for n in group:
            w = graph.constant(n.args[1]).float() * s
            n.args = (scaled, graph.add_constant(w, f"{n.args[1].target}_smoothed", before=n), *n.args[2:])
        notes.append(f"%{x.name}: smoothed for {', '.join('%' + n.name for n in group)} "
                     f"(outlier ratio max/median {(x_max[x].max() / x_max[x].median()).item():.1f})")
    return notes
