"""Calibration: run the IR on the user's batches and record the range of chosen activations.

An Observer keeps the exact running min/max and a bounded random sample of the values; from those
it derives a clipping range three ways — "minmax" (the exact range), "percentile" (99.99th of |x|
on each side) or "mse" (the clip that minimises the int8 quantization error on the sample)."""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.fx as fx

from ..errors import InputError
from ..ir import Graph

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


def observe(graph: Graph, batches: Iterable, nodes: Iterable[fx.Node],
            on_node: Callable[[fx.Node, tuple, object], None] | None = None) -> dict[str, Observer]:
    """Run every batch through the graph; observe the outputs of `nodes` (by name). `on_node(node, args,
    out)` sees each node's evaluated arguments and result too (bias correction measures with it)."""
    watched = {n.name for n in nodes}
    observers = {name: Observer() for name in watched}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in watched:
                observers[n.name].update(out)
            if on_node is not None and n.op == "call_function":
                on_node(n, self.map_nodes_to_values(n.args, n), out)
            return out

    recorder = Recorder(graph.module)
    with torch.no_grad():
        for args, kwargs in batches:
            recorder.run(*graph.flat_inputs(args, kwargs))
    return observers


def check_batches(calibration, example_args: tuple, example_kwargs: dict) -> list[tuple[tuple, dict]]:
    """The user's calibration data as (args, kwargs) pairs shaped like the example inputs (batch
    size may differ), or a clear InputError before any work."""
    if calibration is None:
        return []
    if isinstance(calibration, (torch.Tensor, dict)) or not isinstance(calibration, Iterable):
        raise InputError("calibration= takes a list of batches, each shaped like example_inputs "
                         f"(a tensor, a tuple of tensors or a dict), got {type(calibration).__name__}")
    batches = []
    for i, b in enumerate(calibration):
        args, kwargs = ((b,), {}) if isinstance(b, torch.Tensor) else ((), dict(b)) if isinstance(b, dict) \
            else (tuple(b), {})
        expect = list(example_args) + [example_kwargs[k] for k in sorted(example_kwargs)]
        given = list(args) + [kwargs.get(k) for k in sorted(example_kwargs)]
        if len(args) != len(example_args) or set(kwargs) != set(example_kwargs):
            raise InputError(f"calibration batch {i} has {len(args)} positional / {sorted(kwargs)} keyword inputs; "
                             f"example_inputs has {len(example_args)} / {sorted(example_kwargs)}")
        for j, (g, e) in enumerate(zip(given, expect)):
            if not isinstance(g, torch.Tensor) or g.dtype != e.dtype or g.shape[1:] != e.shape[1:]:
                got = f"{tuple(g.shape)} {g.dtype}" if isinstance(g, torch.Tensor) else type(g).__name__
                raise InputError(f"calibration batch {i}, input {j}: got {got}, expected shape (*, "
                                 f"{', '.join(map(str, e.shape[1:]))}) {e.dtype} like the example input")
        batches.append((args, kwargs))
    if not batches:
        raise InputError("calibration= is empty: give a few batches of representative inputs")
    return batches
