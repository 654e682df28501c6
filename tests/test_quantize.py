"""Quantization lowering: int8 static (QDQ → ORT integer kernels), int8 dynamic, int4 weight-only,
the mixed-precision planner, calibration, errors, and the Relax lowering of the same graphs.

Thresholds: CNN output SQNR ≥ 25 dB (int8); BERT token cosine ≥ 0.999 (int8 dynamic) / 0.98 (int4);
MiniLM (real weights) sentence-embedding cosine ≥ 0.99 mean and pair-similarity Spearman ≥ 0.98."""
import collections
import re

import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from conftest import held_out_cosine_error, need_module
from graphopt import InputError, UnsupportedError, VerificationError, bench, get_target, zoo
from graphopt.passes import Pass, PassResult
from graphopt.numerics import flat_tensors
from graphopt.passes.pipelines import default_pipeline
from graphopt.passes.quant.observers import Observer, quantization_mse
from graphopt.passes.quant.quantize import Quantize, QuantOptions


def sqnr_db(ref, out):
    return 10 * torch.log10(ref.square().sum() / (ref - out).square().sum()).item()


def calibration_for(args, n=4, vocab=1000):
    return [tuple(torch.randn_like(t) if t.is_floating_point() else torch.randint(0, vocab, t.shape) for t in args)
            for _ in range(n)]


def ort_kernels(cm, tmp_path) -> collections.Counter:
    """The op types ONNX Runtime actually runs after its own graph optimizations."""
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(cm.executable.artifact().SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node)


@pytest.fixture(scope="module")
def resnet():
    return zoo.build("resnet", size="tiny")


def int8_convs(cm) -> int:
    """Convolutions of the compiled graph whose weight is an int8 tensor dequantized (graphopt's QDQ form)."""
    return sum(n.target is torch.ops.aten.convolution.default and n.args[1].op == "call_function"
               and "dequantize" in str(n.args[1].target) for n in cm.graph.fx.nodes)


def quantized_layers_are_faster(monkeypatch):
    """quantize='auto' times its plans; on this small CNN float can measure fastest, the plan then quantizes nothing
    and a budget check passes by doing nothing. Faked here: each int8 layer saves 0.01 ms, so the plan quantizes
    what the budget allows."""
    from graphopt.passes.quant import plan as planner
    monkeypatch.setattr(planner, "_latency_ms", lambda graph, ctx, p: 1.0 - 0.01 * sum(v != "float" for v in p.values()))


def test_static_int8_cnn_runs_integer_kernels_with_25db(resnet, tmp_path):
    model, args = resnet
    cm = graphopt.compile(model, args, quantize="int8", calibration=calibration_for(args))
    x = torch.randn_like(args[0])                        # held out: not a calibration batch
    ref, out = flat_tensors(model(x)), flat_tensors(cm(x))
    assert min(sqnr_db(r, o) for r, o in zip(ref, out)) >= 25
    kernels = ort_kernels(cm, tmp_path)
    assert kernels["QLinearConv"] == 9 and kernels["Conv"] == 0, kernels     # every conv runs in int8
    assert kernels["QLinearAdd"] >= 1, kernels                                # residual adds too
    # the benchmarks' kernel profile reads each int8 conv's work off ORT's optimized graph: the model's own MACs
    macs = []
    hooks = [m.register_forward_hook(lambda m, i, o: macs.append(o.numel() * m.weight[0].numel()))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    model(x)
    for h in hooks:
        h.remove()
    name = cm.executable.session.get_inputs()[0].name
    convs = [n for n in bench.node_profile(cm.executable.artifact().SerializeToString(), {name: x.numpy()},
                                           tuple(cm.executable.disabled_optimizers), runs=2) if n.kind]
    assert sorted(n.macs for n in convs) == sorted(macs) and all(n.ms > 0 for n in convs), convs
    assert {n.kind for n in convs} == {"1×1 conv", "k×k conv"}, convs
    # ORT computes what the IR says, up to rounding: its integer kernels round accumulators where the IR rounds
    # floats, and a flipped step cascades through 9 layers (measured 30-39 dB here with ORT 1.31 and 1.32)
    assert sqnr_db(flat_tensors(cm.graph.run(x))[0], out[0]) >= 25


def test_dynamic_int8_and_int4_linears(tmp_path):
    model, args = zoo.build("bert", size="tiny", seq=16)
    ref = model(*args).last_hidden_state
    for mode, kernel, min_cos in [("int8-dynamic", "MatMulIntegerToFloat", 0.999), ("int4-weight", "MatMulNBits", 0.98)]:
        cm = graphopt.compile(model, args, quantize=mode)
        ops = collections.Counter(n.op_type for n in cm.executable.artifact().graph.node)
        assert ops[kernel] == 12 and ops["MatMul"] == 0, ops
        if mode == "int8-dynamic":   # each layer's Q, K, V read one tensor, quantized once as ORT's tool does;
            assert ops["DynamicQuantizeLinear"] == 2 * 4, ops    # its O, FFN-in, FFN-out one each
            ran = ort_kernels(cm, tmp_path)                     # ORT fuses those with one reader
            assert ran["DynamicQuantizeMatMul"] == 2 * 3 and ran["MatMulIntegerToFloat"] == 2 * 3, ran
        cos = F.cosine_similarity(cm(*args).last_hidden_state.reshape(-1, 64), ref.reshape(-1, 64)).mean()
        assert cos >= min_cos, (mode, cos)


@pytest.mark.parametrize("mode", ["int8-dynamic", "int8"])
def test_minilm_real_weights_keep_embeddings_and_ranking(mode):
    model, tok = zoo.minilm()
    texts = zoo.sentences(320)
    batches = [tok(texts[i:i + 32], padding="max_length", max_length=32, truncation=True, return_tensors="pt")
               for i in range(0, len(texts), 32)]
    batches = [(b["input_ids"], b["attention_mask"]) for b in batches]
    cm = graphopt.compile(model, batches[0], quantize=mode, calibration=batches[:4])   # static: SmoothQuant + MSE
    held_out = batches[4:]                                                              # 192 sentences
    with torch.no_grad():
        ref = torch.cat([zoo.mean_pool(model(*b).last_hidden_state, b[1]) for b in held_out])
    out = torch.cat([zoo.mean_pool(cm(*b).last_hidden_state, b[1]) for b in held_out])
    assert F.cosine_similarity(ref, out).mean() >= 0.99
    i, j = torch.triu_indices(len(ref), len(ref), 1)
    sims = torch.stack([(ref[i] * ref[j]).sum(1), (out[i] * out[j]).sum(1)])
    ranks = sims.argsort(dim=1).argsort(dim=1).double()
    assert torch.corrcoef(ranks)[0, 1] >= 0.98


def test_user_weights_untouched_and_plan_in_dumps(resnet, tmp_path, monkeypatch):
    """quantize='auto' leaves the user's weights alone, dumps its plan and says it in the notes; what it compiled
    has int8 convs and keeps the budget on held-out inputs against the eager model (plain torch; 2e-4 measured)."""
    model, args = resnet
    quantized_layers_are_faster(monkeypatch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calibration = calibration_for(args)
    cm = graphopt.compile(model, args, quantize="auto", calibration=calibration, accuracy_budget=0.01,
                          dump_dir=tmp_path / "dumps")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    (step,) = [r for r in cm.report if r.name == "quantize_auto"]
    plan = [n for n in step.notes if n.startswith("plan ")]
    assert len(plan) == 9 and any(n.startswith("uniform int8") for n in step.notes)
    assert (tmp_path / "dumps" / step.folder / "stats.json").exists()
    chosen = step.notes[[i for i, n in enumerate(step.notes) if "chosen plan" in n][0]]
    assert float(chosen.split("error ")[1].split()[0]) <= 0.01
    # the compiled model (ONNX Runtime's int8 kernels, not the planner's simulation) quantizes convs and keeps the
    # budget on inputs it was not calibrated on, measured in plain torch against the eager model
    assert int8_convs(cm) > 0 and cm.graph.op_counts().get("graphopt.quantize", 0) > 0
    assert held_out_cosine_error(cm, model, calibration_for(args, n=8)) <= 0.01


def test_auto_respects_a_tight_budget(resnet):
    model, args = resnet
    cm = graphopt.compile(model, args, quantize="auto", calibration=calibration_for(args), accuracy_budget=1e-9)
    assert "graphopt.quantize" not in cm.graph.op_counts()      # nothing fits: the plan stays float
    ref, out = flat_tensors(model(*args)), flat_tensors(cm(*args))
    assert torch.allclose(ref[0], out[0], atol=1e-4)


class ShiftedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def test_bias_correction_removes_the_mean_shift():
    model = ShiftedConv().eval()
    x = torch.rand(2, 16, 12, 12) + 4                    # inputs far from zero mean: rounding shifts outputs
    cal = [(torch.rand(2, 16, 12, 12) + 4,) for _ in range(4)]
    ref = model(x)

    def mean_shift(correct):
        quant = Quantize("int8", QuantOptions(observer="minmax", bias_correction=correct))
        cm = graphopt.compile(model, (x,), passes=["fold_constants", quant, "dce"], calibration=cal)
        return (cm(x) - ref).mean(dim=(0, 2, 3)).abs().mean().item()
    assert mean_shift(True) < 0.5 * mean_shift(False)


def test_observers_clip_outliers():
    obs = Observer()
    values = torch.randn(10_000)
    values[0] = 1000.0
    obs.update(values)
    assert obs.range("minmax", True)[1] == 1000.0
    assert obs.range("percentile", True)[1] < 10
    for sample in (torch.distributions.StudentT(3.0).sample((20_000,)), torch.randn(20_000) ** 3):
        heavy = Observer()                               # heavy tails: MSE trades clipping for resolution
        heavy.update(sample)
        errors = {m: quantization_mse(sample, *heavy.range(m, True)) for m in ("minmax", "percentile", "mse")}
        assert errors["mse"] <= min(errors.values()) and heavy.range("mse", True)[1] <= sample.max()


def test_quantization_errors_come_before_any_work(resnet, monkeypatch):
    import graphopt.api
    model, args = resnet
    monkeypatch.setattr(graphopt.api, "capture", lambda *a, **k: pytest.fail("capture ran on bad input"))
    with pytest.raises(InputError, match="needs calibration data"):
        graphopt.compile(model, args, quantize="int8")
    with pytest.raises(InputError, match=r"calibration batch 1, input 0: got \(1, 3, 16, 16\).*expected shape"):
        graphopt.compile(model, args, quantize="int8", calibration=[args, (torch.randn(1, 3, 16, 16),)])
    with pytest.raises(InputError, match="quantize='int3'"):
        graphopt.compile(model, args, quantize="int3")
    with pytest.raises(InputError, match="accuracy_budget= applies to quantize='auto'"):
        graphopt.compile(model, args, quantize="int8-dynamic", accuracy_budget=0.01)
    with pytest.raises(UnsupportedError, match="lowers float32 models.*bfloat16"):
        graphopt.compile(ShiftedConv().eval().to(torch.bfloat16), (torch.randn(1, 16, 4, 4, dtype=torch.bfloat16),),
                         quantize="int8-dynamic")


@pytest.mark.parametrize("name,mode", [("resnet", "int8"), ("bert", "int8-dynamic"), ("bert", "int4-weight")])
def test_quantized_graphs_lower_to_tvm(name, mode):
    need_module("tvm")
    model, args = zoo.build(name, size="tiny", seq=16)
    cm = graphopt.compile(model, args, backend="tvm", quantize=mode, calibration=calibration_for(args))
    ir, out = flat_tensors(cm.graph.run(*args)), flat_tensors(cm(*args))
    assert torch.allclose(ir[0], out[0], atol=1e-4 * ir[0].abs().max().item())
    ref = flat_tensors(model(*args))[0]                       # and TVM's output is close to the float model's
    if mode == "int8":
        assert sqnr_db(ref, out[0]) >= 25
    else:
        cos = F.cosine_similarity(out[0].reshape(-1, ref.shape[-1]), ref.reshape(-1, ref.shape[-1])).mean()
        assert cos >= {"int8-dynamic": 0.999, "int4-weight": 0.98}[mode], cos


class ScaleOutput(Pass):
    """A deliberately wrong pass: scales the first output by 1.01."""
    name, phase, summary = "scale_output", "cleanup", "test only"

    def run(self, graph, ctx):
        out = next(iter(graph.fx.find_nodes(op="output")))
        first = graph.outputs[0]
        out.replace_input_with(first, graph.call(torch.ops.aten.mul.Tensor, (first, 1.01), before=out))
        result = PassResult()
        result.did("scaled the output")
        return result


def test_verify_checks_the_passes_after_quantization_against_the_quantized_graph(resnet, tmp_path):
    model, args = resnet
    cm = graphopt.compile(model, args, quantize="int8", calibration=calibration_for(args), verify=True,
                          dump_dir=tmp_path)        # quantization's own drift is by design: no error
    (step,) = [r for r in cm.report if r.name == "quantize"]
    assert step.drift.rel > 1e-3 and any("lossy by design" in n for n in step.notes)
    broken = [*default_pipeline(get_target("cpu")), ScaleOutput()]      # a wrong pass after quantize is caught
    with pytest.raises(VerificationError, match=r"'scale_output'.*exceeds tolerance"):
        graphopt.compile(model, args, quantize="int8", calibration=calibration_for(args), verify=True, passes=broken)


@pytest.mark.parametrize("name,mode", [("mobilenet_v2", "int8"), ("bert", "int8-dynamic")])
def test_quantized_models_keep_a_dynamic_batch(name, mode):
    """Compiled at batch 2 with a dynamic batch: batches of 1, 3 and 5 (never calibrated on) run through ONNX
    Runtime's integer ops and stay as close to the eager float model as int8 noise allows (plain torch; measured
    mean 1 − cosine ≈ 0.01 for MobileNetV2's int8, ≈ 1e-7 for the tiny BERT's int8 dynamic linears)."""
    model, args = zoo.build(name, size="tiny", batch=2, seq=16)
    cm = graphopt.compile(model, args, quantize=mode, calibration=calibration_for(args), dynamic_shapes="batch")
    ops = collections.Counter(n.op_type for n in cm.executable.artifact().graph.node)
    if mode == "int8":
        assert int8_convs(cm) == ops["Conv"] > 0 and ops["QuantizeLinear"] > 0, ops   # every conv's weight int8
    else:
        assert ops["MatMulIntegerToFloat"] == 12 and ops["MatMul"] == 0, ops
    bound = {"int8": 0.03, "int8-dynamic": 1e-5}[mode]
    for batch in (1, 3, 5):
        x = tuple(torch.randn(batch, *t.shape[1:]) if t.is_floating_point() else
                  torch.randint(0, 1000, (batch, *t.shape[1:])) for t in args)
        assert flat_tensors(cm(*x))[0].shape[0] == batch
        error = held_out_cosine_error(cm, model, [x])
        assert error <= bound, (batch, error)


def test_auto_with_the_cheap_proxy_still_fits_its_budget(resnet, monkeypatch):
    """A budget (6e-5) that fits some int8 layers but not all (uniform int8 measures ~2e-4): the plan ranked by
    the proxy quantizes some convs and keeps others float, and on held-out inputs the compiled model's error to
    the eager model (plain torch) stays within 3× the budget — slack for a budget measured on 4 one-image
    calibration batches (at most 1.7× measured over seeds 0-5). At 3e-5 most seeds' plans measured over budget
    once applied and backed off to all float, so the test passed or failed with the batches earlier tests drew."""
    from graphopt.passes.quant.plan import QuantizeAuto
    model, args = resnet
    quantized_layers_are_faster(monkeypatch)
    budget = 6e-5
    planner = QuantizeAuto(budget, sensitivity="proxy")
    torch.manual_seed(1)   # the same batches whichever tests ran before
    cm = graphopt.compile(model, args, passes=["fold_batchnorm", planner, "dce"], calibration=calibration_for(args))
    assert held_out_cosine_error(cm, model, calibration_for(args, n=8)) <= 3 * budget
    assert 0 < int8_convs(cm) < 9, int8_convs(cm)
    with pytest.raises(InputError, match="sensitivity='hessian'"):
        QuantizeAuto(0.01, sensitivity="hessian")


def test_keep_float_and_smoothquant_switches():
    """QuantOptions(keep_float=(layer,)) leaves that layer float and quantizes the rest; SmoothQuant (on by default,
    α 0.7) scales the activation feeding a linear (one mul, noted) and smooth=None leaves it alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    scale = torch.where(torch.arange(16) == 3, 30.0, 1.0)                  # one outlier input channel
    x, calibration = (torch.randn(4, 16) * scale,), [(torch.randn(4, 16) * scale,) for _ in range(4)]

    def compile_with(options):
        cm = graphopt.compile(model, x, passes=["fold_constants", Quantize("int8", options), "dce"],
                              calibration=calibration)
        return cm, " | ".join(next(r for r in cm.report if r.name == "quantize").notes)
    default, notes = compile_with(QuantOptions())
    assert default.graph.op_counts().get("graphopt.quantize") == 2 and "aten.linear" not in default.graph.op_counts()
    assert "smoothed for %linear_1" in notes and default.graph.op_counts().get("aten.mul.Tensor") == 1
    unsmoothed, notes = compile_with(QuantOptions(smooth=None))
    assert "smoothed" not in notes and "aten.mul.Tensor" not in unsmoothed.graph.op_counts()
    kept, notes = compile_with(QuantOptions(keep_float=("2",)))
    assert kept.graph.op_counts().get("aten.linear") == 1 and kept.graph.op_counts().get("graphopt.quantize") == 1
    assert "%linear_1 (2): kept in float by the plan" in notes and "%linear (0) → int8 linear" in notes
    for cm in (default, unsmoothed, kept):
        with torch.no_grad():
            ref = model(*x)
        assert (cm(*x) - ref).abs().max() <= 0.05 * ref.abs().max()


@pytest.mark.parametrize("gemm", [True, False])
def test_int8_conv_path_forced_either_way_changes_the_encoding_not_the_numbers(resnet, gemm, monkeypatch):
    """The cost model's per-shape choice between ORT's two int8 conv paths, forced each way: the weights' zero
    point says which (−1: im2col + int8 GEMM, 0: the symmetric conv kernel), the notes say why, and the two paths
    compute the same integers: outputs at most one output step apart and ≥ 60 dB (measured: identical). One
    weight per channel one step off still gives 31 dB, which the 30 dB bound this replaced let through."""
    from graphopt.cost import CostModel
    model, args = resnet
    calibration = calibration_for(args)
    monkeypatch.setattr(CostModel, "int8_conv_gemm_path", lambda self, *a, **k: (gemm, f"forced {gemm}"))
    cm = graphopt.compile(model, args, quantize="int8", calibration=calibration)
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in cm.executable.artifact().graph.initializer}
    zero_points = [v for k, v in weights.items() if str(v.dtype) == "int8" and v.ndim == 1 and v.size > 1]  # per channel
    assert zero_points and all(set(z.tolist()) == {-1 if gemm else 0} for z in zero_points), \
        {tuple(set(z.tolist())) for z in zero_points}
    notes = next(r for r in cm.report if r.name == "quantize").notes
    assert sum(f"forced {gemm}" in n for n in notes) == 9                      # one per conv
    monkeypatch.setattr(CostModel, "int8_conv_gemm_path", lambda self, *a, **k: (not gemm, "the other way"))
    other = graphopt.compile(model, args, quantize="int8", calibration=calibration)
    for x in (torch.randn_like(args[0]) for _ in range(3)):    # the same integers: equal outputs (measured: 0 apart)
        a, b = flat_tensors(cm(x))[0], flat_tensors(other(x))[0]
        step = a.flatten().unique().diff().min()                 # the feature map is dequantized: values on a grid
        assert (a - b).abs().max() <= step and sqnr_db(a, b) >= 60, ((a - b).abs().max(), step, sqnr_db(a, b))


def test_auto_is_never_slower_than_the_best_uniform_plan_within_budget(monkeypatch):
    """Latencies faked so every mixed plan measures slower than the uniform ones: what auto keeps measures no
    slower than the fastest uniform plan within the budget (the greedy plan may be a uniform one itself)."""
    from graphopt.passes.quant import plan as planner
    model, args = zoo.build("bert", size="tiny", seq=16)
    fake = {"int8": 0.5, "int8-dynamic": 0.4, "int4": 0.45}
    monkeypatch.setattr(planner, "_latency_ms", lambda graph, ctx, p: 1.0 if not p or set(p.values()) == {"float"}
                        else fake[next(iter(p.values()))] if len(set(p.values())) == 1 else 0.95)
    cm = graphopt.compile(model, args, quantize="auto", calibration=calibration_for(args), accuracy_budget=0.5)
    notes = next(r for r in cm.report if r.name == "quantize_auto").notes
    chosen = next(n for n in notes if n.startswith("chosen plan"))
    fitting = [m for m in fake if any(n.startswith(f"uniform {m}:") and "over budget" not in n for n in notes)]
    chosen_ms = float(re.search(r"([\d.]+) ms", chosen).group(1))
    assert fitting and chosen_ms <= min(fake[m] for m in fitting), (chosen, notes[-6:])


def test_int8_pads_fold_into_the_conv_that_reads_them(monkeypatch):
    """MobileNetV2's TF-"same" pads (asymmetric) run on the int8 values in the IR; in ONNX, Pad → DequantizeLinear →
    Conv becomes the Conv's own pads (ORT's PadFusion does not look through the DequantizeLinear), same numbers."""
    model, args = zoo.build("mobilenet_v2", size="tiny")
    calibration = calibration_for(args)
    cm = graphopt.compile(model, args, quantize="int8", calibration=calibration)
    ir_pads = sum(n.target is torch.ops.aten.constant_pad_nd.default for n in cm.graph.fx.nodes)
    nodes = cm.executable.artifact().graph.node
    asymmetric = [n for n in nodes if n.op_type == "Conv" for a in n.attribute if a.name == "pads"
                  and list(a.ints[:2]) != list(a.ints[2:])]
    assert ir_pads >= 4 and not [n for n in nodes if n.op_type == "Pad"] and len(asymmetric) == ir_pads
    from graphopt.codegen import onnx as codegen_onnx
    monkeypatch.setattr(codegen_onnx, "fold_int8_pads", lambda model: model)
    unfolded = graphopt.compile(model, args, quantize="int8", calibration=calibration)
    assert [n.op_type for n in unfolded.executable.artifact().graph.node].count("Pad") == ir_pads
    for x in (torch.randn_like(args[0]) for _ in range(3)):          # ORT computes the same integers either way
        assert sqnr_db(flat_tensors(unfolded(x))[0], flat_tensors(cm(x))[0]) >= 80
