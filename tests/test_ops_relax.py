"""The fourth part of each graphopt op: its TVM Relax converter, checked against the reference
implementation through from_exported_program → tvm.compile → Relax VM. Skipped where TVM does not
import (a failure on CI, which installs it)."""
import numpy as np
import torch
import torch.nn as nn

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
        self.register_buffer("spec", spectrum(torch.randn(4, 1, 1, 20), self.ns))
        self.register_buffer("dense_spec", spectrum(torch.randn(1, 3, 4, 20), self.ns))
        self.register_buffer("spec2d", spectrum2d(torch.randn(4, 5, 7), 10, 13))

    def forward(self, img, seq, bias, sig):
        g = torch.ops.graphopt
        c = g.conv_act(img, self.w, self.b, None, [1, 1], [0, 1, 1, 0], [1, 1], 1, "relu6")
        h = g.linear_act(seq, self.lw, self.lb, "gelu")
        a = g.attention(h, seq, seq, bias, 4, 0.3, False)
        f = g.fft_conv1d(sig, self.spec, list(self.ns), 4, 19, 45)
        d = g.fft_conv1d(sig, self.dense_spec, list(self.ns), 1, 0, 64)
        f2 = g.fft_conv2d(img, self.spec2d, 10, 13, 2, 6, 3, 6)
        return c, a, g.attention(h, h, seq, None, 4, 0.25, True), f, d, f2


def test_relax_converters_match_reference():
    model = UsesOps().eval()
    inputs = (torch.randn(1, 4, 6, 6), torch.randn(2, 5, 32), torch.randn(2, 1, 5, 5), torch.randn(2, 4, 64))
    with torch.no_grad():
        ref = model(*inputs)
    ep = torch.export.export(model, inputs, strict=False)
    mod = from_exported_program(ep, custom_convert_map=relax_convert_map())
    exe = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(exe, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(t.numpy()) for t in inputs])
    for got, want in zip(out, ref):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-4)
