"""Residual blocks found on the IR, whatever the model's classes are called.

A block is an add `y = x + f(x)` where
  * x feeds the branch f(x) (x is an ancestor of the other operand),
  * the add post-dominates the branch: every node between x and the add is used only inside the block,
    so making the add return x removes the branch whole,
  * x dominates the branch in the residual stream: every activation entering it comes through x; other
    inputs are side inputs computed without the stream (weights, an attention mask, position tables),
  * the branch does real work (a linear, conv, matmul or attention).
Dominators come from networkx on the IR's dataflow view. In a transformer layer the attention and the
FFN sub-blocks are separate blocks (post-LN BERT's `LayerNorm(x + f(x))`: the block is the add). Blocks
whose branch has the same ops and shapes are one *kind*: a repeated stage, costing the same each."""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx as fx

from ...ir import Graph, op_name, same_shape, shape_dtype

aten = torch.ops.aten
HEAVY = {"aten.linear", "aten.conv1d", "aten.conv2d", "aten.conv3d", "aten.convolution", "aten.matmul", "aten.mm",
         "aten.bmm", "aten.addmm", "aten.scaled_dot_product_attention",
         # graphopt's own forms of the same work: a block stays a block once another family has rewritten it
         "graphopt.attention", "graphopt.linear_act", "graphopt.conv_act", "graphopt.fft_conv1d", "graphopt.fft_conv2d",
         "graphopt.dynamic_linear", "graphopt.int4_linear", "graphopt.bsr_linear"}
LOOKED_FOR = ("residual blocks y = x + f(x): an add whose one operand x feeds the other through a branch with a "
              "linear/conv/matmul/attention, used only by that add")


@dataclass
class Block:
    index: int
    add: fx.Node                 # y = x + f(x)
    skip: fx.Node                # x
    branch: fx.Node              # f(x)
    region: list[fx.Node]        # the branch's nodes, topological order
    path: str                    # the module(s) it lives in (nn_module_stack), for people
    kind: int = 0                # blocks of one kind have the same ops and shapes
    nested: list[int] = field(default_factory=list)

    def bypass(self, *operands):
        """What the add returns when the block is removed: its skip input (for calibration.run_batches)."""
        return operands[self.add.args.index(self.skip)]

    def __str__(self) -> str:
        return f"block {self.index} [{self.path}] ({len(self.region)} ops, kind {self.kind})"


def find_blocks(graph: Graph) -> list[Block]:
    """The innermost residual blocks of `graph`, in order."""
    g = graph.to_networkx()
    g.remove_nodes_from([n for n, d in list(g.nodes(data=True)) if d["op"] == "get_attr"])
    nodes = {n.name: n for n in graph.fx.nodes}
    order = {n: i for i, n in enumerate(graph.fx.nodes)}
    found = []
    for add in graph.fx.find_nodes(op="call_function", target=aten.add.Tensor):
        a, b = add.args[:2]
        if add.kwargs.get("alpha", 1) != 1 or not all(isinstance(v, fx.Node) and same_shape(v, add) for v in (a, b)):
            continue
        for skip, branch in ((a, b), (b, a)):
            if skip is not branch and skip.name in nx.ancestors(g, branch.name):
                region = (nx.descendants(g, skip.name) & nx.ancestors(g, add.name)) - {skip.name}
                if any(g.nodes[r]["target"] in HEAVY for r in region):
                    found.append((add, skip, branch, region))
                break
    if not found:
        return []
    # dominance in the residual stream (everything computed from a skip input), post-dominance towards the output
    stream = set().union(*({s.name} | nx.descendants(g, s.name) for _, s, _, _ in found))
    s = g.subgraph(stream).copy()
    s.add_edges_from(("<root>", n) for n in list(s) if s.in_degree(n) == 0)
    idom = nx.immediate_dominators(s, "<root>")
    rev = g.reverse(copy=False)
    (out,) = [n.name for n in graph.fx.find_nodes(op="output")]
    ipdom = nx.immediate_dominators(rev, out)

    def chain_hits(tree, start, target, stop):
        while start != target and start != stop and tree.get(start, stop) != start:
            start = tree.get(start, stop)
        return start == target

    blocks = []
    for add, skip, branch, region in found:
        if all(chain_hits(ipdom, r, add.name, out) for r in region) and \
                all(chain_hits(idom, r, skip.name, "<root>") for r in region if r in stream):
            ordered = sorted((nodes[r] for r in region), key=order.get)
            blocks.append(Block(0, add, skip, branch, ordered, _module_path(ordered + [add])))
    # keep the innermost: a block whose branch holds another block's add is a stage of blocks, not one
    adds = {b.add.name for b in blocks}
    blocks = [b for b in blocks if not adds & {r.name for r in b.region}]
    blocks.sort(key=lambda b: order[b.add])
    kinds: dict[tuple, int] = {}
    for i, b in enumerate(blocks):
        b.index = i
        b.kind = kinds.setdefault(tuple((op_name(n), shape_dtype(n)[0] and tuple(map(str, shape_dtype(n)[0])))
                                        for n in b.region + [b.add]), len(kinds))
    return blocks


def _module_path(nodes: list[fx.Node]) -> str:
    """The deepest module holding all of `nodes`, with the children it spans when it holds more."""
    paths = [list(n.meta["nn_module_stack"].values())[-1][0].split(".") for n in nodes
             if n.meta.get("nn_module_stack")]   # nodes a pass created have no module of their own
    if not paths:
        return "<root>"
    prefix = paths[0]
    for p in paths[1:]:
        k = 0
        while k < min(len(prefix), len(p)) and prefix[k] == p[k]:
            k += 1
        prefix = prefix[:k]
    head = ".".join(prefix) or "<root>"
    children = sorted({p[len(prefix)] for p in paths if len(p) > len(prefix)})
    if len(children) > 1 and all(len(p) > len(prefix) for p in paths):
        return f"{head}.{{{','.join(children)}}}"
    return head


def exit_points(graph: Graph, blocks: list[Block]) -> list[tuple[int, fx.Node]]:
    """(block index, cut node) where the graph can be split after a block: the next block's skip input,
    where it dominates the graph's output in the residual stream (everything after it is computed from it
    and from side inputs alone)."""
    g = graph.to_networkx()
    g.remove_nodes_from([n for n, d in list(g.nodes(data=True)) if d["op"] == "get_attr"])
    stream = set().union(*({b.skip.name} | nx.descendants(g, b.skip.name) for b in blocks))
    s = g.subgraph(stream).copy()
    s.add_edges_from(("<root>", n) for n in list(s) if s.in_degree(n) == 0)
    idom = nx.immediate_dominators(s, "<root>")
    (out,) = [n.name for n in graph.fx.find_nodes(op="output")]
    dominators, n = set(), out
    while n in idom and idom[n] != n:
        n = idom[n]
        dominators.add(n)
    points, seen = [], set()
    for prev, nxt in zip(blocks, blocks[1:]):
        cut = nxt.skip
        if cut.name in dominators and cut.name not in seen:
            points.append((prev.index, cut))
            seen.add(cut.name)
    return points
