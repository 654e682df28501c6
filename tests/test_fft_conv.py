"""FFT-convolution rewriting: equal to the direct convolution (fp32: max abs error ≤ 1e-4 of the
output scale) across lengths, causal or not, depthwise, grouped and dense, 1-D and 2-D; the
rfft·irfft idiom; the cost model keeps short kernels direct."""
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt.cli import load_factory
from graphopt.ops.fft_conv import TorchOps, fft_size, monarch_conv, spectrum
from graphopt.passes.fft.fft_conv import FFTConv
from graphopt.ops.fft_conv2d import dft2_conv, spectrum2d
from graphopt.cost import Conv2dShape, ConvShape, CostModel

decide = CostModel(graphopt.get_target("cpu")).fft_decision
from conftest import assert_matches, fake_clock, need_module


class LongConv(nn.Module):
    def __init__(self, c_in, c_out, k, groups, causal):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, k, groups=groups, padding=0 if causal else k // 2)
        self.k, self.causal = k, causal

    def forward(self, x):
        return self.conv(F.pad(x, (self.k - 1, 0)) if self.causal else x)


CASES = [  # (c_in, c_out, kernel, groups, length, causal)
    (8, 8, 301, 8, 1000, False),     # depthwise, odd kernel, even length
    (8, 8, 256, 8, 777, True),       # depthwise causal, odd length
    (6, 4, 100, 2, 513, False),      # grouped, non-power-of-two length
    (4, 6, 129, 1, 250, True),       # dense causal
    (3, 3, 64, 3, 64, False),        # kernel as long as the sequence
]


@pytest.mark.parametrize("c_in,c_out,k,groups,length,causal", CASES)
def test_rewrite_equals_direct_conv(c_in, c_out, k, groups, length, causal):
    model, x = LongConv(c_in, c_out, k, groups, causal).eval(), (torch.randn(2, c_in, length),)
    cm = graphopt.compile(model, x, passes=["fold_constants", FFTConv(force="fft"), "dce"])
    assert cm.graph.op_counts().get("graphopt.fft_conv1d") == 1
    assert "aten.convolution" not in cm.graph.op_counts()
    assert_matches(cm, model, x)


FUSED_CASES = [  # (channels, kernel, length, causal): the fused TVM kernel's shape paths
    (7, 300, 1000, True),       # odd channels (the last pair's partner is zero); x ends inside a first-stage run
    (8, 301, 1000, False),      # 'same' padding: the kept window starts off a vector boundary (copy-out path)
    (4, 2000, 2000, True),      # N = 4096: radix 8, 2, 4, 4, 4 (N = 2048: 8, 4, 4, 4)
]


@pytest.mark.parametrize("c,k,length,causal", FUSED_CASES)
def test_fused_kernel_on_tvm_equals_direct_conv(c, k, length, causal):
    """Depthwise FFT convs on TVM's CPU target run graphopt's fused TIR kernel, at any batch size."""
    need_module("tvm")
    model, x = LongConv(c, c, k, c, causal).eval(), (torch.randn(2, c, length),)
    cm = graphopt.compile(model, x, backend="tvm", dynamic_shapes="batch",
                          passes=["fold_constants", FFTConv(force="fft"), "dce"])
    assert [name for name in cm.executable.kernels if name.startswith("fft_conv1d_dw")], cm.executable.kernels
    assert_matches(cm, model, x, tol=1e-5)
    assert_matches(cm, model, (torch.randn(3, c, length),), tol=1e-5)


def test_grouped_fft_conv_on_tvm_keeps_the_matmul_form():
    need_module("tvm")
    model, x = LongConv(6, 4, 100, 2, False).eval(), (torch.randn(1, 6, 513),)
    cm = graphopt.compile(model, x, backend="tvm", passes=["fold_constants", FFTConv(force="fft"), "dce"])
    assert cm.executable.kernels == ()
    assert_matches(cm, model, x)


def linear_conv1d(x, h):
    """The full linear convolution y[n] = Σ_k h[k]·x[n−k], n = 0 … L+K−2, of x [B, Ci, L] with kernels h
    [G, Co/G, Ci/G, K], computed by F.conv1d in float64 (a cross-correlation: the kernel flipped, x padded by
    K−1 on both sides): the reference the FFT forms are checked against, independent of graphopt's ops."""
    g, co, ci, k = h.shape
    return F.conv1d(F.pad(x.double(), (k - 1, k - 1)), h.double().reshape(g * co, ci, k).flip(-1), groups=g)


def linear_conv2d(x, h):
    """The full 2-D linear convolution of x [B, C, H, W] with depthwise kernels h [C, Kh, Kw] by F.conv2d
    (float64), size (H+Kh−1, W+Kw−1)."""
    kh, kw = h.shape[1:]
    return F.conv2d(F.pad(x.double(), (kw - 1, kw - 1, kh - 1, kh - 1)), h.double().flip(-2, -1)[:, None],
                    groups=h.shape[0])


def test_monarch_algebra_matches_direct_conv():
    x, h = torch.randn(2, 4, 300), torch.randn(2, 2, 2, 50)
    ref = linear_conv1d(x, h)[..., 10:310].float()       # 349 = 300 + 50 − 1 outputs, 300 kept from the 11th
    for max_bits in (7, 4, 2):                  # two, three and five levels
        _, ns = fft_size(349, max_bits)
        spec = spectrum(h, ns)
        torch.testing.assert_close(monarch_conv(TorchOps, x, spec, ns, 2, 10, 300), ref, atol=1e-4, rtol=1e-4)


def test_bf16_reference():
    x, w = torch.randn(1, 4, 200), torch.randn(4, 1, 90)
    _, ns = fft_size(289)
    spec = spectrum(w.flip(-1).reshape(4, 1, 1, 90), ns)
    y = torch.ops.graphopt.fft_conv1d(x.bfloat16(), spec, list(ns), 4, 89, 111)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), F.conv1d(x.bfloat16().float(), w, groups=4), atol=0.05, rtol=0.02)


class HyenaStyle(nn.Module):
    def __init__(self, c=8, length=256):
        super().__init__()
        self.k = nn.Parameter(torch.randn(c, length) * 0.05)

    def forward(self, u):
        n = 2 * u.shape[-1]
        return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(self.k, n=n), n=n)[..., : u.shape[-1]] * u


def test_rfft_irfft_idiom():
    model, x = HyenaStyle().eval(), (torch.randn(2, 8, 256),)
    cm = graphopt.compile(model, x)
    counts = cm.graph.op_counts()
    assert counts.get("graphopt.fft_conv1d") == 1 and "aten._fft_r2c" not in counts and "aten._fft_c2r" not in counts
    assert_matches(cm, model, x)


def test_cost_model_keeps_short_kernels_direct():
    for k in (3, 5, 7, 15):
        for groups in (1, 64):
            d = decide(ConvShape(1, 64, 64, groups, 4096, k, 4096))
            assert d.form == "direct", (k, groups, d)
    assert decide(ConvShape(1, 64, 64, 64, 4096, 4096, 4096)).form == "fft"


def test_short_conv_left_direct_with_reason():
    model, x = LongConv(8, 8, 3, 8, True).eval(), (torch.randn(1, 8, 512),)
    cm = graphopt.compile(model, x)
    step = next(r for r in cm.report if r.name == "fft_conv")
    assert "aten.convolution" in cm.graph.op_counts() and "estimated direct" in step.notes[0]


class LargeKernel2d(nn.Module):
    def __init__(self, c, k, padding, pad_first=None):
        super().__init__()
        self.conv, self.pad_first = nn.Conv2d(c, c, k, groups=c, padding=padding), pad_first

    def forward(self, x):
        return self.conv(F.pad(x, self.pad_first) if self.pad_first else x)


CASES_2D = [  # (channels, input H×W, kernel, conv padding, explicit pad before the conv)
    (4, (56, 56), 31, 15, None),                 # RepLKNet-style "same"
    (3, (33, 20), (13, 9), 0, None),             # odd/even sizes, rectangular kernel, valid
    (5, (24, 31), (11, 16), "same", None),       # even kernel "same" (PyTorch pads asymmetrically)
    (2, (40, 40), 21, 0, (20, 0, 20, 0)),        # causal in both axes, the pad folded into the window
]


@pytest.mark.parametrize("c,size,k,padding,pad_first", CASES_2D)
def test_2d_rewrite_equals_direct_conv(c, size, k, padding, pad_first):
    model, x = LargeKernel2d(c, k, padding, pad_first).eval(), (torch.randn(2, c, *size),)
    cm = graphopt.compile(model, x, passes=["fold_constants", FFTConv(force="fft"), "dce"])
    assert cm.graph.op_counts().get("graphopt.fft_conv2d") == 1
    assert "aten.convolution" not in cm.graph.op_counts() and "aten.constant_pad_nd" not in cm.graph.op_counts()
    assert_matches(cm, model, x)


def test_2d_lowering_algebra_matches_direct_conv():
    x, h = torch.randn(2, 3, 17, 22), torch.randn(3, 6, 5)
    spec = spectrum2d(h, 22, 26)                         # the period: exactly the full (17+6−1) × (22+5−1) output
    ref = linear_conv2d(x, h)[..., 4:19, 2:22].float()
    torch.testing.assert_close(dft2_conv(TorchOps, x, spec, 22, 26, 4, 15, 2, 20), ref, atol=1e-4, rtol=1e-4)


def test_2d_cost_model_and_reasons():
    for k in (3, 7):
        d = decide(Conv2dShape(1, 128, (56, 56), (k, k), (k // 2, k // 2), (56, 56)))
        assert d.form == "direct", (k, d)
    assert decide(Conv2dShape(1, 64, (64, 64), (51, 51), (25, 25), (64, 64))).form == "fft"
    dense = nn.Conv2d(4, 4, 31, padding=15).eval()
    cm = graphopt.compile(dense, (torch.randn(1, 4, 40, 40),))
    step = next(r for r in cm.report if r.name == "fft_conv")
    assert "aten.convolution" in cm.graph.op_counts()
    assert any("non-depthwise" in note for note in step.notes), step.notes


@pytest.mark.parametrize("model,shape", [(LongConv(8, 8, 300, 8, True), (1, 8, 700)),
                                         (LargeKernel2d(4, 21, 10), (1, 4, 36, 36))])
def test_bf16_on_tvm(model, shape):
    """bf16 models: the FFT convs compute in fp32 inside (their DFT constants would not survive bf16)."""
    need_module("tvm")
    model, x = model.eval().bfloat16(), (torch.randn(shape).bfloat16(),)
    cm = graphopt.compile(model, x, backend="tvm", passes=["fold_constants", FFTConv(force="fft"), "dce"])
    assert any(op.startswith("graphopt.fft_conv") for op in cm.graph.op_counts())
    y = cm(*x)
    with torch.no_grad():
        ref = model.float()(x[0].float())
    assert y.dtype == torch.bfloat16
    assert (y.float() - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_bf16_on_ort_is_refused_before_work():
    model = LongConv(4, 4, 100, 4, True).eval().bfloat16()
    with pytest.raises(graphopt.UnsupportedError, match="bfloat16"):
        graphopt.compile(model, (torch.randn(1, 4, 300).bfloat16(),))


def _example(name):
    return load_factory(str(Path(__file__).parents[1] / "examples" / f"{name}.py") + ":tiny")()


def test_hyena_example_end_to_end():
    """Both FFT convolutions rewritten, and their filter generators (sin MLP × decay) folded away."""
    model, x = _example("hyena")
    cm = graphopt.compile(model, x)
    counts = cm.graph.op_counts()
    assert counts.get("graphopt.fft_conv1d") == 2 and "aten.sin" not in counts and "aten._fft_r2c" not in counts
    assert_matches(cm, model, x)


@pytest.mark.parametrize("faster", ["mixed", "ort"])
def test_auto_puts_depthwise_fft_convs_on_tvm_kernels_between_ort_segments(faster, monkeypatch):
    """backend='auto' measures ORT alone against ORT segments with each depthwise FFT conv on graphopt's TVM
    kernel and keeps the faster, the report saying which and both timings: the clock faked each way round, the
    choice follows it; either program equals eager."""
    need_module("tvm")
    from graphopt.backends import BuildInputs
    from graphopt.runtime.mixed import tvm_kernel_ops, worth_trying
    ms = {"mixed": 1.0, "chosen": 3.0} if faster == "mixed" else {"mixed": 3.0, "chosen": 1.0}
    answered = fake_clock(monkeypatch, ms)
    model, x = _example("hyena")
    cm = graphopt.compile(model, x, backend="auto")
    assert answered == [ms]                                           # the choice was timed, once
    # the last line: when the mixed program is not kept, auto's own ORT choice ("kept ONNX Runtime …") precedes it
    decision = cm.executable.describe()[-1]
    assert decision.startswith("backend auto: 2 depthwise FFT conv(s) on graphopt's TVM kernel between ONNX Runtime "
                               "segments 1 ms vs without 3 ms" if faster == "mixed" else
                               "backend auto: 2 depthwise FFT conv(s) on graphopt's TVM kernel between ONNX Runtime "
                               "segments 3 ms vs without 1 ms"), decision
    assert decision.endswith(": kept" if faster == "mixed" else ": not kept"), decision
    assert cm.backend == ("ort+tvm" if faster == "mixed" else "ort")
    assert_matches(cm, model, x)
    if faster == "mixed":                        # the program kept: ORT segments around 2 one-op TVM segments
        kinds = [type(step.executable).__name__ for step in cm.executable.chosen.steps]
        assert kinds.count("TvmExecutable") == len(tvm_kernel_ops(cm.graph, cm.target)) == 2 and "OrtExecutable" in kinds
    else:
        assert type(cm.executable.chosen.chosen).__name__ == "OrtExecutable"   # auto's ORT choice, unwrapped
        assert "kept ONNX Runtime" in cm.executable.describe()[-2]
        assert not worth_trying(cm.graph, cm.target, BuildInputs(x, dynamic_shapes=({0: torch.export.Dim.DYNAMIC},)))


def test_replknet_example_end_to_end():
    """The large depthwise kernels go to the frequency domain, the 5×5 branches and 1×1 convs stay."""
    model, x = _example("replknet")
    cm = graphopt.compile(model, x, passes=["fold_constants", "fold_batchnorm", FFTConv(force="fft"), "dce"])
    step = next(r for r in cm.report if r.name == "fft_conv")
    assert cm.graph.op_counts().get("graphopt.fft_conv2d") == 2      # the 13×13 and the forced 5×5
    assert not any("1×1" in note for note in step.notes)             # pointwise convs are not candidates
    assert_matches(cm, model, x)


def test_the_direct_conv_rate_probes_are_the_convs_they_stand_for():
    """The direct-conv rate probes are built as one ONNX Conv (no exporter): ORT computes on them what the torch
    probe module (padding="same", an even 1-D kernel included) computes."""
    import onnxruntime
    from graphopt.cost import probes
    from graphopt.cost.fft import rate_probes
    direct = {k: v for k, v in rate_probes().items() if isinstance(v[0], (nn.Conv1d, nn.Conv2d))}
    assert set(direct) == {"depthwise", "dense", "depthwise2d"}
    for kind, (module, x, _) in direct.items():
        model, feeds = probes.same_conv(module, x.numpy())
        got = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        with torch.no_grad():
            want = module(x)
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)


def test_ort_rate_probes_are_the_ops_own_lowering_built_without_an_exporter(monkeypatch):
    """On ONNX Runtime every FFT rate is probed on a model built directly in ONNX (no torch.onnx export: 0.6 s each,
    3 s for a process's first): the FFT probes are the ops' own lowerings, and compute what their eager reference
    does."""
    from graphopt.cost import model as cost_model, probes
    from graphopt.cost.fft import RATE_KINDS, rate_probes
    from graphopt.sessions import ort_session
    for kind in ("fft", "fft2d"):
        module, x, _ = rate_probes()[kind]
        model, feeds = probes.fft_op(module.op, module.args, x.numpy())
        (got,) = ort_session(model).run(None, feeds)
        want = module(x).numpy()
        assert abs(got - want).max() <= 1e-4 * abs(want).max(), kind
    monkeypatch.setattr(cost_model, "_VERDICTS", {})
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: pytest.fail("a rate probe was exported"))
    rates = CostModel(graphopt.get_target("cpu"), "ort").fft_rates()
    assert set(rates) == set(RATE_KINDS) and all(r > 0 for r in rates.values()), rates
