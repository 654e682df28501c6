"""Cost model for long convolutions: direct conv vs the matmul (Monarch) FFT convolution.

Each form's cost is its multiply-adds divided by a rate measured on this machine with ONNX
Runtime (one probe per form, the first time the model is asked, then cached for the process):
depthwise direct convs, dense direct convs and the Monarch FFT conv run at very different rates,
so no threshold is guessed."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from ..ops.fft_conv import fft_size


@dataclass(frozen=True)
class ConvShape:
    batch: int
    c_in: int
    c_out: int
    groups: int
    length: int        # input length (after any padding folded into the conv)
    kernel: int
    out_len: int

    @property
    def depthwise(self) -> bool:
        return self.groups == self.c_in == self.c_out

    def direct_macs(self) -> float:
        return self.batch * self.c_out * self.out_len * (self.c_in // self.groups) * self.kernel

    def fft_macs(self, n: int, n1: int, n2: int) -> float:
        forward = 2 * n1 * n1 * n2 + 4 * n1 * n2 * n2                 # [2N1,N1]@X, then [N1,2N2]@[2N2,2N2]
        inverse = 4 * n1 * n2 * n2 + 2 * n1 * n1 * n2
        mixing = 4 * n * (self.c_in // self.groups)                    # complex product per frequency
        return self.batch * (self.c_in * forward + self.c_out * (inverse + mixing))


@dataclass(frozen=True)
class Decision:
    form: str             # "direct" | "fft"
    direct_ms: float
    fft_ms: float
    n: int

    def __str__(self) -> str:
        return f"{self.form} (estimated direct {self.direct_ms:.3g} ms, matmul-FFT {self.fft_ms:.3g} ms, N={self.n})"


def decide(shape: ConvShape, rates: dict[str, float] | None = None) -> Decision:
    rates = rates or measured_rates()
    n, n1, n2 = fft_size(max(shape.length + shape.kernel - 1, shape.out_len))
    direct = shape.direct_macs() / rates["depthwise" if shape.depthwise else "dense"]
    fft = shape.fft_macs(n, n1, n2) / rates["fft"]
    return Decision("fft" if fft < direct else "direct", direct * 1e3, fft * 1e3, n)


@cache
def measured_rates() -> dict[str, float]:
    """Multiply-adds per second of each form, timed once on this machine in ONNX Runtime."""
    from ..ops.fft_conv import spectrum
    probes = {"depthwise": ConvShape(1, 32, 32, 32, 1024, 256, 1024),
              "dense": ConvShape(1, 32, 32, 1, 1024, 64, 1024)}
    rates = {}
    for kind, s in probes.items():
        conv = torch.nn.Conv1d(s.c_in, s.c_out, s.kernel, groups=s.groups, padding="same", bias=False).eval()
        rates[kind] = s.direct_macs() / _ort_seconds(conv, (torch.randn(1, s.c_in, s.length),))
    s = probes["depthwise"]
    n, n1, n2 = fft_size(s.length + s.kernel - 1)
    spec = spectrum(torch.randn(s.c_in, 1, 1, s.kernel), n1, n2)

    class Probe(torch.nn.Module):
        def forward(self, x):
            return torch.ops.graphopt.fft_conv1d(x, spec, n1, n2, s.groups, 0, s.out_len, True)
    rates["fft"] = s.fft_macs(n, n1, n2) / _ort_seconds(Probe(), (torch.randn(1, s.c_in, s.length),))
    return rates


def _ort_seconds(module: torch.nn.Module, args: tuple) -> float:
    from ..backends.ort_timing import median_run_seconds
    from ..ops import onnx_translation_table
    from ..quiet import quiet
    with quiet(stdout=True):
        program = torch.onnx.export(module, args, dynamo=True, custom_translation_table=onnx_translation_table())
    model = program.model_proto
    return median_run_seconds(model.SerializeToString(), {model.graph.input[0].name: args[0].numpy()})
