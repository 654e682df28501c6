"""The ExportedProgram of an IR graph, built from it instead of traced again.

Handed a GraphModule, torch.onnx's exporter runs torch.export on it first: a retrace of every node under fake
tensors, which reproduces the graph the IR already is (capture made it with torch.export; every node a pass writes
carries its FakeTensor). On MobileNetV2 that retrace was half of each ONNX export, and a compile exports two to
three times. `lifted_program` builds the program directly: the weights (get_attr nodes) become placeholders of
kind BUFFER in front of the user inputs, the outputs one flat tuple, the tensors shared with the graph (no copy).

Only for what needs nothing from a trace: static shapes (a dynamic graph's symbols need the trace's range
constraints) and no subgraphs (torch.cond's branches hold their own weights, which the trace lifts into the
branch's inputs). Anything else returns None, and the exporter traces it as before."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.export import graph_signature as gs
from torch.export.exported_program import ExportedProgram, ModuleCallEntry, ModuleCallSignature
from torch.utils import _pytree as pytree

from ..ir import Graph


def lifted_program(graph: Graph) -> ExportedProgram | None:
    """`graph` as an ExportedProgram of flat inputs (the graph's placeholders) and flat outputs, or None where it
    needs a trace (see the module docstring)."""
    gm = graph.module
    if not _static(graph):
        return None
    program, env, specs, lifted, weights = fx.Graph(), {}, [], {}, {}
    for n in gm.graph.find_nodes(op="get_attr"):
        if n.target not in lifted:            # one input per weight, however many nodes read it
            lifted[n.target] = program.placeholder("p_" + n.target.replace(".", "_"))
            lifted[n.target].meta = dict(n.meta)
            specs.append(gs.InputSpec(gs.InputKind.BUFFER, gs.TensorArgument(lifted[n.target].name),
                                      target=n.target, persistent=True))
            weights[n.target] = graph.constant(n)
        env[n] = lifted[n.target]
    outputs = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            env[n] = program.placeholder(n.name)
            env[n].meta = dict(n.meta)
            specs.append(gs.InputSpec(gs.InputKind.USER_INPUT, gs.TensorArgument(env[n].name), target=None))
        elif n.op == "output":
            outputs = [env[o] if isinstance(o, fx.Node) else o for o in pytree.tree_leaves(n.args[0])]
            program.output(tuple(outputs))
        elif n.op != "get_attr":
            env[n] = program.node_copy(n, env.__getitem__)
    out_specs = [gs.OutputSpec(gs.OutputKind.USER_OUTPUT, gs.TensorArgument(o.name) if isinstance(o, fx.Node)
                               else gs.ConstantArgument("", o), target=None) for o in outputs]
    names = [s.arg.name for s in specs if s.kind == gs.InputKind.USER_INPUT]   # keywords: a retrace keeps them
    call = ModuleCallSignature(inputs=[], outputs=[], in_spec=pytree.tree_flatten(((), dict.fromkeys(names, 0)))[1],
                               out_spec=pytree.tree_flatten(tuple(range(len(outputs))))[1])
    root = fx.GraphModule(torch.nn.Module(), program)
    return ExportedProgram(root=root, graph=root.graph, graph_signature=gs.ExportGraphSignature(specs, out_specs),
                           state_dict=weights, range_constraints={}, module_call_graph=[ModuleCallEntry("", call)],
                           constants={})


def _static(graph: Graph) -> bool:
    """Every node a call of an op on tensors of static shapes, every get_attr a tensor."""
    for n in graph.fx.nodes:
        if n.op in ("call_module", "call_method") or (n.op == "get_attr" and not isinstance(
                graph.constant(n), torch.Tensor)):
            return False
        if n.op in ("placeholder", "call_function", "get_attr") and not _static_value(n.meta.get("val")):
            return False
    return True


def _static_value(val) -> bool:
    leaves = pytree.tree_leaves(val)
    return bool(leaves) and all(not isinstance(v, torch.Tensor) or all(isinstance(d, int) for d in v.shape)
                                for v in leaves) and not any(isinstance(v, torch.SymInt) for v in leaves)

