"""Physical removal: a group's channels dropped from every weight that holds them, so each backend runs
smaller dense ops. Weights are new constants (the user's tensors are never written); shapes downstream
are re-derived on the graph's FakeTensors afterwards (`refresh_meta`), which is what codegen exports."""
from __future__ import annotations

import contextlib
import math
import operator

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils import _pytree as pytree

from ...ir import Graph, conv_args, linear_args
from ..base import Pass, PassContext, PassResult, register
from .groups import CONV, Group


def shrink(graph: Graph, group: Group, keep_units, consumer_weights: dict | None = None) -> None:
    """Keep only `keep_units` of `group` everywhere. `consumer_weights[node] = (weight, bias)` gives a
    consumer's new weights already cut to the kept channels (reconstruction); others are sliced."""
    keep = group.channels(sorted(int(u) for u in keep_units))
    consumer_weights = consumer_weights or {}
    heads = {n: n.args[4] for n in group.attention}
    for n in group.consumers:   # first: a layer that reads and writes the group (a residual block's linear,
        w, b = consumer_weights.get(n) or _sliced(graph, n, keep, 1, bias=False)   # whose reconstructed weight
        _set_weights(graph, n, w, b)                        # still has every output row) is then cut as a producer
    for n in group.producers:
        _set_weights(graph, n, *_sliced(graph, n, keep, 0))
    for n in group.depthwise:
        w, b = _sliced(graph, n, keep, 0)
        _set_weights(graph, n, w, b)
        n.args = conv_args(n).replace(groups=len(keep))
    for n, i, axis, _ in group.constants:
        c = graph.constant(n.args[i]).index_select(axis, keep)
        n.update_arg(i, graph.add_constant(c, n.args[i].target + "_pruned", before=n))
    for n in group.attention:
        n.update_arg(4, heads[n] * len(keep) // group.size)
    for n, d in group.reshapes:
        shape = list(n.args[1])
        if isinstance(shape[d], int) and shape[d] == group.size:
            shape[d] = len(keep)
            n.update_arg(1, shape)
    group.size = len(keep)


def _sliced(graph: Graph, n: fx.Node, keep: torch.Tensor, axis: int, bias: bool = True):
    """(weight, bias) tensors of conv/linear `n` with channels `keep` of `axis` (the bias too on axis 0)."""
    a = conv_args(n) if n.target is CONV else linear_args(n)
    w = graph.constant(a.weight).index_select(axis, keep)
    b = None if a.bias is None else graph.constant(a.bias)
    if b is not None and bias:
        b = b.index_select(0, keep)
    return w, b


def _set_weights(graph: Graph, n: fx.Node, w: torch.Tensor, b: torch.Tensor | None) -> None:
    a = conv_args(n) if n.target is CONV else linear_args(n)
    name = a.weight.target.removeprefix("_graphopt_")
    w_node = graph.add_constant(w.contiguous(), name + "_pruned", before=n)
    b_node = a.bias
    if b is not None and (a.bias is None or graph.constant(a.bias) is not b):
        b_node = graph.add_constant(b.contiguous(), name.removesuffix("weight") + "bias_pruned", before=n)
    n.args = a.replace(weight=w_node, bias=b_node) if n.target is CONV else (a.x, w_node, b_node)


def refresh_meta(graph: Graph) -> None:
    """Recompute every node's meta["val"] on the graph's fake tensors, in order, after shapes changed."""
    vals = [p.meta.get("val") for p in graph.inputs]
    fake_mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    ctx = fake_mode if fake_mode is not None else contextlib.nullcontext()

    def fake(t):
        if fake_mode is None or isinstance(t, FakeTensor):
            return t
        return fake_mode.from_tensor(t, static_shapes=True)
    for n in graph.fx.nodes:
        if n.op == "get_attr":
            n.meta["val"] = graph.constant(n)
        elif n.op == "call_function":
            args, kwargs = fx.map_arg((n.args, n.kwargs), lambda a: a.meta["val"])
            args, kwargs = pytree.tree_map_only(torch.Tensor, fake, (args, kwargs))
            with ctx:
                n.meta["val"] = n.target(*args, **kwargs) if n.target is not operator.getitem else args[0][args[1]]


def hint(d) -> int:
    """A dim's example size, without guarding on it: int() of a symbolic batch dim would specialize the graph
    to the example's batch size. A data-dependent size (the tokens routed to one expert) has no example size: 1."""
    return d if isinstance(d, int) else int(d.node.hint) if d.node.hint is not None else 1


def macs(graph: Graph) -> int:
    """Multiply-adds of the graph's convs, linears and block-sparse linears, from their shapes."""
    return sum(node_macs(n) for n in graph.ops())


def node_macs(n: fx.Node) -> int:
    """Multiply-adds of one conv, linear or block-sparse linear from its shapes (0 for any other node)."""
    out = n.meta.get("val")
    if not isinstance(out, torch.Tensor):
        return 0
    if n.target is CONV:
        return math.prod(map(hint, out.shape)) * math.prod(n.args[1].meta["val"].shape[1:])
    if n.target in (torch.ops.aten.linear.default, torch.ops.graphopt.bsr_linear.default):
        # bsr blocks [R, k·bw, bh]: k·bw inputs per output
        return math.prod(map(hint, out.shape)) * n.args[1].meta["val"].shape[1]
    return 0


def parameters(graph: Graph) -> int:
    """Elements of the constants the graph reads."""
    weights = (graph.constant(n) for n in graph.fx.find_nodes(op="get_attr") if n.users)
    return sum(w.numel() for w in weights if isinstance(w, torch.Tensor))      # not a cond's branch modules


def remove_inert(graph: Graph, result) -> int:
    """Remove every provably inert unit (see detect.py) of every prunable group; notes per group. Returns
    how many groups shrank (their meta is refreshed)."""
    from .detect import inert_units
    from .groups import find_groups
    shrunk = 0
    for g in find_groups(graph):
        dead = inert_units(graph, g) if g.prunable else []
        if not dead:
            continue
        if len(dead) == g.units:
            result.skipped(f"{g.name}: every unit is inert; kept one so the shapes stay valid")
            dead = dead[1:]
        name, keep = g.name, [u for u in range(g.units) if u not in set(dead)]
        shrink(graph, g, keep)
        shrunk += 1
        result.did(f"removed {len(dead)} of {len(keep) + len(dead)} {g.kind} of {name}: all zero or never read "
                   f"(exact)")
    if shrunk:
        refresh_meta(graph)
    return shrunk


@register
class ShrinkInert(Pass):
    name = "shrink_inert"
    phase = "rewrite"
    summary = "find sparsity already in the weights; remove all-zero channels, heads and FFN units (exact)"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        from .detect import layer_sparsity, layers
        result = PassResult()
        before_macs, before_params = macs(graph), parameters(graph)
        sparse = [s for s in (layer_sparsity(graph, n) for n in layers(graph)) if s.density < 1]
        result.notes.extend(s.line((32, 32), (2, 4)) for s in sparse)
        if sparse:
            result.table("Sparsity already in the weights, per layer (layers with any zero weight)",
                         ["layer", "density", "32×32 block density", "2:4 groups", "zero outputs", "zero inputs"],
                         [[s.name, s.density, s.block_density, s.nm_fraction, s.zero_rows, s.zero_cols] for s in sparse],
                         bars=("density", "32×32 block density", "2:4 groups"))
        remove_inert(graph, result)
        after_macs, after_params = macs(graph), parameters(graph)
        result.stats.update(macs_before=before_macs, macs_after=after_macs, params_before=before_params,
                            params_after=after_params)
        result.notes.append(f"MACs {before_macs:,} → {after_macs:,}; parameters {before_params:,} → {after_params:,}")
        return result
