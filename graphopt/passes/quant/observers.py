"""Activation ranges for quantization: an Observer keeps the exact running min/max and a bounded
random sample of the values; from those it derives a clipping range three ways — "minmax" (the
exact range), "percentile" (99.99th of |x| on each side) or "mse" (the clip that minimises the int8
quantization error on the sample)."""
from __future__ import annotations

import torch

SAMPLE = 1 << 16          # values kept per observed tensor per batch
METHODS = ("minmax", "percentile", "mse")


class Observer:
    def __init__(self):
        self.lo, self.hi = float("inf"), float("-inf")
        self.samples: list[torch.Tensor] = []

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1)
        self.lo, self.hi = min(self.lo, x.min().item()), max(self.hi, x.max().item())
        if x.numel() > SAMPLE:
            x = x[torch.randint(x.numel(), (SAMPLE,), generator=torch.Generator().manual_seed(len(self.samples)))]
        self.samples.append(x)

    def range(self, method: str, unsigned: bool) -> tuple[float, float]:
        """The (lo, hi) to quantize to, always containing 0 so that zero is exact."""
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        if method == "minmax":
            return lo, hi
        values = torch.cat(self.samples)
        if method == "percentile":
            q = torch.quantile(values, torch.tensor([1e-4, 1 - 1e-4])).tolist()
            return min(q[0], 0.0), max(q[1], 0.0)
        if method == "mse":
            return _mse_range(values, lo, hi, unsigned)
        raise ValueError(method)


def _mse_range(values: torch.Tensor, lo: float, hi: float, unsigned: bool) -> tuple[float, float]:
    """Shrink the min/max range by the factor (100 tried, 0.01 to 1) with the least uint8 rounding+clipping MSE."""
    candidates = [(lo * f, hi * f) for f in torch.logspace(-2, 0, 100).tolist()]
    return min(candidates, key=lambda r: quantization_mse(values, *r))


def quantization_mse(values: torch.Tensor, lo: float, hi: float) -> float:
    """Mean squared error of `values` after uint8 quantization over [lo, hi] (rounding and clipping)."""
    scale = max((hi - lo) / 255, 1e-12)
    zp = round(-lo / scale)
    q = torch.clamp(torch.round(values / scale) + zp, 0, 255)
    return ((q - zp) * scale - values).square().mean().item()
