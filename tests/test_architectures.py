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
