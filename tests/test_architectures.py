"""No silent wrong output (issue 36): architectures beyond the zoo against eager, the default check of every build
catching a broken lowering, and the report drawing a pass that wrote NaN."""
import json

import pytest
import torch

import graphopt
import graphopt.codegen.relax as relax_codegen
from graphopt.errors import VerificationError
from graphopt.passes import Pass, PassResult

from conftest import assert_matches, need_module

transformers = need_module("transformers")


def tiny_falcon():
    config = transformers.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, use_cache=False,
                                       vocab_size=1000)
    return transformers.FalconForCausalLM(config).eval(), (torch.randint(0, 1000, (2, 32)),)


def test_falcon_on_tvm_matches_eager():
    """Falcon reads its shared key and value heads as qkv[..., [-2], :]: a negative index TVM's gather read out of
    bounds (NaN logits) until graphopt wrapped it as torch does."""
    need_module("tvm")
    model, args = tiny_falcon()
    assert_matches(graphopt.compile(model, args, backend="tvm"), model, args)


@pytest.mark.parametrize("backend", ["ort", "tvm"])
def test_negative_indices_against_eager(backend):
    """Negative tensor indices on one axis (a take) and on two (zipped indices), as torch wraps them."""
    if backend == "tvm":
        need_module("tvm")

    class Pick(torch.nn.Module):
        def forward(self, x):
            return x[:, :, torch.tensor([-1, 0, -3])] * 2, x[torch.tensor([-1, 0]), torch.tensor([1, -2])]

    x = torch.randn(2, 5, 6)
    assert_matches(graphopt.compile(Pick().eval(), (x,), backend=backend), Pick(), (x,))


def broken_converter(op, lowering):
    """relax_convert_map with `op` lowered by `lowering(x)` instead: a deliberately broken TVM lowering."""
    original = relax_codegen.relax_convert_map

    def convert_map(*args, **kwargs):
        return {**original(*args, **kwargs),
                op: lambda node, importer: importer.block_builder.emit(lowering(importer.env[node.args[0]]))}
    return convert_map


def small_mlp():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    return model, (torch.randn(3, 8),)


@pytest.mark.parametrize("wrong, message", [
    ("log", "returns NaN in output 0"),          # log of the negative pre-activations: NaN where eager is finite
    ("abs", "away from eager PyTorch"),          # |x| for relu(x): finite, and wrong
])
def test_default_check_catches_a_broken_lowering(monkeypatch, wrong, message):
    need_module("tvm")
    from tvm import relax
    monkeypatch.setattr(relax_codegen, "relax_convert_map", broken_converter("relu.default", getattr(relax.op, wrong)))
    model, args = small_mlp()
    with pytest.raises(VerificationError, match=f"tvm build.*{message}.*check=False"):
        graphopt.compile(model, args, backend="tvm", passes=["dce"])
    built = graphopt.compile(model, args, backend="tvm", passes=["dce"], check=False)   # the user's way out
    with torch.no_grad():
        assert not torch.allclose(built(*args), model(*args), atol=1e-3)   # it really is broken


def test_default_check_accepts_lossy_builds_it_cannot_judge():
    """int8 moves the outputs by design: only non-finite outputs are refused there."""
    model, args = small_mlp()
    cm = graphopt.compile(model, args, quantize="int8", calibration=[(torch.randn(3, 8),) for _ in range(2)])
    assert torch.isfinite(cm(*args)).all()


class WriteNaN(Pass):
    """Multiplies the first ReLU's output by NaN."""
    name, summary, phase = "write_nan", "a broken pass for the tests", "rewrite"

    def run(self, graph, ctx):
        result = PassResult()
        relu = next(n for n in graph.ops() if "relu" in str(n.target))
        with graph.fx.inserting_after(relu):
            poisoned = graph.fx.call_function(torch.ops.aten.mul.Tensor, (relu, float("nan")))
        relu.replace_all_uses_with(poisoned, delete_user_cb=lambda user: user is not poisoned)
        poisoned.meta = dict(relu.meta)
        result.did(f"{relu.name} times NaN")
        return result


def test_report_draws_a_pass_that_wrote_nan(tmp_path):
    model, args = small_mlp()
    with pytest.raises(VerificationError, match="returns NaN"):   # the build is refused, after the report is written
        graphopt.compile(model, args, passes=[WriteNaN(), "dce"], dump_dir=tmp_path)
    graphopt.compile(model, args, passes=[WriteNaN(), "dce"], dump_dir=tmp_path / "unchecked", check=False)
    for folder in (tmp_path, tmp_path / "unchecked"):
        steps = json.loads((folder / "report.json").read_text())["steps"]
        assert [s["name"] for s in steps][:2] == ["captured", "write_nan"]
        assert steps[0]["drift"]["rel_err"] == 0 and steps[1]["drift"]["rel_err"] == float("inf")
        page = (folder / "report.html").read_text()
        assert "NaN / ∞" in page                        # the ceiling the non-finite steps sit on
        assert 'class="bad"' in page                     # drawn as over the tolerance


@pytest.mark.parametrize("backend", ["ort", "tvm"])
def test_kv_cache_outputs_as_configured_by_default(backend):
    """use_cache=True (transformers' default): the DynamicCache's keys and values are outputs, returned as a
    DynamicCache again."""
    if backend == "tvm":
        need_module("tvm")
    model = transformers.GPT2Model(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=500)).eval()
    args = (torch.randint(0, 500, (2, 16)),)
    cm = graphopt.compile(model, args, backend=backend)
    got, want = cm(*args), model(*args)
    assert isinstance(got.past_key_values, transformers.DynamicCache)
    assert len(got.past_key_values.layers) == 2
    for g, w in zip(got.past_key_values.layers, want.past_key_values.layers):
        torch.testing.assert_close(g.keys, w.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(g.values, w.values, atol=1e-5, rtol=1e-4)
    assert_matches(cm, model, args)


@pytest.mark.parametrize("backend", ["ort", "tvm"])
def test_dynamic_batch_with_keyword_inputs(backend):
    if backend == "tvm":
        need_module("tvm")
    model = transformers.BertModel(transformers.BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                                           intermediate_size=128, vocab_size=500)).eval()

    def batch(b):
        mask = torch.ones(b, 16, dtype=torch.long)
        mask[0, 10:] = 0
        return {"input_ids": torch.randint(0, 500, (b, 16)), "attention_mask": mask}
    cm = graphopt.compile(model, batch(2), dynamic_shapes="batch", backend=backend)
    for b in (1, 3):
        inputs = batch(b)
        with torch.no_grad():
            want = model(**inputs).last_hidden_state
        torch.testing.assert_close(cm(**inputs).last_hidden_state, want, atol=1e-4, rtol=1e-4)


class Unique(torch.nn.Module):
    def forward(self, x):
        return torch.unique(x) * 2


def test_data_dependent_shapes():
    """ONNX Runtime runs an output whose size depends on the data (its Unique op); TVM's frontend has no converter:
    a clear error naming the op and the module."""
    x = torch.tensor([1.0, 2.0, 2.0, 5.0])
    cm = graphopt.compile(Unique().eval(), (x,), backend="ort")
    other = torch.tensor([3.0, 3.0, 1.0, 7.0])    # three distinct values where the example had three too, but others
    torch.testing.assert_close(cm(other), torch.unique(other) * 2)
    torch.testing.assert_close(cm(torch.tensor([4.0, 4.0, 4.0, 4.0])), torch.tensor([8.0]))
    need_module("tvm")
    with pytest.raises(graphopt.errors.UnsupportedError, match=r"_unique2.*top module.*Unique.*backend='ort'"):
        graphopt.compile(Unique().eval(), (x,), backend="tvm")


def test_export_to_a_folder_that_holds_no_files(tmp_path):
    cm = graphopt.compile(*small_mlp())
    with pytest.raises(graphopt.errors.InputError, match="cannot create a file in '/proc'"):
        cm.export_onnx("/proc/x.onnx")


# --- mixture of experts --------------------------------------------------------------------------------------------
def routed_experts(x, index, weights, up, down, up_bias, down_bias, act, gated):
    """An independent reference: each token, each of its k choices, through that expert with torch.nn.functional."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(index.shape[1]):
            e = int(index[t, j])
            h = torch.nn.functional.linear(x[t], up[e], None if up_bias is None else up_bias[e])
            if gated:
                gate, lin = h.chunk(2)
                h = act(gate) * lin
            else:
                h = act(h)
            out[t] += weights[t, j] * torch.nn.functional.linear(h, down[e], None if down_bias is None else down_bias[e])
    return out


class Experts(torch.nn.Module):
    """A router and graphopt::moe_experts, as capture makes of a transformers experts module."""

    def __init__(self, gated: bool, bias: bool, act: str, experts=4, hidden=16, inner=24, k=2):
        super().__init__()
        self.router = torch.nn.Linear(hidden, experts, bias=False)
        self.up = torch.nn.Parameter(torch.randn(experts, inner * (2 if gated else 1), hidden) / 4)
        self.down = torch.nn.Parameter(torch.randn(experts, hidden, inner) / 4)
        self.up_bias = torch.nn.Parameter(torch.randn(experts, self.up.shape[1])) if bias else None
        self.down_bias = torch.nn.Parameter(torch.randn(experts, hidden)) if bias else None
        self.gated, self.act, self.k = gated, act, k

    def route(self, x):
        weights, index = torch.topk(torch.softmax(self.router(x), -1), self.k)
        return index, weights / weights.sum(-1, keepdim=True)

    def forward(self, x):
        index, weights = self.route(x)
        return torch.ops.graphopt.moe_experts(x, index, weights, self.up, self.down, self.up_bias, self.down_bias,
                                              self.act, self.gated)


@pytest.mark.parametrize("backend", ["ort", "tvm"])
@pytest.mark.parametrize("gated, bias, act", [(True, False, "silu"), (False, True, "gelu")])
def test_moe_experts_op_against_a_per_token_loop(backend, gated, bias, act):
    if backend == "tvm":
        need_module("tvm")
    model, x = Experts(gated, bias, act).eval(), torch.randn(12, 16)
    with torch.no_grad():
        index, weights = model.route(x)
        want = routed_experts(x, index, weights, model.up, model.down, model.up_bias, model.down_bias,
                              {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu}[act], gated)
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-4)   # the op's reference
    cm = graphopt.compile(model, (x,), backend=backend)
    assert cm.graph.op_counts().get("graphopt.moe_experts") == 1
    torch.testing.assert_close(cm(x), want, atol=1e-5, rtol=1e-4)
    other = torch.randn(12, 16)    # other tokens route to other experts
    with torch.no_grad():
        torch.testing.assert_close(cm(other), model(other), atol=1e-5, rtol=1e-4)


def tiny_moe(name):
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2, vocab_size=500)
    if name == "mixtral":
        return transformers.MixtralForCausalLM(transformers.MixtralConfig(num_local_experts=4, **common)).eval()
    return transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        num_experts=4, moe_intermediate_size=64, shared_expert_intermediate_size=64, **common)).eval()


@pytest.mark.parametrize("backend", ["ort", "tvm"])
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_moe_models_match_eager(name, backend):
    """Their experts become graphopt::moe_experts through transformers' experts interface; the configs come back."""
    if backend == "tvm":
        need_module("tvm")
    model, args = tiny_moe(name), (torch.randint(0, 500, (2, 16)),)
    implementation = model.config._experts_implementation
    cm = graphopt.compile(model, args, backend=backend)
    assert cm.graph.op_counts().get("graphopt.moe_experts") == 2          # one per layer
    assert "grouped_mm" not in str(cm.graph.op_counts()) and "histc" not in str(cm.graph.op_counts())
    assert model.config._experts_implementation == implementation        # the user's model as it was
    assert_matches(cm, model, args)
    other = (torch.randint(0, 500, (2, 16)),)
    assert_matches(cm, model, other)


class LoopExperts(torch.nn.Module):
    """A mixture of experts as users write it by hand: a loop over experts, tokens picked with torch.where."""

    def __init__(self, experts=4, hidden=16):
        super().__init__()
        self.router = torch.nn.Linear(hidden, experts)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden) for _ in range(experts))

    def forward(self, x):
        weights, index = torch.topk(torch.softmax(self.router(x), -1), 2)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(index == e)
            out = out.index_add(0, token, expert(x[token]) * weights[token, slot, None])
        return out


def test_loop_written_moe_runs_on_ort_with_data_dependent_shapes():
    model, x = LoopExperts().eval(), torch.randn(10, 16)
    cm = graphopt.compile(model, (x,), backend="ort")
    for batch in (x, torch.randn(10, 16)):
        with torch.no_grad():
            torch.testing.assert_close(cm(batch), model(batch), atol=1e-5, rtol=1e-4)
