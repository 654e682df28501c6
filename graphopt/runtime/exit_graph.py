"""Early exit as one ONNX graph for single samples: the segments' ONNX models nested in `If` nodes.

Segment k computes its hidden state and its exit head's logits; `If(max softmax ≥ threshold)` returns the
logits (and the exit's index) or runs segment k + 1 in its else-branch. With one sample per call this is
exactly the host dispatcher's rule, in one ONNX Runtime call instead of one per segment and the numpy work
between them; on a batch an `If` takes one branch for all samples, so batches stay with the dispatcher. Each
segment's values are renamed into a scope of their own (`s{k}/`), its weights lifted to the main graph (an
else-branch reads outer-scope values), and its model-local functions and opsets merged."""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper

OUTPUT, EXIT = "output", "exit_index"     # the graph's outputs: the model's output, the exit taken


def exits_as_if(models: list[onnx.ModelProto], routes: list[list[int]], thresholds: list[float]) -> onnx.ModelProto:
    """One model: inputs as the original model's (`input{i}` by flat index), outputs the model's output and
    the exit taken (int64 scalar; len(thresholds) for the end)."""
    out_type = models[-1].graph.output[0].type     # the model's output; each head's logits are shaped alike
    inputs: dict[int, onnx.ValueInfoProto] = {}
    initializers: list[onnx.TensorProto] = []
    for k, (model, route) in enumerate(zip(models, routes)):
        for i, v in zip(route, _feeds(model)[0 if k == 0 else 1:]):
            inputs.setdefault(i, helper.make_value_info(f"input{i}", v.type))
        initializers += [_renamed_tensor(w, f"s{k}/") for w in model.graph.initializer]

    def scope(k: int) -> tuple[list[onnx.NodeProto], str, str]:
        """Segment k's nodes and everything after it: (nodes, output name, exit index name)."""
        model, route = models[k], routes[k]
        feeds = [i.name for i in _feeds(model)]
        mapping = {name: f"input{i}" for name, i in zip(feeds[0 if k == 0 else 1:], route)}
        if k > 0:
            mapping[feeds[0]] = hidden_of[k - 1]
        nodes = [_renamed_node(n, f"s{k}/", mapping) for n in model.graph.node]
        outs = [_name(o.name, f"s{k}/", mapping) for o in model.graph.output]
        exit_name = f"s{k}/{EXIT}"
        if k == len(thresholds):
            nodes.append(helper.make_node("Constant", [], [exit_name], value=helper.make_tensor(
                "", TensorProto.INT64, [], [k])))
            return nodes, outs[0], exit_name
        hidden_of[k] = outs[0]
        logits, p, top, cond = outs[1], f"s{k}/exit_p", f"s{k}/exit_top", f"s{k}/exit_cond"
        nodes += [helper.make_node("Softmax", [logits], [p], axis=-1),
                  helper.make_node("ReduceMax", [p], [top], keepdims=0),
                  helper.make_node("Constant", [], [f"s{k}/exit_threshold"],
                                   value=helper.make_tensor("", TensorProto.FLOAT, [], [thresholds[k]])),
                  helper.make_node("GreaterOrEqual", [top, f"s{k}/exit_threshold"], [cond])]
        here = helper.make_graph(
            [helper.make_node("Identity", [logits], [f"s{k}/then_out"]),
             helper.make_node("Constant", [], [f"s{k}/then_exit"],
                              value=helper.make_tensor("", TensorProto.INT64, [], [k]))],
            f"exit{k}", [], [helper.make_value_info(f"s{k}/then_out", out_type), _scalar(f"s{k}/then_exit")])
        rest_nodes, rest_out, rest_exit = scope(k + 1)   # the else-branch returns its values as computed: no copy
        rest = helper.make_graph(rest_nodes, f"after_exit{k}", [],
                                 [helper.make_value_info(rest_out, out_type), _scalar(rest_exit)])
        out, exit_index = (OUTPUT, EXIT) if k == 0 else (f"s{k}/out", f"s{k}/{EXIT}")
        nodes.append(helper.make_node("If", [cond], [out, exit_index], then_branch=here, else_branch=rest))
        return nodes, out, exit_index

    hidden_of: dict[int, str] = {}
    nodes, out, exit_index = scope(0)
    if out != OUTPUT:                     # no exit at all: the segment's own output
        nodes += [helper.make_node("Identity", [out], [OUTPUT]), helper.make_node("Identity", [exit_index], [EXIT])]
    graph = helper.make_graph(nodes, "early_exit", [inputs[i] for i in sorted(inputs)],
                              [helper.make_value_info(OUTPUT, out_type), _scalar(EXIT)], initializers)
    opsets: dict[str, int] = {}
    for m in models:
        for o in m.opset_import:
            opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
    functions = {(f.domain, f.name, getattr(f, "overload", "")): f for m in models for f in m.functions}
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                             functions=list(functions.values()), ir_version=max(m.ir_version for m in models))


def _feeds(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs a caller feeds (hidden state first after segment 0), not the weights listed as inputs."""
    weights = {w.name for w in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in weights]


def _name(name: str, prefix: str, mapping: dict[str, str]) -> str:
    return "" if name == "" else mapping.get(name, prefix + name)


def _renamed_node(node: onnx.NodeProto, prefix: str, mapping: dict[str, str]) -> onnx.NodeProto:
    """A copy of `node` with every value name (in nested subgraphs too) moved into `prefix`'s scope."""
    new = onnx.NodeProto()
    new.CopyFrom(node)
    new.name = prefix + node.name if node.name else ""
    new.input[:] = [_name(n, prefix, mapping) for n in node.input]
    new.output[:] = [_name(n, prefix, mapping) for n in node.output]
    for attr in new.attribute:
        for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else
                  list(attr.graphs) if attr.type == onnx.AttributeProto.GRAPHS else []):
            _rename_graph(g, prefix, mapping)
    return new


def _rename_graph(g: onnx.GraphProto, prefix: str, mapping: dict[str, str]) -> None:
    renamed = [_renamed_node(n, prefix, mapping) for n in g.node]
    del g.node[:]
    g.node.extend(renamed)
    for v in list(g.input) + list(g.output) + list(g.value_info):
        v.name = _name(v.name, prefix, mapping)
    for w in g.initializer:
        w.name = _name(w.name, prefix, mapping)


def _renamed_tensor(t: onnx.TensorProto, prefix: str) -> onnx.TensorProto:
    new = onnx.TensorProto()
    new.CopyFrom(t)
    new.name = prefix + t.name
    return new


def _scalar(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.INT64, [])
