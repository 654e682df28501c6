"""Dependency groups: the channels that must be removed together, found from the graph.

One walk in topological order gives every tensor with a channel axis a *space* (union-find). A conv or
linear starts a new space for its output (it is the space's producer) and ends the one it reads (a
consumer: its weight's input axis). Ops that carry channels through one to one join their operands'
spaces: activations, pads and pools, depthwise convs (their weight and bias sliced too), adds and
multiplies of two spaces (so residual-coupled channels stay consistent across the add), constants
broadcast along the channel axis (sliced), and graphopt::attention, which ties q, k, v and its output
together in units of one head. Anything else that reads a space — a layer norm over the channels, a
concat, a graph output — blocks the group, and the reason is kept for the dumps."""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ...ir import Graph, conv_args, linear_args, op_name, tensor_meta
from ..quant.layers import layer_name

aten = torch.ops.aten
CONV, LINEAR = aten.convolution.default, aten.linear.default
ATTENTION = torch.ops.graphopt.attention.default

# elementwise ops carrying channels one to one → whether f(0) == 0 (a zero channel stays zero)
UNARY = {aten.relu.default: True, aten.gelu.default: True, aten.silu.default: True, aten.tanh.default: True,
         aten.hardswish.default: True, aten.leaky_relu.default: True, aten.elu.default: True,
         aten.sigmoid.default: False, aten.hardsigmoid.default: False, aten.clone.default: True,
         aten.alias.default: True, aten.dropout.default: True, aten.neg.default: True}
POOLS = (aten.max_pool2d_with_indices.default, aten.max_pool2d.default, aten.avg_pool2d.default,
         aten.adaptive_avg_pool2d.default, aten._adaptive_avg_pool2d.default)
REDUCE = (aten.mean.dim, aten.sum.dim_IntList, aten.amax.default)
RESHAPE = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)
BINARY = {aten.add.Tensor: "add", aten.sub.Tensor: "add", aten.mul.Tensor: "mul", aten.div.Tensor: "div"}


@dataclass
class Group:
    """Channels removed together. Removing unit u drops channels [u·unit, (u+1)·unit) everywhere below."""
    size: int
    unit: int = 1                                                         # an attention head's width, else 1
    producers: list[fx.Node] = field(default_factory=list)               # weight axis 0 (+ bias)
    consumers: list[fx.Node] = field(default_factory=list)               # weight axis 1
    depthwise: list[fx.Node] = field(default_factory=list)               # weight axis 0, bias, groups
    constants: list[tuple[fx.Node, int, int, str]] = field(default_factory=list)   # (node, arg, axis, op kind)
    attention: list[fx.Node] = field(default_factory=list)               # num_heads shrinks
    reshapes: list[tuple[fx.Node, int]] = field(default_factory=list)    # (node, dim of the shape argument)
    blocked: list[str] = field(default_factory=list)
    zero_preserving: bool = True      # every op between producers and consumers maps 0 to 0
    key: str = ""                     # unique among the graph's groups (prune.keyed): what plans name it by

    @property
    def units(self) -> int:
        return self.size // self.unit

    @property
    def kind(self) -> str:
        return "heads" if self.attention else "channels"

    @property
    def name(self) -> str:
        where = layer_name((self.producers or self.consumers)[0])
        return f"{where.rsplit('.', 1)[0] if self.attention else where} ({self.units} {self.kind})"

    @property
    def prunable(self) -> bool:
        return not self.blocked and bool(self.producers) and bool(self.consumers)

    def channels(self, units) -> torch.Tensor:
        """Channel indices of the given units, in order."""
        units = torch.as_tensor(units, dtype=torch.int64).reshape(-1, 1)
        return (units * self.unit + torch.arange(self.unit)).reshape(-1)


def find_groups(graph: Graph) -> list[Group]:
    """Every dependency group of the graph (prunable or not: `group.blocked` says why not)."""
    return _Walk(graph).run()


class _Walk:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.parent: list[int] = []
        self.groups: list[Group] = []
        self.axis: dict[fx.Node, tuple[int, int]] = {}     # node → (space, channel dim)

    # --- union-find ----------------------------------------------------------------------------
    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.groups.append(Group(int(size)))
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def group(self, node: fx.Node) -> Group:
        return self.groups[self.find(self.axis[node][0])]

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        ga, gb = self.groups[ra], self.groups[rb]
        if ga.size != gb.size:
            ga.blocked.append(f"joined with channels of another size ({ga.size} vs {gb.size})")
        for f in ("producers", "consumers", "depthwise", "constants", "attention", "reshapes", "blocked"):
            getattr(ga, f).extend(getattr(gb, f))
        ga.unit = math.lcm(ga.unit, gb.unit)
        ga.zero_preserving &= gb.zero_preserving
        self.parent[rb] = ra
        return ra

    def block(self, node: fx.Node, why: str) -> None:
        if node in self.axis:
            self.group(node).blocked.append(why)

    # --- the walk ------------------------------------------------------------------------------
    def run(self) -> list[Group]:
        for n in self.graph.fx.nodes:
            if n.op == "output":
                for a in pytree.tree_leaves(n.args[0]):
                    if isinstance(a, fx.Node):
                        self.block(a, f"is a graph output (%{a.name})")
            elif n.op == "call_function" and not self.visit(n):
                for a in n.all_input_nodes:
                    self.block(a, f"read by {op_name(n)} (%{n.name})")
        roots = sorted({self.find(s) for s in range(len(self.parent))})
        return [self.groups[r] for r in roots if self.groups[r].producers or self.groups[r].consumers]

    def same(self, n: fx.Node, src: fx.Node, dim: int | None = None, zero_preserving: bool = True) -> bool:
        if src in self.axis:
            s, d = self.axis[src]
            self.axis[n] = (s, d if dim is None else dim)
            self.group(n).zero_preserving &= zero_preserving
        return True

    def visit(self, n: fx.Node) -> bool:
        """Record what `n` does to the spaces it reads; False: it reads one in a way that blocks it."""
        t, const = n.target, self.graph.is_constant
        if t in (CONV, LINEAR):
            a = conv_args(n) if t is CONV else linear_args(n)
            if not (const(a.weight) and (a.bias is None or const(a.bias))) or (t is CONV and a.transposed):
                return False
            x, out = tensor_meta(a.x), tensor_meta(n)
            if t is CONV and a.groups != 1:
                c = x.shape[1]
                if a.groups == c == out.shape[1] and a.x in self.axis and self.axis[a.x][1] == 1:
                    self.group(a.x).depthwise.append(n)
                    return self.same(n, a.x)
                return False
            cdim = 1 if t is CONV else x.dim() - 1
            if a.x in self.axis:
                if self.axis[a.x][1] != cdim:
                    return False
                self.group(a.x).consumers.append(n)
            self.axis[n] = (self.new(out.shape[1 if t is CONV else -1]), 1 if t is CONV else out.dim() - 1)
            self.group(n).producers.append(n)
            return True
        if t is ATTENTION:
            q, k, v, bias, heads = n.args[:5]
            if bias in self.axis or not all(x in self.axis and self.axis[x][1] == tensor_meta(x).dim() - 1
                                            for x in (q, k, v)):
                return False
            s = self.union(self.union(self.axis[q][0], self.axis[k][0]), self.axis[v][0])
            g = self.groups[s]
            g.unit = math.lcm(g.unit, g.size // heads)
            g.attention.append(n)
            return self.same(n, v)
        if t in UNARY:
            zp = UNARY[t]
            return self.same(n, n.args[0], zero_preserving=zp)
        if t is aten.hardtanh.default:
            lo, hi = (list(n.args[1:]) + [-1.0, 1.0][len(n.args) - 1:])[:2]
            return self.same(n, n.args[0], zero_preserving=lo <= 0 <= hi)
        if t is aten.constant_pad_nd.default:
            x, pad = n.args[0], list(n.args[1])
            if x in self.axis:
                rank, d = tensor_meta(x).dim(), self.axis[x][1]
                j = rank - 1 - d      # constant_pad_nd lists the last dim first
                if j < len(pad) // 2 and (pad[2 * j] or pad[2 * j + 1]):
                    return False
            return self.same(n, x, zero_preserving=(n.args[2] if len(n.args) > 2 else 0) == 0)
        if t in POOLS or t is operator.getitem:
            return self.same(n, n.args[0])
        if t in REDUCE:
            x = n.args[0]
            if x not in self.axis:
                return True
            rank, d = tensor_meta(x).dim(), self.axis[x][1]
            dims = [i % rank for i in n.args[1]] if len(n.args) > 1 else list(range(rank))
            keep = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
            if d in dims:
                return False
            return self.same(n, x, d if keep else d - sum(i < d for i in dims))
        if t in RESHAPE:
            return self.reshape(n)
        if t in BINARY:
            return self.binary(n, BINARY[t])
        return not any(a in self.axis for a in n.all_input_nodes)

    def reshape(self, n: fx.Node) -> bool:
        """Only reshapes that keep the dims up to the channel dim and regroup what follows it (a flatten of
        [B, C, 1, 1] to [B, C]): the channel dim of the shape argument is patched when the group shrinks."""
        x = n.args[0]
        if x not in self.axis:
            return True
        d = self.axis[x][1]
        si, so = tensor_meta(x).shape, tensor_meta(n).shape
        if len(so) <= d or [str(v) for v in si[:d + 1]] != [str(v) for v in so[:d + 1]]:
            return False
        self.group(x).reshapes.append((n, d))
        return self.same(n, x)

    def binary(self, n: fx.Node, kind: str) -> bool:
        out = tensor_meta(n)
        if out is None:
            return False
        a, b = n.args[:2]
        spaced = [x for x in (a, b) if isinstance(x, fx.Node) and x in self.axis]
        if not spaced:
            return True
        pos = {tensor_meta(x).dim() - self.axis[x][1] for x in spaced}    # channel position from the right
        if len(pos) > 1:
            return False
        (p,) = pos
        s = self.axis[spaced[0]][0]
        for x in spaced[1:]:
            s = self.union(s, self.axis[x][0])
        g = self.groups[self.find(s)]
        for i, x in enumerate((a, b)):
            if x in spaced:
                continue
            if not isinstance(x, fx.Node):
                if kind == "add" and x != 0 or kind == "div" and (i == 0 or x == 0):
                    g.zero_preserving = False
                continue
            val = tensor_meta(x)
            size = val.shape[val.dim() - p] if val is not None and val.dim() >= p else 1
            if str(size) == "1":
                g.zero_preserving &= kind == "mul" or (kind == "div" and i == 1)
                continue
            if not self.graph.is_constant(x) or int(size) != g.size:
                return False
            g.constants.append((n, i, val.dim() - p, kind if not (kind == "div" and i == 0) else "div-by"))
            if kind == "div" and i == 0:
                g.zero_preserving = False
        self.axis[n] = (s, out.dim() - p)
        return True
