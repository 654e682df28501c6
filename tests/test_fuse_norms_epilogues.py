"""Norm and epilogue fusions on hand models, with the negative cases that must not fuse."""
import re

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt import zoo
from graphopt.cost import CostModel
from graphopt.passes.fusion.fuse_epilogues import FUSED_MUST_WIN, FuseEpilogues
from conftest import assert_matches, fake_clock


def step(cm, name):
    return next(r for r in cm.report if r.name == name)


# --- norms ---------------------------------------------------------------------------------------
class HandLayerNorm(nn.Module):
    def __init__(self, n=16, spelling="div_sqrt"):
        super().__init__()
        self.w, self.b, self.spelling = nn.Parameter(torch.rand(n) + 0.5), nn.Parameter(torch.randn(n)), spelling

    def forward(self, x):
        d = x - x.mean(-1, keepdim=True)
        var = (d * d).mean(-1, keepdim=True)
        y = d / torch.sqrt(var + 1e-5) if self.spelling == "div_sqrt" else d * torch.rsqrt(var + 1e-5)
        return y * self.w + self.b


class HandRMSNorm(nn.Module):   # as in Llama / T5
    def __init__(self, n=16):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(n) + 0.5)

    def forward(self, x):
        var = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + 1e-6)).to(x.dtype)


@pytest.mark.parametrize("model,op", [(HandLayerNorm(), "aten.layer_norm"), (HandLayerNorm(spelling="rsqrt"), "aten.layer_norm"),
                                      (HandRMSNorm(), "aten.rms_norm")])
def test_written_out_norms_fuse(model, op):
    x = (torch.randn(2, 5, 16) * 3 + 1,)
    cm = graphopt.compile(model.eval(), x)
    assert cm.graph.op_counts() == {op: 1}, step(cm, "fuse_norms").notes
    assert_matches(cm, model, x)


def test_norm_over_another_tensors_statistics_is_not_fused():
    class CrossNorm(nn.Module):
        def forward(self, x, y):
            return x * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)
    x = (torch.randn(2, 16), torch.randn(2, 16))
    cm = graphopt.compile(CrossNorm().eval(), x)
    assert "aten.rms_norm" not in cm.graph.op_counts()
    assert any("another tensor" in n for n in step(cm, "fuse_norms").notes)
    assert_matches(cm, CrossNorm(), x)


def test_t5_and_llama_rmsnorms_fuse():
    for name in ("t5_encoder", "llama"):
        model, inputs = zoo.build(name, size="tiny", batch=2)
        cm = graphopt.compile(model, inputs)
        assert cm.graph.op_counts()["aten.rms_norm"] == 5, name    # 2 layers × 2 + final
        assert_matches(cm, model, inputs)


# --- epilogues -----------------------------------------------------------------------------------
ACTS = {"relu": nn.ReLU(), "relu6": nn.ReLU6(), "silu": nn.SiLU(), "hardswish": nn.Hardswish(),
        "gelu": nn.GELU(), "sigmoid": nn.Sigmoid(), "tanh": nn.Tanh(), "hardsigmoid": nn.Hardsigmoid()}


class ConvAct(nn.Module):
    def __init__(self, act, residual=False, pad=None):
        super().__init__()
        self.conv, self.act, self.residual, self.pad = nn.Conv2d(8, 8, 3, padding=0 if pad else 1), act, residual, pad

    def forward(self, x):
        y = self.conv(F.pad(x, self.pad) if self.pad else x)
        return self.act(y + x if self.residual else y)


def fused_convs() -> list:
    """The default CPU pipeline with conv epilogues always fused (by default the cost model decides)."""
    return [FuseEpilogues("always") if p == "fuse_epilogues" else p
            for p in graphopt.passes.default_pipeline(graphopt.get_target("cpu"))]


@pytest.mark.parametrize("act", sorted(ACTS))
def test_conv_act(act):
    """Every epilogue fuses; those ORT's FusedConv takes (relu, clip, sigmoid, tanh, hardsigmoid) lower to it."""
    model, x = ConvAct(ACTS[act]).eval(), (torch.randn(2, 8, 9, 9),)
    cm = graphopt.compile(model, x, passes=fused_convs())
    assert cm.graph.op_counts() == {"graphopt.conv_act": 1}
    fused = "com.microsoft.FusedConv 1" in cm.report[-1].notes[0]
    assert fused == (act in {"relu", "relu6", "sigmoid", "tanh", "hardsigmoid"}), cm.report[-1].notes[0]
    assert_matches(cm, model, x)


@pytest.mark.parametrize("kw", [{"residual": True}, {"pad": (0, 1, 0, 1)}, {"pad": (1, 1, 1, 1), "residual": True}])
def test_conv_act_absorbs_residual_and_padding(kw):
    model, x = ConvAct(nn.ReLU(), **kw).eval(), (torch.randn(2, 8, 9, 9),)
    cm = graphopt.compile(model, x, passes=fused_convs())
    assert cm.graph.op_counts() == {"graphopt.conv_act": 1}, step(cm, "fuse_epilogues").notes
    assert_matches(cm, model, x)
    if kw.get("residual"):
        assert "com.microsoft.FusedConv 1" in cm.report[-1].notes[0]


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        return y.relu(), y * 2            # the conv's output has a second consumer


def test_epilogue_negative_cases():
    x = (torch.randn(1, 4, 5, 5),)
    model = SharedConv().eval()
    cm = graphopt.compile(model, x, passes=fused_convs())
    assert_matches(cm, model, x)
    assert "graphopt.conv_act" not in cm.graph.op_counts()
    assert any("also used by 1 node(s) outside the fusion" in n for n in step(cm, "fuse_epilogues").notes)


def test_fusion_blocker_on_networkx_view():
    import networkx as nx
    from graphopt.ir import fusion_blocker
    g = nx.DiGraph([("x", "conv"), ("conv", "add"), ("conv", "sig"), ("sig", "add"), ("add", "relu")])
    assert "also used by 1 node(s) outside" in fusion_blocker(g, ["conv", "add", "relu"])
    g = nx.DiGraph([("conv", "add"), ("add", "relu"), ("x", "conv"), ("add", "mid"), ("mid", "relu")])
    assert "outside" in fusion_blocker(g, ["conv", "add", "relu"])
    cycle = nx.DiGraph([("a", "c"), ("a", "b"), ("b", "c")])     # fusing a with c would make it feed itself via b
    assert fusion_blocker(cycle, ["a", "c"]).startswith("%a is also used")
    assert fusion_blocker(cycle, ["b", "c"]) is None


@pytest.mark.parametrize("act", ["gelu", "relu", "silu"])
def test_linear_act(act):
    """linear + gelu (erf) lowers to MatMul + ORT's BiasGelu; the others to MatMul, Add and the activation."""
    model = nn.Sequential(nn.Linear(16, 32), ACTS[act], nn.Linear(32, 8)).eval()
    x = (torch.randn(3, 7, 16),)
    cm = graphopt.compile(model, x)
    assert cm.graph.op_counts() == {"graphopt.linear_act": 1, "aten.linear": 1}
    assert ("com.microsoft.BiasGelu 1" in cm.report[-1].notes[0]) == (act == "gelu"), cm.report[-1].notes[0]
    assert_matches(cm, model, x)


def test_gelu_tanh_lowers_to_fastgelu():
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(approximate="tanh")).eval()
    x = (torch.randn(3, 16),)
    cm = graphopt.compile(model, x)
    assert "com.microsoft.FastGelu" in cm.report[-1].notes[0]
    assert_matches(cm, model, x)


@pytest.mark.parametrize("name,n", [("resnet", 7), ("mobilenet_v2", 18), ("bert", 2)])   # depthwise convs left to ORT
def test_real_models_fuse_epilogues(name, n):
    model, inputs = zoo.build(name, size="tiny", batch=2)
    cm = graphopt.compile(model, inputs, passes=fused_convs())
    assert step(cm, "fuse_epilogues").rewrites == n
    assert_matches(cm, model, inputs)


def test_conv_epilogues_are_kept_only_where_measured_faster(monkeypatch):
    """Timed where ORT compiles the two forms differently (made so here: on ORT 1.32 they compile alike, below)."""
    monkeypatch.setattr(CostModel, "compiled_alike", lambda *a, **k: False)
    model, inputs = zoo.build("resnet", size="tiny", batch=2)
    cm = graphopt.compile(model, inputs)
    notes = step(cm, "fuse_epilogues").notes
    decision = notes[0]
    fused, plain = (float(v) for v in re.findall(r"measured ([\d.e+-]+) ms with graphopt.conv_act, ([\d.e+-]+) ms", decision)[0])
    kept = "graphopt.conv_act" in cm.graph.op_counts()
    assert kept == (fused < FUSED_MUST_WIN * plain) and ("fused" in decision.split(":")[0]) == kept, decision
    assert_matches(cm, model, inputs)
    never = graphopt.compile(model, inputs, passes=[FuseEpilogues("never") if p == "fuse_epilogues" else p
                                                    for p in graphopt.passes.default_pipeline(cm.target)])
    assert "graphopt.conv_act" not in never.graph.op_counts()


class Epilogues(nn.Module):
    """Each epilogue FusedConv takes: clip after an asymmetric zero pad, a residual add + relu, hardsigmoid, sigmoid."""
    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=p) for p in (0, 1, 1, 1))

    def forward(self, x):
        x = F.relu6(self.convs[0](F.pad(x, (0, 2, 0, 2))))
        x = F.relu(self.convs[1](x) + x)
        return torch.sigmoid(self.convs[3](F.hardsigmoid(self.convs[2](x))))


def _ops(model: onnx.ModelProto) -> dict[str, int]:
    return {op: sum(n.op_type == op for n in model.graph.node) for op in ("FusedConv", "Conv", "Clip", "Add")}


def test_the_unfused_lowering_of_conv_act_is_conv_and_its_epilogue_ops():
    """conv_act's other ORT lowering (an ONNX rewrite of the exported model) writes each FusedConv as Conv [+ Add] +
    activation and computes what eager PyTorch does."""
    from graphopt.ops.epilogue import unfused_onnx
    model, x = Epilogues().eval(), torch.randn(2, 8, 9, 9)
    cm = graphopt.compile(model, (x,), passes=fused_convs())
    fused = cm.executable.artifact()
    unfused = unfused_onnx(fused)
    assert _ops(fused) == {"FusedConv": 4, "Conv": 0, "Clip": 0, "Add": 0}, _ops(fused)
    assert _ops(unfused) == {"FusedConv": 0, "Conv": 4, "Clip": 1, "Add": 1}, _ops(unfused)
    assert unfused_onnx(unfused) is None
    onnx.checker.check_model(unfused)
    from graphopt.sessions import ort_session
    (got,) = ort_session(unfused.SerializeToString()).run(None, {unfused.graph.input[0].name: x.numpy()})
    want = model(x).detach().numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("fused_ms", [0.5, 1.5])
def test_the_conv_epilogue_decision_and_the_backend_export_the_graph_once(monkeypatch, fused_ms):
    """Both forms of the decision are timed from one export, and the backend builds the form kept from it: one
    torch.onnx export in the whole compile, whichever form wins (the clock faked both ways)."""
    monkeypatch.setattr(CostModel, "compiled_alike", lambda *a, **k: False)
    answered = fake_clock(monkeypatch, {"always": fused_ms, "never": 1.0})
    exports, export = [], torch.onnx.export
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: exports.append(1) or export(*a, **k))
    model, x = Epilogues().eval(), (torch.randn(2, 8, 9, 9),)
    cm = graphopt.compile(model, x)
    assert answered and len(exports) == 1, (answered, len(exports))
    kept = fused_ms < FUSED_MUST_WIN
    assert ("graphopt.conv_act" in cm.graph.op_counts()) == kept
    assert _ops(cm.executable.artifact())["FusedConv"] == (4 if kept else 0)
    assert_matches(cm, model, x)


def test_conv_epilogues_without_a_fusedconv_activation_are_fused_without_measuring(monkeypatch):
    """silu and hardswish epilogues lower to Conv and the activation's ops either way on ORT: nothing to time."""
    answered = fake_clock(monkeypatch, {"always": 1.0, "never": 1.0})
    model, x = nn.Sequential(nn.Conv2d(8, 8, 3), nn.SiLU(), nn.Conv2d(8, 8, 3), nn.Hardswish()).eval(), \
        (torch.randn(2, 8, 9, 9),)
    cm = graphopt.compile(model, x)
    assert not answered and cm.graph.op_counts().get("graphopt.conv_act") == 2
    assert "without measuring" in step(cm, "fuse_epilogues").notes[0]
    assert_matches(cm, model, x)


def _optimized_ops(model: onnx.ModelProto, tmp_path, name: str) -> list:
    """The nodes (op, activation) ONNX Runtime's own optimizer makes of `model`, read from the file it saves."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.optimized_model_filepath, options.log_severity_level = str(tmp_path / f"{name}.onnx"), 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    saved = onnx.load(str(tmp_path / f"{name}.onnx"))
    return sorted((n.domain, n.op_type, str(sorted((a.name, onnx.helper.get_attribute_value(a)) for a in n.attribute
                                                   if a.name.startswith("activation")))) for n in saved.graph.node)


def test_conv_epilogues_onnx_runtime_compiles_alike_are_left_to_it_untimed(monkeypatch, tmp_path):
    """Where ORT's optimizer makes the same kernels of FusedConv and of Conv + activation, nothing is timed, the model
    keeps standard ONNX ops, and it is exported once. ORT's own optimized models are the reference."""
    model, x = Epilogues().eval(), (torch.randn(2, 8, 9, 9),)
    fused = graphopt.compile(model, x, passes=fused_convs()).executable.artifact()
    answered = fake_clock(monkeypatch, {"always": 1.0, "never": 1.0})
    exports, export = [], torch.onnx.export
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: exports.append(1) or export(*a, **k))
    cm = graphopt.compile(model, x)
    artifact = cm.executable.artifact()
    alike = _optimized_ops(fused, tmp_path, "fused") == _optimized_ops(artifact, tmp_path, "unfused")
    assert alike == ("same kernels" in step(cm, "fuse_epilogues").notes[0]), step(cm, "fuse_epilogues").notes
    if alike:
        assert not answered and len(exports) == 1 and "graphopt.conv_act" not in cm.graph.op_counts()
        assert _ops(artifact)["FusedConv"] == 0
    assert_matches(cm, model, x)


def test_graphs_that_compile_differently_are_not_alike():
    """relu and sigmoid after the same conv: ORT's optimized models differ, and compiled_alike says so; a graph and
    itself (an identity rewrite of its lowering) are alike."""
    x = (torch.randn(1, 8, 9, 9),)
    conv = nn.Conv2d(8, 8, 3).eval()
    graphs = {act.__class__.__name__: graphopt.compile(nn.Sequential(conv, act).eval(), x, passes=[]).graph
              for act in (nn.ReLU(), nn.Sigmoid())}
    cost = CostModel(graphopt.get_target("cpu"), "ort")
    assert not cost.compiled_alike(graphs, x)
    assert cost.compiled_alike({"a": graphs["ReLU"], "b": graphs["ReLU"]}, x, derived={"b": lambda model: None})
