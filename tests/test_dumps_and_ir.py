"""The IR's views (text, networkx, DOT) and the per-pass dump directory a person reads."""
import json
import os
import re

import networkx as nx
import torch
import torch.nn as nn

import graphopt
from graphopt import zoo
from graphopt.capture import capture
from graphopt.ir import graph_dot, graph_text


class ConvBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.drop = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Dropout(0.1)

    def forward(self, x):
        return self.drop(self.bn(self.conv(x)).relu()).flatten(1)


X = (torch.randn(2, 3, 8, 8),)


def test_text_form_has_shapes_dtypes_and_weights():
    graph = capture(ConvBlock().eval(), X)
    text = graph_text(graph)
    assert text.startswith("graph(%x: f32[2,3,8,8]) {")
    assert "aten.convolution(%x, @conv.weight, @conv.bias" in text and ": f32[2,8,6,6]" in text
    assert text.rstrip().splitlines()[-1].startswith("# 7 weights")


def test_text_form_is_stable():
    torch.manual_seed(0)
    a = graph_text(capture(ConvBlock().eval(), X))
    torch.manual_seed(1)
    assert graph_text(capture(ConvBlock().eval(), X)) == a   # names and shapes, not weight values


def test_networkx_view_and_dot():
    graph = capture(ConvBlock().eval(), X)
    g = graph.to_networkx()
    assert nx.is_directed_acyclic_graph(g)
    conv = next(n for n, d in g.nodes(data=True) if d["target"] == "aten.convolution")
    assert g.nodes[conv]["shape"] == (2, 8, 6, 6) and g.nodes[conv]["dtype"] == torch.float32
    assert nx.has_path(g, "x", "output")
    dot = graph_dot(graph, highlight={conv})
    assert dot.startswith("digraph") and f'"{conv}" [label="aten.convolution' in dot and "+weight, bias" in dot
    assert dot.count("#ffb347") == 1                       # only the highlighted node
    assert "@conv" not in dot and '"conv_weight"' not in dot  # weights are folded into labels
    assert f'"x" -> "{conv}"' in dot


def test_dump_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)           # anything written outside dump_dir would land here
    dump = tmp_path / "dumps"
    model, inputs = zoo.build("bert", size="tiny", batch=2)
    cm = graphopt.compile(model, inputs, dump_dir=dump)
    names = graphopt.passes.default_pipeline(graphopt.get_target("cpu"))
    folders = sorted(p.name for p in dump.iterdir() if p.is_dir())
    assert folders == ["00-captured"] + [f"{i:02d}-{n}" for i, n in enumerate(names, 1)] + [f"{len(names) + 1:02d}-backend-ort"]
    for folder in folders[1:-1]:
        stats = json.loads((dump / folder / "stats.json").read_text())
        assert {"rewrites", "time_s", "op_delta", "op_counts", "notes", "drift"} <= set(stats)
        assert stats["drift"]["rel_err"] <= 1e-4
        assert (dump / folder / "graph.txt").exists() and (dump / folder / "diff.txt").exists()
        assert any((dump / folder / f"graph.{ext}").exists() for ext in ("svg", "dot"))
    noops = json.loads((dump / "01-remove_noops" / "stats.json").read_text())
    assert noops["rewrites"] > 0 and noops["op_delta"].get("aten.clone", 0) < 0
    assert "-  %clone" in (dump / "01-remove_noops" / "diff.txt").read_text()
    html = (dump / "report.html").read_text()
    assert all(n in html for n in names) and "backend-ort" in html
    assert "| remove_noops |" in (dump / "report.md").read_text()
    assert sorted(os.listdir(tmp_path)) == ["dumps"]
    assert cm.report[-1].drift.rel <= 1e-4
    backend = json.loads((dump / folders[-1] / "stats.json").read_text())     # the lowering is a step too
    assert backend["time_s"] > 0 and backend["drift"]["rel_err"] <= 1e-4
    assert re.match(r"ONNX graph: \d+ nodes \(.*Attention \d", backend["notes"][0]), backend["notes"][:1]


# --- capture's node-by-node decomposition (ir/decompose.py) ---------------------------------------------------
class _Residual(nn.Module):
    """What the local decomposition must handle: conv2d, batch_norm, an in-place residual add, F.pad, dropout, flatten,
    and a linear that stays whole."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4 * 64, 5)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        y = self.bn(self.conv(x))
        y += x                                          # in place, on a value nothing reads afterwards
        y = torch.nn.functional.pad(torch.relu(y), (1, 1, 1, 1))
        return self.fc(self.drop(torch.flatten(y, 1)))


def _ops(module) -> dict:
    import collections
    return dict(collections.Counter(str(n.target) for n in module.graph.nodes if n.op == "call_function"))


def test_capture_decomposes_node_by_node_as_the_whole_program_retrace_does():
    """Before: torch.export's training IR (conv2d, batch_norm, add_, pad, dropout, flatten). Expected: the graph
    run_decompositions makes of it, op for op, with the same outputs as eager; the linear stays whole."""
    from graphopt.capture import KEPT_OPS
    from graphopt.ir.decompose import decompose_locally
    torch.manual_seed(0)
    model, x = _Residual().eval(), torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1), model.bn.running_var.uniform_(0.5, 2)
    ep = torch.export.export(model, (x,), strict=False)
    assert {"aten.conv2d.default", "aten.batch_norm.default", "aten.add_.Tensor"} <= set(_ops(ep.graph_module))
    table = torch.export.default_decompositions()
    for op in KEPT_OPS:
        table.pop(op, None)
    local = decompose_locally(ep.module(check_guards=False), dict(table.items()), KEPT_OPS)
    expected = ep.run_decompositions(table).module(check_guards=False)
    assert local is not None and _ops(local) == _ops(expected), (_ops(local), _ops(expected))
    assert "aten.linear.default" in _ops(local) and "aten.add.Tensor" in _ops(local)
    with torch.no_grad():
        torch.testing.assert_close(local(x), model(x), rtol=0, atol=1e-6)
    graph = capture(model, (x,))
    assert _ops(graph.module) == {k.replace("view", "reshape"): v for k, v in _ops(expected).items()}


class _MutatesItsInput(nn.Module):
    def forward(self, x):
        x.add_(1)                                       # the caller's tensor: only functionalization can say this
        return x * 2


def test_a_graph_only_the_whole_program_retrace_can_decompose_is_left_to_it():
    """An in-place op on an input, a torch.cond, or dynamic shapes: decompose_locally says None and capture traces
    the whole program again, with the same results as eager."""
    from graphopt.capture import KEPT_OPS
    from graphopt.ir.decompose import decompose_locally
    table = dict(torch.export.default_decompositions().items())
    x = torch.randn(3, 4)
    ep = torch.export.export(_MutatesItsInput(), (x.clone(),), strict=False)
    assert decompose_locally(ep.module(check_guards=False), table, KEPT_OPS) is None

    class Branchy(nn.Module):
        def forward(self, x):
            return torch.cond(x.sum() > 0, lambda v: torch.nn.functional.pad(v, (1, 1))[:, 1:-1] * 2, lambda v: v - 1,
                              (x,))
    ep = torch.export.export(Branchy(), (x,), strict=False)
    assert decompose_locally(ep.module(check_guards=False), table, KEPT_OPS) is None
    graph = capture(Branchy(), (x,))
    torch.testing.assert_close(graph.module(x), Branchy()(x))
