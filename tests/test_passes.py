"""Each pass on small hand models: it rewrites what it should, leaves alone what it must, and the
compiled model still matches eager."""
import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.passes import PassContext, resolve
from graphopt.capture import capture
from graphopt.ir import graph_text
from conftest import assert_matches


def run_passes(model, inputs, names):
    graph = capture(model, inputs)
    target = graphopt.get_target("cpu")
    results = [p.run(graph, PassContext(target, inputs)) for p in resolve(names, target)]
    return graph, results


# --- fold_batchnorm ------------------------------------------------------------------------------
def _bn(c, d=2):
    bn = (nn.BatchNorm1d if d == 1 else nn.BatchNorm2d)(c)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 2), bn.bias.uniform_(-1, 1)
    return bn


class ConvBN(nn.Module):
    def __init__(self, bias=True, transposed=False, groups=1):
        super().__init__()
        conv = nn.ConvTranspose2d if transposed else nn.Conv2d
        self.conv = conv(4, 8, 3, padding=1, bias=bias, groups=groups)
        self.bn = _bn(8)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


@pytest.mark.parametrize("kw", [{}, {"bias": False}, {"transposed": True}, {"groups": 2}])
def test_fold_batchnorm_conv(kw):
    model, x = ConvBN(**kw).eval(), (torch.randn(2, 4, 8, 8),)
    graph, (res,) = run_passes(model, x, ["fold_batchnorm"])
    assert res.rewrites == 1
    assert "aten._native_batch_norm_legit_no_training" not in graph.op_counts()
    assert_matches(graphopt.compile(model, x, passes=["fold_batchnorm"]), model, x)


def test_fold_batchnorm_linear():
    model = nn.Sequential(nn.Linear(6, 5), _bn(5, d=1)).eval()
    x = (torch.randn(3, 6),)
    _, (res,) = run_passes(model, x, ["fold_batchnorm"])
    assert res.rewrites == 1
    assert_matches(graphopt.compile(model, x, passes=["fold_batchnorm"]), model, x)


class BNNotAfterConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.bn2 = nn.Conv2d(4, 4, 1), _bn(4), _bn(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y, self.bn2(torch.relu(x))   # conv output used twice; bn2 after relu


def test_fold_batchnorm_leaves_unfoldable_and_says_why():
    model, x = BNNotAfterConv().eval(), (torch.randn(2, 4, 5, 5),)
    graph, (res,) = run_passes(model, x, ["fold_batchnorm"])
    assert res.rewrites == 0
    assert graph.op_counts()["aten._native_batch_norm_legit_no_training"] == 2
    assert any("also used by" in n for n in res.notes) and any("not a convolution" in n for n in res.notes)
    assert_matches(graphopt.compile(model, x), model, x)


def test_user_weights_untouched():
    model, x = ConvBN().eval(), (torch.randn(1, 4, 8, 8),)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graphopt.compile(model, x)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not model.training


# --- fold_constants ------------------------------------------------------------------------------
class ConstSubgraph(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))
        self.register_buffer("scale", torch.tensor(3.0))
        self.register_buffer("row", torch.randn(1, 8))

    def forward(self, x):
        w = (self.w.t() * self.scale).softmax(-1)   # depends on weights only
        big = self.row.expand(x.shape[0], 8)         # folding would store 48K elements read from 8
        return x @ w + big


def test_fold_constants():
    model, x = ConstSubgraph().eval(), (torch.randn(6000, 8),)
    graph, (res,) = run_passes(model, x, ["fold_constants"])
    counts = graph.op_counts()
    assert res.rewrites >= 1 and "aten._softmax" not in counts and "aten.permute" not in counts
    assert "aten.expand" in counts and any("would store" in n for n in res.notes)
    assert_matches(graphopt.compile(model, x, passes=["fold_constants"]), model, x)


# --- remove_noops --------------------------------------------------------------------------------
class Noops(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        y = self.drop(x).to(x.dtype).reshape(x.shape) * 1
        y = y[:, : x.shape[1]] + 0
        z = y.reshape(x.shape[0], -1).to(torch.float64)   # real reshape and real cast stay
        return z.contiguous()


def test_remove_noops():
    model, x = Noops().eval(), (torch.randn(3, 4, 5),)
    graph, (res,) = run_passes(model, x, ["remove_noops"])
    counts = graph.op_counts()
    assert res.rewrites >= 3
    assert counts.get("aten.reshape") == 1 and counts.get("aten._to_copy") == 1
    assert not {"aten.mul.Tensor", "aten.add.Tensor", "aten.slice.Tensor", "aten.clone"} & set(counts)
    assert_matches(graphopt.compile(model, x, passes=["remove_noops"]), model, x)


def test_remove_noops_keeps_dtype_promotion():
    class IntPlusZero(nn.Module):
        def forward(self, x):
            return x + 0.0     # int → float: not an identity
    model, x = IntPlusZero().eval(), (torch.arange(6).reshape(2, 3),)
    graph, (res,) = run_passes(model, x, ["remove_noops"])
    assert res.rewrites == 0
    assert graphopt.compile(model, x)(*x).dtype == torch.float32


# --- dce -----------------------------------------------------------------------------------------
class DeadBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x)


def test_dce_removes_unused_nodes_and_weights():
    # torch.export already drops dead code, so leave some behind the way a rewrite would
    model, x = DeadBranch().eval(), (torch.randn(2, 4),)
    graph = capture(model, x)
    (inp,), out = graph.inputs, graph.outputs[0]
    with graph.fx.inserting_before(out):
        w = graph.add_constant(model.b.weight, "b_weight", before=out)
        dead = graph.fx.call_function(torch.ops.aten.linear.default, (inp, w))
        graph.fx.call_function(torch.ops.aten.relu.default, (dead,))
    graph.tidy()
    assert graph.op_counts() == {"aten.linear": 2, "aten.relu": 1}
    res = resolve(["dce"], graphopt.get_target("cpu"))[0].run(graph, PassContext(graphopt.get_target("cpu"), x))
    assert res.rewrites == 2 and graph.op_counts() == {"aten.linear": 1}
    assert "b_weight" not in graph_text(graph) and not hasattr(graph.module, "_graphopt_b_weight")
    torch.testing.assert_close(graph.run(*x), model(*x))


def test_pass_objects_and_registry():
    from graphopt.passes import available
    assert {"dce", "fold_constants", "fold_batchnorm", "remove_noops"} <= set(available())
    model, x = DeadBranch().eval(), (torch.randn(2, 4),)
    cm = graphopt.compile(model, x, passes=[resolve(["dce"], graphopt.get_target("cpu"))[0]])
    assert [r.name for r in cm.report] == ["captured", "dce", "backend-ort"]
