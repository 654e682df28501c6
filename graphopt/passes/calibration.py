"""Calibration data: the user's batches checked against the example inputs, and the two ways a pass
runs the IR on them — `observe` (watch chosen nodes' values) and `run_batches` (the outputs, with
chosen nodes computed another way: what a layer quantized, pruned or skipped would give)."""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ..errors import InputError
from ..ir import Graph


def observe(graph: Graph, batches: Iterable, nodes: Iterable[fx.Node] = (),
            on_node: Callable[[fx.Node, tuple, object], None] | None = None, observer: Callable = None) -> dict:
    """Run every batch through the graph; feed the outputs of `nodes` to an `observer()` each (by node
    name; `.update(value)`). `on_node(node, args, out)` sees each node's evaluated arguments and result
    too (bias correction measures with it)."""
    watched = {n.name for n in nodes}
    observers = {name: observer() for name in watched}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in watched:
                observers[n.name].update(out)
            if on_node is not None and n.op == "call_function":
                on_node(n, self.map_nodes_to_values(n.args, n), out)
            return out

    recorder = Recorder(graph.module)
    with torch.no_grad():
        for args, kwargs in batches:
            recorder.run(*graph.flat_inputs(args, kwargs))
    return observers


def check_batches(calibration, example_args: tuple, example_kwargs: dict) -> list[tuple[tuple, dict]]:
    """The user's calibration data as (args, kwargs) pairs shaped like the example inputs (batch
    size may differ), or a clear InputError before any work."""
    if calibration is None:
        return []
    if isinstance(calibration, (torch.Tensor, dict)) or not isinstance(calibration, Iterable):
        raise InputError("calibration= takes a list of batches, each shaped like example_inputs "
                         f"(a tensor, a tuple of tensors or a dict), got {type(calibration).__name__}")
    batches = []
    for i, b in enumerate(calibration):
        args, kwargs = ((b,), {}) if isinstance(b, torch.Tensor) else ((), dict(b)) if isinstance(b, dict) \
            else (tuple(b), {})
        expect = list(example_args) + [example_kwargs[k] for k in sorted(example_kwargs)]
        given = list(args) + [kwargs.get(k) for k in sorted(example_kwargs)]
        if len(args) != len(example_args) or set(kwargs) != set(example_kwargs):
            raise InputError(f"calibration batch {i} has {len(args)} positional / {sorted(kwargs)} keyword inputs; "
                             f"example_inputs has {len(example_args)} / {sorted(example_kwargs)}")
        for j, (g, e) in enumerate(zip(given, expect)):
            if not isinstance(g, torch.Tensor) or g.dtype != e.dtype or g.shape[1:] != e.shape[1:]:
                got = f"{tuple(g.shape)} {g.dtype}" if isinstance(g, torch.Tensor) else type(g).__name__
                raise InputError(f"calibration batch {i}, input {j}: got {got}, expected shape (*, "
                                 f"{', '.join(map(str, e.shape[1:]))}) {e.dtype} like the example input")
        batches.append((args, kwargs))
    if not batches:
        raise InputError("calibration= is empty: give a few batches of representative inputs")
    return batches


def run_batches(graph: Graph, batches, replace: dict[fx.Node, Callable] | None = None) -> list[torch.Tensor]:
    """The graph's floating-point outputs on every batch (flattened, batch after batch); a node in
    `replace` is computed by its function instead, from the node's evaluated arguments."""
    replace = replace or {}

    class Runner(fx.Interpreter):
        def run_node(self, node):
            if node in replace:
                return replace[node](*self.map_nodes_to_values(node.args, node))
            return super().run_node(node)
    outs = []
    with torch.no_grad():
        for args, kwargs in batches:
            res = Runner(graph.module).run(*graph.flat_inputs(args, kwargs))
            outs.extend(t for t in pytree.tree_leaves(res) if isinstance(t, torch.Tensor) and t.is_floating_point())
    return outs
