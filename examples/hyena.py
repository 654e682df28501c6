"""A Hyena-style long-convolution model, written from the published description (Poli et al., 2023,
"Hyena Hierarchy"): each operator projects its input to (order + 1) streams, runs a short causal
depthwise conv over them, then alternates elementwise gating with long causal convolutions whose
filters are generated implicitly — a small MLP over positional features (sines), times an
exponentially decaying window — and applied by FFT, as the paper's code does.

    graphopt compile examples/hyena.py --dump-dir dumps/hyena        # d_model 128, L 4096
    graphopt compile examples/hyena.py:tiny

graphopt folds each filter generator and the filters' FFTs at compile time (they do not depend on
the input) and rewrites the FFT convolutions into matmul (Monarch) FFT convolutions."""
import math

import torch
import torch.nn as nn


class PositionalFilter(nn.Module):
    """h[c, t] = MLP(z(t))[c] · exp(−α_c · t / L): the implicit long filter of one operator."""

    def __init__(self, channels: int, length: int, emb_dim: int = 9, width: int = 64, order: int = 2):
        super().__init__()
        self.channels, self.order = channels, order
        t = torch.linspace(0, 1, length)[:, None]                                    # [L, 1]
        bands = torch.linspace(1e-4, emb_dim // 2 - 1, emb_dim // 2)[None]
        z = torch.cat([t, torch.cos(2 * math.pi * bands * t), torch.sin(2 * math.pi * bands * t)], -1)
        self.register_buffer("z", z)                                                   # [L, emb_dim]
        self.register_buffer("t", t)
        self.mlp = nn.Sequential(nn.Linear(emb_dim, width), Sin(width), nn.Linear(width, width), Sin(width),
                                 nn.Linear(width, channels * order, bias=False))
        self.decay = nn.Parameter(torch.linspace(0.3, 1.5, channels * order).log())

    def forward(self) -> torch.Tensor:
        h = self.mlp(self.z) * torch.exp(-self.t * self.decay.exp() * 8)              # [L, order·C]
        return h.t().reshape(self.order, self.channels, -1)                            # [order, C, L]


class Sin(nn.Module):
    def __init__(self, dim: int, w: float = 10.0):
        super().__init__()
        self.freq = nn.Parameter(w * torch.ones(1, dim))

    def forward(self, x):
        return torch.sin(self.freq * x)


def fft_conv(u: torch.Tensor, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Causal long convolution of u [B, C, L] with h [C, L] by FFT (zero-padded to 2L), plus u·bias."""
    length = u.shape[-1]
    n = 2 * length
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(h, n=n), n=n)[..., :length]
    return y + u * bias[:, None]


class HyenaOperator(nn.Module):
    def __init__(self, d_model: int, length: int, order: int = 2):
        super().__init__()
        self.order = order
        self.in_proj = nn.Linear(d_model, (order + 1) * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.short = nn.Conv1d((order + 1) * d_model, (order + 1) * d_model, 3, padding=2, groups=(order + 1) * d_model)
        self.filter = PositionalFilter(d_model, length, order=order)
        self.bias = nn.Parameter(torch.randn(order, d_model) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:            # x: [B, L, D]
        length = x.shape[1]
        u = self.short(self.in_proj(x).transpose(1, 2))[..., :length]    # causal short conv
        *gates, v = u.split(x.shape[-1], dim=1)
        filters = self.filter()
        for i in range(self.order):
            v = fft_conv(v * gates[-1 - i], filters[i], self.bias[i])
        return self.out_proj((v * gates[0]).transpose(1, 2))


class HyenaModel(nn.Module):
    def __init__(self, d_model: int = 128, length: int = 4096, layers: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(HyenaOperator(d_model, length) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(layers))

    def forward(self, x):
        for norm, block in zip(self.norms, self.blocks):
            x = x + block(norm(x))
        return x


def build(d_model: int = 128, length: int = 4096, layers: int = 2, batch: int = 1):
    torch.manual_seed(0)
    return HyenaModel(d_model, length, layers).eval(), (torch.randn(batch, length, d_model),)


def tiny():
    return build(d_model=16, length=256, layers=1, batch=2)
