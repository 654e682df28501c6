"""Sparsity already in the weights: what each layer holds, and which units of a group are provably inert.

A unit is inert, and removing it changes no output, when either
  - every reader ignores it: all consumers' weights for its channels are zero (whatever flows there is
    multiplied by zero; channels do not mix on the way, so nothing else sees it), or
  - it is zero everywhere: every producer's weights and bias for it are zero, every op on the way maps
    0 to 0, and the constants added to it and the depthwise biases on the way are zero there."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ...ir import Graph, conv_args, linear_args
from ..quant.layers import layer_name
from .groups import CONV, LINEAR, Group


@dataclass(frozen=True)
class LayerSparsity:
    name: str
    density: float            # nonzero weights / weights
    zero_rows: int            # output channels whose weights are all zero
    zero_cols: int            # input channels no output reads
    block_density: float      # nonzero (bh × bw) blocks / blocks (1.0 where the shape does not tile)
    nm_fraction: float        # fraction of groups of M along the input axis with at most N nonzeros

    def line(self, block, nm) -> str:
        return (f"{self.name}: density {self.density:.1%}, {self.zero_rows} zero output / {self.zero_cols} zero "
                f"input channels, {block[0]}×{block[1]} block density {self.block_density:.1%}, "
                f"{nm[0]}:{nm[1]} groups {self.nm_fraction:.0%}")


def layer_sparsity(graph: Graph, n: fx.Node, block=(32, 32), nm=(2, 4)) -> LayerSparsity:
    w = graph.constant(n.args[1]).detach()
    w2 = w.reshape(w.shape[0], w.shape[1], -1)                       # [out, in, k]
    nz = w2 != 0
    out_f, in_f = w2.shape[:2]
    if nz.all():    # dense, as nearly every layer is: its figures without the passes below (10 s of a 0.77 B Llama)
        return LayerSparsity(layer_name(n), 1.0, 0, 0, 1.0, 0.0)
    bh, bw = block
    blocks = 1.0
    if n.target is LINEAR and out_f % bh == 0 and in_f % bw == 0:
        blocks = nz[..., 0].reshape(out_f // bh, bh, in_f // bw, bw).any(3).any(1).float().mean().item()
    N, M = nm
    fits = 0.0
    if in_f % M == 0:
        fits = (nz.reshape(out_f, in_f // M, M, -1).sum(2) <= N).float().mean().item()
    return LayerSparsity(layer_name(n), nz.float().mean().item(), int((~nz.any(2).any(1)).sum()),
                         int((~nz.any(2).any(0)).sum()), blocks, fits)


def layers(graph: Graph) -> list[fx.Node]:
    """Convs and linears with constant weights."""
    return [n for n in graph.ops() if n.target in (CONV, LINEAR) and graph.is_constant(n.args[1])]


def inert_units(graph: Graph, group: Group) -> list[int]:
    """The units of `group` whose removal changes no output."""
    ignored = torch.ones(group.size, dtype=torch.bool)
    for n in group.consumers:
        w = graph.constant(n.args[1])
        ignored &= ~(w.reshape(w.shape[0], w.shape[1], -1) != 0).any(2).any(0)
    zero = torch.zeros(group.size, dtype=torch.bool)
    if group.zero_preserving:
        zero = torch.ones(group.size, dtype=torch.bool)
        for n in group.producers:
            a = conv_args(n) if n.target is CONV else linear_args(n)
            w = graph.constant(a.weight)
            zero &= ~(w.reshape(w.shape[0], -1) != 0).any(1)
            if a.bias is not None:
                zero &= graph.constant(a.bias) == 0
        for n in group.depthwise:
            if conv_args(n).bias is not None:
                zero &= graph.constant(conv_args(n).bias) == 0
        for n, i, axis, kind in group.constants:
            if kind == "add":
                c = graph.constant(n.args[i]).movedim(axis, 0).reshape(group.size, -1)
                zero &= ~(c != 0).any(1)
    dead = (ignored | zero).reshape(group.units, group.unit).all(1)
    return [int(u) for u in torch.nonzero(dead).reshape(-1)]
