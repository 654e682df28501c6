"""The fourth part of each graphopt op: its TVM Relax converter, through from_exported_program → tvm.compile →
Relax VM, checked against what each op stands for computed here with torch.nn.functional (conv2d, linear, gelu,
scaled_dot_product_attention, conv1d: not graphopt's own reference implementations). Skipped where TVM does not
import (a failure on CI, which installs it)."""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt.ops  # noqa: F401  (registers the ops)
from graphopt.ops import relax_convert_map
from graphopt.ops.fft_conv import fft_size, spectrum
from graphopt.ops.fft_conv2d import spectrum2d
from conftest import need_module

tvm = need_module("tvm")
from tvm import relax  # noqa: E402
from tvm.relax.frontend.torch import from_exported_program  # noqa: E402


class UsesOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 4, 3, 3) * 0.2)
        self.b = nn.Parameter(torch.randn(8) * 0.1)
        self.lw = nn.Parameter(torch.randn(32, 32) * 0.1)
        self.lb = nn.Parameter(torch.randn(32) * 0.1)

        _, self.ns = fft_size(64 + 20 - 1, max_bits=3)          # three levels: every stage kind
        # the FFT convs' kernels (plain attributes: the reference below convolves with them directly)
        self.kernels = {"depthwise": torch.randn(4, 1, 1, 20), "dense": torch.randn(1, 3, 4, 20),
                        "2d": torch.randn(4, 5, 7)}
        self.register_buffer("spec", spectrum(self.kernels["depthwise"], self.ns))
        self.register_buffer("dense_spec", spectrum(self.kernels["dense"], self.ns))
        self.register_buffer("spec2d", spectrum2d(self.kernels["2d"], 10, 13))

    def forward(self, img, seq, bias, sig):
        g = torch.ops.graphopt
        c = g.conv_act(img, self.w, self.b, None, [1, 1], [0, 1, 1, 0], [1, 1], 1, "relu6")
        h = g.linear_act(seq, self.lw, self.lb, "gelu")
        a = g.attention(h, seq, seq, bias, 4, 0.3, False)
        f = g.fft_conv1d(sig, self.spec, list(self.ns), 4, 19, 45)
        d = g.fft_conv1d(sig, self.dense_spec, list(self.ns), 1, 0, 64)
        f2 = g.fft_conv2d(img, self.spec2d, 10, 13, 2, 6, 3, 6)
        return c, a, g.attention(h, h, seq, None, 4, 0.25, True), f, d, f2


def attention(q, k, v, bias, heads, scale, causal):
    """Multi-head attention on [batch, seq, heads·head_dim] by F.scaled_dot_product_attention."""
    def split(t):
        return t.reshape(*t.shape[:2], heads, -1).transpose(1, 2)
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=bias, is_causal=causal, scale=scale)
    return out.transpose(1, 2).flatten(2)


def linear_conv1d(x, h):
    """Full linear convolution Σ_k h[k]·x[n−k] of x [B, Ci, L] with h [G, Co/G, Ci/G, K] by F.conv1d (flipped)."""
    g, co, ci, k = h.shape
    return F.conv1d(F.pad(x, (k - 1, k - 1)), h.reshape(g * co, ci, k).flip(-1), groups=g)


def linear_conv2d(x, h):
    """Full 2-D linear convolution of x [B, C, H, W] with depthwise h [C, Kh, Kw] by F.conv2d (flipped)."""
    kh, kw = h.shape[1:]
    return F.conv2d(F.pad(x, (kw - 1, kw - 1, kh - 1, kh - 1)), h.flip(-2, -1)[:, None], groups=h.shape[0])


def expected(model, img, seq, bias, sig):
    """UsesOps' outputs written with torch.nn.functional, in float64."""
    img, seq, bias, sig = (t.double() for t in (img, seq, bias, sig))
    w, b, lw, lb = (p.detach().double() for p in (model.w, model.b, model.lw, model.lb))
    kernels = {name: h.double() for name, h in model.kernels.items()}
    # padding [top 0, left 1, bottom 1, right 0], ONNX-style
    c = F.relu6(F.conv2d(F.pad(img, (1, 0, 0, 1)), w, b))
    h = F.gelu(F.linear(seq, lw, lb))
    a = attention(h, seq, seq, bias, 4, 0.3, False)
    causal = attention(h, h, seq, None, 4, 0.25, True)
    f = linear_conv1d(sig, kernels["depthwise"])[..., 19:19 + 45]   # 83 = 64 + 20 − 1 outputs within the period 128
    d = linear_conv1d(sig, kernels["dense"])[..., :64]
    f2 = linear_conv2d(img, kernels["2d"])[..., 2:8, 3:9]              # 10 × 12 outputs within the period 10 × 13
    return c, a, causal, f, d, f2


def test_relax_converters_match_reference():
    model = UsesOps().eval()
    inputs = (torch.randn(1, 4, 6, 6), torch.randn(2, 5, 32), torch.randn(2, 1, 5, 5), torch.randn(2, 4, 64))
    with torch.no_grad():
        ref = expected(model, *inputs)
    ep = torch.export.export(model, inputs, strict=False)
    mod = from_exported_program(ep, custom_convert_map=relax_convert_map())
    exe = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(exe, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(t.numpy()) for t in inputs])
    assert len(out) == len(ref) == 6
    for got, want in zip(out, ref):
        np.testing.assert_allclose(got.numpy(), want.float().numpy(), rtol=1e-4, atol=1e-4)
