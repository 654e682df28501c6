"""Passes one by one, as TVM tests its transforms: a small captured graph (its text checked as `Before`), one
pass run through the manager's chores, the text it must leave (`Expected`), and the rewritten graph run in
PyTorch against the eager module. Plus the pieces every pass and option shares: Pass.nodes, placement by phase,
the one calibration check."""
import textwrap

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.capture import capture
from graphopt.errors import InputError
from graphopt.ir import graph_text
from graphopt.numerics import flat_tensors
from graphopt.options import check_calibration
from graphopt.passes import Pass, PassContext, PassManager, resolve, with_options

CPU = graphopt.get_target("cpu")


def transform(model: nn.Module, inputs: tuple, name: str, before: str, expected: str):
    """Capture `model`, check its text is `before`, run pass `name`, check the text is `expected` and the graph
    still computes what the eager module does."""
    graph = capture(model.eval(), inputs)
    assert graph_text(graph).strip() == textwrap.dedent(before).strip()
    PassManager(resolve([name], CPU)).run(graph, PassContext(CPU, inputs))
    assert graph_text(graph).strip() == textwrap.dedent(expected).strip()
    with torch.no_grad():
        torch.testing.assert_close(flat_tensors(graph.run(*inputs))[0], model(*inputs), rtol=1e-5, atol=1e-5)
    return graph


class Identities(nn.Module):
    def forward(self, x):
        return torch.relu(x.contiguous() * 1.0 + 0)


def test_remove_noops():
    transform(Identities(), (torch.randn(2, 3),), "remove_noops", """
        graph(%x: f32[2,3]) {
          %mul = aten.mul.Tensor(%x, 1) : f32[2,3]
          %add = aten.add.Tensor(%mul, 0) : f32[2,3]
          %relu = aten.relu(%add) : f32[2,3]
          return [%relu]
        }
        # 0 weights, 0 elements""", """
        graph(%x: f32[2,3]) {
          %relu = aten.relu(%x) : f32[2,3]
          return [%relu]
        }
        # 0 weights, 0 elements""")


class WrittenOutNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.rand(8)), nn.Parameter(torch.rand(8))

    def forward(self, x):
        c = x - x.mean(-1, keepdim=True)
        return c / torch.sqrt((c * c).mean(-1, keepdim=True) + 1e-5) * self.w + self.b


def test_fuse_norms():
    transform(WrittenOutNorm(), (torch.randn(2, 8),), "fuse_norms", """
        graph(%x: f32[2,8]) {
          %mean = aten.mean.dim(%x, [-1], True) : f32[2,1]
          %sub = aten.sub.Tensor(%x, %mean) : f32[2,8]
          %mul = aten.mul.Tensor(%sub, %sub) : f32[2,8]
          %mean_1 = aten.mean.dim(%mul, [-1], True) : f32[2,1]
          %add = aten.add.Tensor(%mean_1, 1e-05) : f32[2,1]
          %sqrt = aten.sqrt(%add) : f32[2,1]
          %div = aten.div.Tensor(%sub, %sqrt) : f32[2,8]
          %mul_1 = aten.mul.Tensor(%div, @w) : f32[2,8]
          %add_1 = aten.add.Tensor(%mul_1, @b) : f32[2,8]
          return [%add_1]
        }
        # 2 weights, 16 elements""", """
        graph(%x: f32[2,8]) {
          %layer_norm_default = aten.layer_norm(%x, [8], @w, @b, 1e-05) : f32[2,8]
          return [%layer_norm_default]
        }
        # 2 weights, 16 elements""")


class ConstantWeightMath(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.rand(4, 4))

    def forward(self, x):
        return x @ (self.w.t() * 2)


def test_fold_constants():
    graph = transform(ConstantWeightMath(), (torch.randn(2, 4),), "fold_constants", """
        graph(%x: f32[2,4]) {
          %permute = aten.permute(@w, [1, 0]) : f32[4,4]
          %mul = aten.mul.Tensor(%permute, 2) : f32[4,4]
          %matmul = aten.matmul(%x, %mul) : f32[2,4]
          return [%matmul]
        }
        # 1 weights, 16 elements""", """
        graph(%x: f32[2,4]) {
          %matmul = aten.matmul(%x, @_graphopt_mul) : f32[2,4]
          return [%matmul]
        }
        # 1 weights, 16 elements""")
    folded = graph.constant(next(n for n in graph.fx.nodes if n.op == "get_attr"))
    assert isinstance(folded, torch.Tensor) and folded.shape == (4, 4)


class DeadLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        self.b(x)
        return self.a(x)


def test_dce_drops_weights_nothing_reads():
    transform(DeadLinear(), (torch.randn(2, 4),), "dce", """
        graph(%x: f32[2,4]) {
          %linear_1 = aten.linear(%x, @a.weight, @a.bias) : f32[2,4]
          return [%linear_1]
        }
        # 4 weights, 40 elements""", """
        graph(%x: f32[2,4]) {
          %linear_1 = aten.linear(%x, @a.weight, @a.bias) : f32[2,4]
          return [%linear_1]
        }
        # 2 weights, 20 elements""")


class WrittenOutAttention(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1) @ v


def test_fuse_attention():
    transform(WrittenOutAttention(), tuple(torch.randn(2, 4, 16, 8) for _ in range(3)), "fuse_attention", """
        graph(%q: f32[2,4,16,8], %k: f32[2,4,16,8], %v: f32[2,4,16,8]) {
          %permute = aten.permute(%k, [0, 1, 3, 2]) : f32[2,4,8,16]
          %matmul = aten.matmul(%q, %permute) : f32[2,4,16,16]
          %mul = aten.mul.Tensor(%matmul, 0.25) : f32[2,4,16,16]
          %_softmax = aten._softmax(%mul, -1, False) : f32[2,4,16,16]
          %matmul_1 = aten.matmul(%_softmax, %v) : f32[2,4,16,8]
          return [%matmul_1]
        }
        # 0 weights, 0 elements""", """
        graph(%q: f32[2,4,16,8], %k: f32[2,4,16,8], %v: f32[2,4,16,8]) {
          %permute_default = aten.permute(%q, [0, 2, 1, 3]) : f32[2,16,4,8]
          %flatten_using_ints = aten.flatten.using_ints(%permute_default, 2, 3) : f32[2,16,32]
          %permute_default_1 = aten.permute(%k, [0, 2, 1, 3]) : f32[2,16,4,8]
          %flatten_using_ints_1 = aten.flatten.using_ints(%permute_default_1, 2, 3) : f32[2,16,32]
          %permute_default_2 = aten.permute(%v, [0, 2, 1, 3]) : f32[2,16,4,8]
          %flatten_using_ints_2 = aten.flatten.using_ints(%permute_default_2, 2, 3) : f32[2,16,32]
          %attention_default = graphopt.attention(%flatten_using_ints, %flatten_using_ints_1, %flatten_using_ints_2, None, 4, 0.25, False) : f32[2,16,32]
          %unflatten_int = aten.unflatten.int(%attention_default, 2, [4, 8]) : f32[2,16,4,8]
          %permute_default_3 = aten.permute(%unflatten_int, [0, 2, 1, 3]) : f32[2,4,16,8]
          return [%permute_default_3]
        }
        # 0 weights, 0 elements""")


# --- what every pass and option shares -------------------------------------------------------------------
def test_pass_nodes_yields_matching_calls_and_skips_what_the_loop_erased():
    graph = capture(Identities().eval(), (torch.randn(2, 3),))
    aten = torch.ops.aten
    assert [n.name for n in Pass.nodes(graph, aten.mul.Tensor, aten.add.Tensor)] == ["mul", "add"]
    seen = []
    for node in Pass.nodes(graph):
        seen.append(node.name)
        if node.name == "mul":     # erase the add (and its use) before the loop reaches it
            add = next(iter(node.users))
            add.replace_all_uses_with(node)
            graph.fx.erase_node(add)
    assert seen == ["mul", "relu"]


def test_options_place_their_passes_by_phase_pruning_before_quantization():
    options = [graphopt.Quantization("int8"), graphopt.Sparsity("structured", ratio=0.5),
               graphopt.LayerSkip(0.01)]
    names = [p.name for p in with_options(resolve("default", CPU), options)]
    assert names.index("shrink_inert") < names.index("sparsify") < names.index("quantize") \
        < names.index("layer_skip") < names.index("fuse_epilogues")
    # an exact pass the pipeline already runs is not added twice
    assert [p.name for p in with_options(resolve("default", CPU), [graphopt.Sparsity()])].count("shrink_inert") == 1


def test_the_calibration_check_names_the_option_that_needs_it():
    with pytest.raises(InputError, match=r"layer_skip=LayerSkip\(budget=0.01, metric='cosine', replace=True\) needs calibration"):
        check_calibration([graphopt.Quantization("int8-dynamic"), graphopt.LayerSkip(0.01)], [])
    with pytest.raises(InputError, match="at least 2 calibration batches"):
        check_calibration([graphopt.EarlyExit(0.01)], [((torch.randn(1),), {})])
    check_calibration([graphopt.Quantization("int8-dynamic"), graphopt.Sparsity()], [])   # neither needs any


@pytest.mark.parametrize("make", [lambda: graphopt.Quantization("auto", budget=1.5),
                                  lambda: graphopt.Sparsity("structured", budget=0),
                                  lambda: graphopt.LayerSkip(budget=float("nan")),
                                  lambda: graphopt.EarlyExit(budget=True)])
def test_every_family_checks_its_fractions_the_same_way(make):
    with pytest.raises(InputError, match="give a number strictly between 0 and 1"):
        make()
