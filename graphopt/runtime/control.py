"""Models with torch.cond, lowered as DyCL lowers dynamic networks: the graph is cut at each cond into
straight-line segments compiled by the backend, each branch is compiled as a program of its own (the
passes run on it too; conds nested in it are cut the same way), and a host program runs the segments
and, at a cond, reads the predicate and runs only the branch it picks.

The alternative, one ONNX graph with `If` nodes (torch.onnx's lowering), keeps ONNX Runtime from
optimizing across the branch boundary and its CPU kernels re-plan memory per branch call: the digits
early-exit model ran ×0.47 of graphopt's full model that way (benchmarks/bench_skip.py)."""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from ..backends import Executable
from ..errors import UnsupportedError
from ..ir import Graph, subgraph
from .build import blocked_layout_entry

COND = torch.ops.higher_order.cond


def has_cond(graph: Graph) -> bool:
    return any(n.target is COND for n in graph.fx.nodes)


@dataclass
class Segment:
    executable: Executable
    reads: list[str]          # env names of its inputs
    writes: list[str]         # env names of its outputs


@dataclass
class Branch:
    pred: str
    then: HostProgram | Executable
    orelse: HostProgram | Executable
    reads: list[str]          # the operands that are not weights (weights were made the branches' own)
    writes: list[str]


class HostProgram:
    """Straight-line executables and conds, run in order over an environment of named values."""

    def __init__(self, inputs: list[str], steps: list[Segment | Branch], outputs: list[str], backend: str):
        self.inputs, self.steps, self.outputs, self.backend = inputs, steps, outputs, backend

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        env = dict(zip(self.inputs, inputs))
        for step in self.steps:
            if isinstance(step, Segment):
                run = step.executable.run
            else:
                run = (step.then if bool(env[step.pred]) else step.orelse).run
            env.update(zip(step.writes, run([env[r] for r in step.reads])))
        return [env[o] for o in self.outputs]

    def artifact(self) -> list:
        return [s.executable.artifact() if isinstance(s, Segment) else [s.then.artifact(), s.orelse.artifact()]
                for s in self.steps]

    def describe(self, depth: int = 0) -> list[str]:
        pad = "  " * depth
        lines = [] if depth else [f"host program ({self.backend}): {_count(self, Segment)} straight-line segments, "
                                  f"{_count(self, Branch)} torch.cond run on the host"]
        for k, s in enumerate(self.steps):
            if isinstance(s, Segment):
                lines += [f"{pad}segment {k}: {line}" for line in s.executable.describe()[:1]]
                continue
            for side, program in (("true", s.then), ("false", s.orelse)):
                lines.append(f"{pad}cond on {s.pred}, {side} branch:")
                lines += program.describe(depth + 1) if isinstance(program, HostProgram) else \
                    [f"{pad}  {line}" for line in program.describe()[:1]]
        return lines


def _count(program, kind) -> int:
    """Steps of `kind` in a program and the programs of its branches (a branch may be one executable)."""
    if not isinstance(program, HostProgram):
        return int(kind is Segment)
    n = 0
    for s in program.steps:
        n += (kind is Segment) if isinstance(s, Segment) else (kind is Branch) + _count(s.then, kind) + _count(s.orelse, kind)
    return n


def lower_conds(graph: Graph, example: list[torch.Tensor], build: Callable[[Graph, list[torch.Tensor]], Executable],
                optimize: Callable[[Graph, list[torch.Tensor]], None], backend: str) -> HostProgram:
    """`graph` (its passes already run) as a HostProgram: `build` compiles a straight-line graph for its example
    inputs, `optimize` runs the pipeline on a branch before it is lowered in turn."""
    values = values_on(graph, example)
    nodes = [n for n in graph.fx.nodes if n.op == "call_function"]
    steps: list[Segment | Branch] = []
    run: list[fx.Node] = []

    def flush():
        if run:
            steps.append(segment(graph, run, values, build, blocked_entry=bool(steps) and backend in ("ort", "auto")))
            run.clear()

    for n in nodes:
        if n.target is COND:
            flush()
            steps.append(_branch(graph, n, values, build, optimize, backend))
        elif not (n.target is operator.getitem and getattr(n.args[0], "target", None) is COND):
            run.append(n)
    flush()
    for out in graph.outputs:
        if out.op == "get_attr":
            raise UnsupportedError(f"the model returns a weight ({out.target}) directly; return a computed value")
    return HostProgram(_names(graph.inputs), steps, _names(graph.outputs), backend)


def _branch(graph: Graph, cond: fx.Node, values: dict, build, optimize, backend: str) -> Branch:
    pred, true_gm, false_gm, operands = cond.args[:4]
    if not isinstance(pred, fx.Node):
        raise UnsupportedError(f"{cond.name}: its predicate is a Python constant; torch.export should have "
                               "specialized the cond away (pass a tensor predicate)")
    weights = {i: graph.constant(o) for i, o in enumerate(operands) if o.op == "get_attr"}
    live = [o for i, o in enumerate(operands) if i not in weights]
    programs = []
    for gm_node in (true_gm, false_gm):
        gm = graph.constant(gm_node)
        placeholders = [p for p in gm.graph.nodes if p.op == "placeholder"]
        branch = subgraph(gm, [p for i, p in enumerate(placeholders) if i not in weights],
                          list(next(iter(gm.graph.find_nodes(op="output"))).args[0]),
                          {placeholders[i]: t for i, t in weights.items()})
        example = [values[o] for o in live]
        optimize(branch, example)
        if backend in ("ort", "auto"):
            blocked_layout_entry(branch, branch.inputs)
        programs.append(lower_conds(branch, example, build, optimize, backend) if has_cond(branch)
                        else build(branch, example))
    outs = {u.args[1]: u for u in cond.users if u.target is operator.getitem}
    writes = [outs[i].name if i in outs else f"{cond.name}_unused_{i}" for i in range(len(cond.meta["val"]))]
    return Branch(pred.name, programs[0], programs[1], _names(live), writes)


def segment(graph: Graph, run: list[fx.Node], values: dict, build: Callable[[Graph, list[torch.Tensor]], Executable],
            blocked_entry: bool = False) -> Segment:
    """Consecutive nodes `run` of `graph` as a Segment built by `build`; `blocked_entry`: its inputs are feature
    maps an earlier ORT segment produced (see blocked_layout_entry)."""
    inside = set(run)
    reads = _unique(a for n in run for a in n.all_input_nodes if a not in inside and a.op != "get_attr")
    writes = [n for n in run if any(u not in inside for u in n.users)]
    piece = subgraph(graph.module, reads, writes)
    if blocked_entry:
        blocked_layout_entry(piece, piece.inputs)
    return Segment(build(piece, [values[r] for r in reads]), _names(reads), _names(writes))


def values_on(graph: Graph, example: list[torch.Tensor]) -> dict[fx.Node, torch.Tensor]:
    """Every value of the graph on the example inputs: the segments' and branches' example inputs."""
    interpreter = fx.Interpreter(graph.module, garbage_collect_values=False)
    with torch.no_grad():
        interpreter.run(*example)
    return interpreter.env


def _unique(nodes) -> list[fx.Node]:
    return list(dict.fromkeys(nodes))


def _names(nodes) -> list[str]:
    return [n.name for n in nodes]
