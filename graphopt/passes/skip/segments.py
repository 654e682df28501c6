"""Splitting an IR graph at cut points into segments, each a Graph of its own (compiled separately).

Segment k takes the cut value left by segment k − 1 (`hidden`) and the model inputs it reads (an
attention mask; side computations on them are repeated per segment, they are cheap), and returns its
own cut value and, where it has one, an exit head's output; the last segment returns the model's
outputs. A head is a light function of the cut value (mean-pool and a linear layer) added as ops."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ...errors import UnsupportedError
from ...ir import Graph, op_name
from .blocks import HEAVY

aten = torch.ops.aten


@dataclass
class Head:
    """logits = [mean, root mean square](hidden over `dims`) @ weight.T + bias: fitted to the model's outputs."""
    dims: list[int]
    weight: torch.Tensor
    bias: torch.Tensor

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(pool(hidden, self.dims), self.weight, self.bias)


def pool_dims(rank: int) -> list[int]:
    """The dims a head pools over: spatial dims of NC… feature maps, tokens of (batch, tokens, features)."""
    return list(range(2, rank)) if rank >= 4 else [1] if rank == 3 else []


def pool(hidden: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """Per feature, its mean and root mean square over `dims` (the RMS tells a head how strongly a feature
    fired somewhere, which the mean alone blurs: 98.7% vs 97.2% agreement with the full model one block into
    the digits classifier)."""
    h = hidden.float()
    if not dims:
        return h
    return torch.cat([h.mean(dims), (h * h).mean(dims).sqrt()], 1)


@dataclass
class Segment:
    graph: Graph
    inputs: list[int]       # which of the model's flat inputs it reads (after `hidden`, for k > 0)
    has_hidden: bool


def split(graph: Graph, cuts: list[fx.Node], heads: list[Head | None]) -> list[Segment]:
    """len(cuts) + 1 segments of `graph`; heads[k] (None: no head) is computed from cuts[k] in segment k."""
    placeholders = graph.inputs
    bounds = [None, *cuts]
    segments = []
    for k, start in enumerate(bounds):
        end = [cuts[k]] if k < len(cuts) else graph.outputs
        segments.append(_segment(graph, placeholders, start, end, heads[k] if k < len(cuts) else None,
                                 final=k == len(cuts)))
    return segments


def _segment(graph: Graph, placeholders: list[fx.Node], start: fx.Node | None, ends: list[fx.Node],
             head: Head | None, final: bool) -> Segment:
    needed, stack = set(), list(ends)
    while stack:
        n = stack.pop()
        if n in needed:
            continue
        needed.add(n)
        if n is not start and n.op == "call_function":
            stack.extend(n.all_input_nodes)
    if start is not None:   # a cut separates: nothing upstream of it is needed but side inputs (masks, tables)
        crossing = [n for n in needed & _ancestors(start) if op_name(n) in HEAVY]
        if crossing:
            raise UnsupportedError(f"cannot split the graph at {start.name}: {crossing[0].name} crosses the cut")
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    if start is not None:
        env[start] = g.placeholder("hidden")
        env[start].meta = {"val": start.meta.get("val")}
    used = [i for i, p in enumerate(placeholders) if p in needed and p is not start]
    for i in used:
        env[placeholders[i]] = g.placeholder(placeholders[i].name)
        env[placeholders[i]].meta = dict(placeholders[i].meta)
    for n in graph.fx.nodes:
        if n in needed and n not in env and n.op in ("call_function", "get_attr"):
            env[n] = g.node_copy(n, lambda a: env[a])
    outs = [env[e] for e in ends]
    out_node = g.output(tuple(outs))
    module = fx.GraphModule(graph.module, g)
    n_in = (start is not None) + len(used)
    seg = Graph(module, pytree.tree_flatten((tuple(range(n_in)), {}))[1], None)
    if head is not None:
        w = seg.add_constant(head.weight, "exit_head_weight", before=out_node)
        b = seg.add_constant(head.bias, "exit_head_bias", before=out_node)
        x = outs[0]
        if x.meta["val"].dtype != torch.float32:
            x = seg.call(aten._to_copy.default, (x,), before=out_node, dtype=torch.float32)
        pooled = x
        if head.dims:
            mean = seg.call(aten.mean.dim, (x, head.dims), before=out_node)
            square = seg.call(aten.mul.Tensor, (x, x), before=out_node)
            rms = seg.call(aten.sqrt.default, (seg.call(aten.mean.dim, (square, head.dims), before=out_node),),
                           before=out_node)
            pooled = seg.call(aten.cat.default, ([mean, rms], 1), before=out_node)
        outs.append(seg.call(aten.linear.default, (pooled, w, b), before=out_node))
        out_node.args = (tuple(outs),)
    seg.out_spec = graph.out_spec if final else pytree.tree_flatten(tuple(range(len(outs))))[1]
    module.recompile()
    return Segment(seg, used, start is not None)


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, stack = set(), list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen
