"""The IR: the exported FX graph of ATen ops, kept executable.

A Graph wraps the GraphModule that `ExportedProgram.module()` gives: user inputs are
placeholders, weights are `get_attr` nodes, every op node carries its FakeTensor in
`node.meta["val"]`. Passes rewrite `graph.fx` in place; `graph.run(...)` executes it in PyTorch
at any point, which is what makes per-pass drift checks possible.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import warnings
from typing import Any, Iterator

import networkx as nx
import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils import _pytree as pytree


class Graph:
    def __init__(self, module: fx.GraphModule, in_spec: pytree.TreeSpec, out_spec: pytree.TreeSpec):
        self.module = module
        self.in_spec = in_spec      # pytree spec of (args, kwargs) the model was captured with
        self.out_spec = out_spec    # pytree spec of the model's output (tuple, dict, ModelOutput...)

    # --- structure -------------------------------------------------------------------------
    @property
    def fx(self) -> fx.Graph:
        return self.module.graph

    def __iter__(self) -> Iterator[fx.Node]:
        return iter(self.fx.nodes)

    @property
    def inputs(self) -> list[fx.Node]:
        return list(self.fx.find_nodes(op="placeholder"))

    @property
    def outputs(self) -> list[fx.Node]:
        (out,) = self.fx.find_nodes(op="output")
        return [a for a in pytree.tree_leaves(out.args[0]) if isinstance(a, fx.Node)]

    def ops(self) -> Iterator[fx.Node]:
        """The computing nodes (calls), in topological order."""
        return (n for n in self.fx.nodes if n.op == "call_function")

    def op_counts(self) -> dict[str, int]:
        return dict(sorted(collections.Counter(op_name(n) for n in self.ops()).items()))

    # --- weights -----------------------------------------------------------------------------
    def is_constant(self, node: fx.Node) -> bool:
        return node.op == "get_attr"

    def constant(self, node: fx.Node) -> torch.Tensor:
        """The tensor behind a get_attr node."""
        return _fetch(self.module, node.target)

    def add_constant(self, tensor: torch.Tensor, name: str, *, before: fx.Node) -> fx.Node:
        """Register a new weight (never touching the user's tensors) and return its get_attr node."""
        base = "_graphopt_" + name.replace(".", "_").lstrip("_")
        target, i = base, 0
        while hasattr(self.module, target):
            i += 1
            target = f"{base}_{i}"
        self.module.register_buffer(target, tensor.detach(), persistent=True)
        with self.fx.inserting_before(before):
            node = self.fx.get_attr(target)
        node.meta["val"] = tensor
        return node

    def call(self, target, args: tuple, kwargs: dict | None = None, *, before: fx.Node,
             dtype: torch.dtype | None = None) -> fx.Node:
        """Insert `target(*args, **kwargs)` before `before`, its meta["val"] computed on the graph's
        FakeTensors: the one way a pass creates a node. With `dtype`, the result is `before`'s value in
        that dtype (where tracing the op would guard on a dynamic dim)."""
        kwargs = kwargs or {}
        with self.fx.inserting_before(before):
            node = self.fx.call_function(target, args, kwargs)
        if dtype is not None:
            val = before.meta["val"]
            fake_mode = detect_fake_mode([val])
            with fake_mode if fake_mode is not None else contextlib.nullcontext():
                node.meta["val"] = val.to(dtype)
            return node
        vals, kw = fx.map_arg((args, kwargs), lambda n: n.meta["val"])
        fake_mode = detect_fake_mode(pytree.tree_leaves((vals, kw)))
        if fake_mode is None:
            node.meta["val"] = target(*vals, **kw)
        else:
            vals, kw = pytree.tree_map_only(torch.Tensor, lambda t: t if isinstance(t, FakeTensor)
                                            else fake_mode.from_tensor(t, static_shapes=True), (vals, kw))
            with fake_mode:
                node.meta["val"] = target(*vals, **kw)
        return node

    def eliminate_dead_code(self) -> bool:
        """FX's DCE, except that seeded-random ops (SDPA, dropout) count as pure: in an inference
        graph an unused one has no effect worth keeping."""
        return self.fx.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() and not _seeded_but_pure(n))

    def tidy(self) -> None:
        """After a rewrite: drop weights nobody reads, check the graph, regenerate the code."""
        for node in list(self.fx.find_nodes(op="get_attr")):
            if not node.users:
                self.fx.erase_node(node)
        self.fx.lint()
        _delete_unused_submodules(self.module)
        _delete_unused_attributes(self.module)
        self.module.recompile()

    # --- execution and views -----------------------------------------------------------------
    def run(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def flat_outputs(self) -> Iterator[fx.GraphModule]:
        """The module returning its outputs as one flat tuple, as the backends build them (the compiled module
        gives them the model's structure again), instead of rebuilding that structure inside what an exporter
        traces: a Hugging Face DynamicCache's rebuild would add its own concats to the exported graph."""
        spec = getattr(self.module, "_out_spec", None)
        if spec is None:   # a module made by subgraph(): flat already
            yield self.module
            return
        codegen = self.module.graph._codegen   # torch.export reads the spec there, the module's code here
        info = codegen.pytree_info
        flat = pytree.tree_flatten(tuple(range(spec.num_leaves)))[1]
        self.module._out_spec, codegen.pytree_info = flat, info._replace(out_spec=flat)
        try:
            yield self.module
        finally:
            self.module._out_spec, codegen.pytree_info = spec, info

    def flat_inputs(self, args: tuple, kwargs: dict) -> list:
        """(args, kwargs) → the graph's placeholders in order (what fx.Interpreter.run takes)."""
        keys = self.in_spec.child(1).context
        return pytree.tree_leaves((tuple(args), {k: kwargs[k] for k in keys}))

    def to_networkx(self) -> nx.DiGraph:
        """Dataflow view for analyses (reachability, cycles, dominators): one vertex per node name."""
        g = nx.DiGraph()
        for n in self.fx.nodes:
            shape, dtype = shape_dtype(n)
            g.add_node(n.name, op=n.op, target=op_name(n), shape=shape, dtype=dtype)
            for inp in n.all_input_nodes:
                g.add_edge(inp.name, n.name)
        return g


def subgraph(module: fx.GraphModule, inputs: list[fx.Node], outputs: list[fx.Node],
             constants: dict[fx.Node, torch.Tensor] | None = None) -> Graph:
    """The part of `module`'s graph computing `outputs` from `inputs` as a Graph of its own: placeholders for
    `inputs` (in order), weights copied by reference, `constants` (nodes → tensors) made weights; it takes and
    returns flat tuples. Every other value it needs must be a weight (an UnsupportedError says which is not)."""
    constants = constants or {}
    needed, stack = set(), list(outputs)
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            if n not in inputs and n not in constants:
                stack.extend(n.all_input_nodes)
    g, root, env = fx.Graph(), {}, {}
    for n in inputs:
        env[n] = g.placeholder(n.name)
        env[n].meta = dict(n.meta)
    for n, tensor in constants.items():
        if n in needed:
            root[f"_const_{n.name}"] = tensor
            env[n] = g.get_attr(f"_const_{n.name}")
            env[n].meta = {"val": n.meta.get("val")}
    for n in module.graph.nodes:
        if n not in needed or n in env:
            continue
        if n.op == "placeholder":
            from ..errors import UnsupportedError
            raise UnsupportedError(f"cannot cut the graph here: input {n.name} is needed past the cut")
        if n.op == "get_attr":
            root[n.target] = _fetch(module, n.target)
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(tuple(env[o] for o in outputs))
    flat = lambda k: pytree.tree_flatten(tuple(range(k)))[1]   # noqa: E731
    return Graph(fx.GraphModule(root, g), pytree.tree_flatten((tuple(range(len(inputs))), {}))[1], flat(len(outputs)))


def _fetch(module: torch.nn.Module, target: str) -> Any:
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def copy_graph(graph: Graph, share_weights: bool = False) -> Graph:
    """An independent copy to try a rewrite on without touching `graph`: weights included, or with
    `share_weights` the same weight tensors (and submodules) under a copied graph, for a rewrite that only rewires
    nodes: no second copy of the model's weights (a whole 0.77 B Llama, 3.1 GB, for a trial of conv epilogues)."""
    if share_weights:
        nodes = fx.Graph()
        nodes.output(nodes.graph_copy(graph.fx, {}))
        return Graph(fx.GraphModule(graph.module, nodes), graph.in_spec, graph.out_spec)
    with warnings.catch_warnings():   # torch's own pytree deprecation (LeafSpec) fires while copying its specs
        warnings.simplefilter("ignore", FutureWarning)
        module = copy.deepcopy(graph.module)
    return Graph(module, graph.in_spec, graph.out_spec)


def is_call(node, *targets) -> bool:
    """node is an fx.Node calling one of `targets` (pattern-matching helper for passes)."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def op_name(node: fx.Node) -> str:
    """`aten.linear` for torch.ops.aten.linear.default; the plain name for Python callables."""
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return t.name().replace("::", ".")
    return getattr(t, "__name__", str(t))


def tensor_meta(node: fx.Node) -> torch.Tensor | None:
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) else None


def shape_dtype(node: fx.Node) -> tuple[tuple | None, torch.dtype | None]:
    val = tensor_meta(node)
    if val is None:
        return None, None
    return tuple(val.shape), val.dtype


def same_shape(a: fx.Node | torch.Tensor, b: fx.Node | torch.Tensor) -> bool:
    """Shapes equal for every input the graph accepts: symbolic dims must be the same symbol.

    Compares dims syntactically so no guard is ever added to a dynamic shape."""
    sa = a.shape if isinstance(a, torch.Tensor) else (tensor_meta(a).shape if tensor_meta(a) is not None else None)
    sb = b.shape if isinstance(b, torch.Tensor) else (tensor_meta(b).shape if tensor_meta(b) is not None else None)
    if sa is None or sb is None or len(sa) != len(sb):
        return False
    return all(str(x) == str(y) for x, y in zip(sa, sb))


def _seeded_but_pure(node: fx.Node) -> bool:
    t = node.target
    return (isinstance(t, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in t.tags
            and not t._schema.is_mutable)


def _delete_unused_submodules(module: fx.GraphModule) -> None:
    """Children no node refers to. (FX's delete_all_unused_submodules also deletes what only the graphs of
    child GraphModules refer to: the branches of a torch.cond nested in a branch.)"""
    used = {n.target.split(".")[0] for n in module.graph.nodes if n.op in ("get_attr", "call_module")}
    for name in [name for name, _ in module.named_children() if name not in used]:
        delattr(module, name)


def _delete_unused_attributes(module: fx.GraphModule) -> None:
    used = {n.target for n in module.graph.find_nodes(op="get_attr")}
    for name in [n for n, _ in module.named_buffers(recurse=False)] + [n for n, _ in module.named_parameters(recurse=False)]:
        if name.startswith("_graphopt_") and name not in used:
            delattr(module, name)
