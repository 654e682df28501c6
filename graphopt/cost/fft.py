"""Long convolutions: direct conv vs the matmul-FFT convolution graphopt lowers them to.

Each form's cost is its multiply-adds divided by a rate the cost model measures on the target (one
small probe per form, `rate_probes`): depthwise and dense direct convs, 1-D and 2-D, and the matmul
FFT convs run at very different rates, so no threshold is guessed."""
from __future__ import annotations

from dataclasses import dataclass
import torch

from ..ops.fft_conv import fft_size


@dataclass(frozen=True)
class ConvShape:
    """A 1-D convolution; its FFT form is fft_conv1d's Monarch (four-step) matmul FFT."""
    batch: int
    c_in: int
    c_out: int
    groups: int
    length: int        # input length (after any padding folded into the conv)
    kernel: int
    out_len: int

    direct_rate = property(lambda self: "depthwise" if self.depthwise else "dense")
    fft_rate = "fft"

    @property
    def depthwise(self) -> bool:
        return self.groups == self.c_in == self.c_out

    def fft_size(self) -> tuple[int, tuple[int, ...]]:
        return fft_size(max(self.length + self.kernel - 1, self.out_len))

    def period(self) -> str:
        n, ns = self.fft_size()
        return f"{n} = {'·'.join(map(str, ns))}"

    def direct_macs(self) -> float:
        return self.batch * self.c_out * self.out_len * (self.c_in // self.groups) * self.kernel

    def fft_macs(self) -> float:
        n, ns = self.fft_size()
        half = n // ns[-1] * (ns[-1] // 2 + 1)                         # the last digit stops at N_k/2
        per_point = 2 * ns[0] + 4 * sum(ns[1:-1])                      # real first stage, complex middle ones
        transform = per_point * n + 4 * ns[-1] * half                  # + the half last stage
        mixing = 8 * half * (self.c_in // self.groups)                 # complex product per frequency
        return self.batch * (self.c_in * transform + self.c_out * (transform + mixing))


@dataclass(frozen=True)
class Conv2dShape:
    """A depthwise 2-D convolution; its FFT form is fft_conv2d's per-axis matmul DFT."""
    batch: int
    channels: int
    size: tuple[int, int]        # input H, W (after any padding folded into the conv)
    kernel: tuple[int, int]
    start: tuple[int, int]       # first kept output row/column of the full linear convolution
    out: tuple[int, int]

    direct_rate, fft_rate, depthwise = "depthwise2d", "fft2d", True

    def fft_size(self) -> tuple[int, int]:
        """The smallest period (Nh, Nw) at which the kept window equals the linear convolution."""
        return tuple(max(n + k - 1 - s, s + o) for n, k, s, o in zip(self.size, self.kernel, self.start, self.out))

    def period(self) -> str:
        return "×".join(map(str, self.fft_size()))

    def direct_macs(self) -> float:
        return self.batch * self.channels * self.out[0] * self.out[1] * self.kernel[0] * self.kernel[1]

    def fft_macs(self) -> float:
        (nh, nw), (oh, ow) = self.fft_size(), self.out
        mw = nw // 2 + 1
        per_channel = nh * nw * 2 * mw + 2 * nh * nh * 2 * mw + 8 * nh * mw + 2 * oh * 2 * nh * mw + 2 * oh * mw * ow
        return self.batch * self.channels * per_channel


@dataclass(frozen=True)
class Decision:
    form: str             # "direct" | "fft"
    direct_ms: float
    fft_ms: float
    period: str           # the FFT period: "N = N1·N2" (1-D) or "Nh×Nw"

    def __str__(self) -> str:
        return (f"{self.form} (estimated direct {self.direct_ms:.3g} ms, matmul-FFT {self.fft_ms:.3g} ms, "
                f"period {self.period})")


def decide(shape: ConvShape | Conv2dShape, rates: dict[str, float]) -> Decision:
    """The cheaper form at `rates` (multiply-adds per second of each form)."""
    direct = shape.direct_macs() / rates[shape.direct_rate]
    fft = shape.fft_macs() / rates[shape.fft_rate]
    return Decision("fft" if fft < direct else "direct", direct * 1e3, fft * 1e3, shape.period())


RATE_KINDS = ("depthwise", "dense", "fft", "depthwise2d", "fft2d")


def rate_probes() -> dict[str, tuple[torch.nn.Module, torch.Tensor, float]]:
    """rate name → (probe module, its input, its multiply-adds): one small problem per form."""
    from ..ops.fft_conv import spectrum
    from ..ops.fft_conv2d import spectrum2d
    probes = {}
    shapes = {"depthwise": ConvShape(1, 32, 32, 32, 1024, 256, 1024), "dense": ConvShape(1, 32, 32, 1, 1024, 64, 1024)}
    for kind, s in shapes.items():
        conv = torch.nn.Conv1d(s.c_in, s.c_out, s.kernel, groups=s.groups, padding="same", bias=False)
        probes[kind] = (conv, torch.randn(1, s.c_in, s.length), s.direct_macs())
    s = shapes["depthwise"]
    _, ns = s.fft_size()
    fft = OpProbe(torch.ops.graphopt.fft_conv1d, spectrum(torch.randn(s.c_in, 1, 1, s.kernel), ns), list(ns),
                  s.groups, 0, s.out_len)
    probes["fft"] = (fft, torch.randn(1, s.c_in, s.length), s.fft_macs())

    s2 = Conv2dShape(1, 32, (56, 56), (31, 31), (15, 15), (56, 56))        # a RepLKNet stage-1 block
    conv2 = torch.nn.Conv2d(s2.channels, s2.channels, s2.kernel, groups=s2.channels, padding="same", bias=False)
    x2 = torch.randn(1, s2.channels, *s2.size)
    probes["depthwise2d"] = (conv2, x2, s2.direct_macs())
    nh, nw = s2.fft_size()
    fft2 = OpProbe(torch.ops.graphopt.fft_conv2d, spectrum2d(torch.randn(s2.channels, *s2.kernel), nh, nw), nh, nw,
                   s2.start[0], s2.out[0], s2.start[1], s2.out[1])
    probes["fft2d"] = (fft2, x2, s2.fft_macs())
    return probes


class OpProbe(torch.nn.Module):
    """One graphopt op with constant arguments, to time it."""

    def __init__(self, op, *args):
        super().__init__()
        self.op, self.args = op, args

    def forward(self, x):
        return self.op(x, *self.args)
