"""compile()'s sparsity= option: what the user asks for, checked before any work.

    Sparsity()                          find what is already zero in the weights and remove it (exact)
    Sparsity("structured", ratio=0.5)   remove half of every prunable group's units (channels, heads, FFN units)
    Sparsity("structured", budget=0.01) per-group ratios chosen within a mean (1 − cosine) output error
    Sparsity("block", ratio=0.9)        90% of each linear's (32 × 32) weight blocks pruned; the block-sparse
                                        kernel kept per layer only where it measures faster than dense
    Sparsity("2:4")                     N:M weights (N of every M inputs kept), measured against dense
Every pattern but "zeros" prunes, so it needs calibration data (importance, reconstruction, the budget)."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ...errors import InputError
from ...options import Option, fraction
from ..base import available

PATTERNS = ("zeros", "structured", "block", "N:M (e.g. '2:4')")
RECONSTRUCT = ("refit", "bias", "none")


@dataclass(frozen=True)
class Sparsity(Option):
    keyword = "sparsity"
    pattern: str = "zeros"
    ratio: float | None = None          # fraction removed: units per group / blocks per layer
    budget: float | None = None         # allowed mean (1 − cosine) output error on the calibration data
    block: tuple[int, int] = (32, 32)   # (rows, cols) of a weight block, for "block"
    reconstruct: str = "refit"          # least-squares refit of the next layer | bias compensation | none
    layers: tuple[str, ...] = ()        # module-path prefixes to restrict pruning to (default: all)

    def __post_init__(self):
        if not isinstance(self.pattern, str) or not (self.pattern in ("zeros", "structured", "block") or self.nm):
            raise InputError(f"Sparsity pattern {self.pattern!r} is unknown: give one of {', '.join(PATTERNS)}")
        for arg, meaning in (("ratio", "the fraction removed"), ("budget", "the allowed mean 1 − cosine error")):
            if getattr(self, arg) is not None:
                fraction("Sparsity", arg, getattr(self, arg), meaning)
        if self.pattern == "zeros" and (self.ratio is not None or self.budget is not None):
            raise InputError("Sparsity('zeros') removes what is already zero: ratio= and budget= apply to a pruning "
                             "pattern ('structured', 'block', '2:4')")
        if self.ratio is not None and self.budget is not None:
            raise InputError("Sparsity: give ratio= (a fixed fraction) or budget= (ratios chosen within it), not both")
        if self.nm and self.ratio is not None:
            raise InputError(f"Sparsity({self.pattern!r}): the pattern fixes the ratio; give budget= or nothing")
        if self.pattern == "block" and self.ratio is None and self.budget is None:
            raise InputError("Sparsity('block') needs ratio= (e.g. 0.9) or budget=")
        if not (isinstance(self.block, tuple) and len(self.block) == 2 and all(isinstance(b, int) and b > 0
                                                                              for b in self.block)):
            raise InputError(f"Sparsity block={self.block!r}: give (rows, cols), two positive ints")
        if self.reconstruct not in RECONSTRUCT:
            raise InputError(f"Sparsity reconstruct={self.reconstruct!r}: one of {', '.join(RECONSTRUCT)}")
        object.__setattr__(self, "layers", tuple(self.layers))

    @property
    def nm(self) -> tuple[int, int] | None:
        m = re.fullmatch(r"(\d+):(\d+)", self.pattern) if isinstance(self.pattern, str) else None
        if m and 0 < int(m[1]) < int(m[2]):
            return int(m[1]), int(m[2])
        return None

    @property
    def prunes(self) -> bool:
        return self.pattern != "zeros"

    @property
    def needs_calibration(self) -> bool:   # importance, reconstruction and the budget are measured on it
        return self.prunes

    without_calibration = " (importance, reconstruction and the budget are measured on them)"

    def check(self, model: torch.nn.Module, target, backend: str) -> None:
        if self.prunes:
            check_fits(self, model)

    def passes(self) -> list:
        """Exact removal in the rewrite phase (already in every default pipeline); pruning in the lossy phase,
        before quantization (the float weights are pruned, then quantized)."""
        made = available()   # by name: prune.py reads this option, so importing it here would be a cycle
        return [made["sparsify"](self)] if self.prunes else [made["shrink_inert"]()]


def check_fits(sparsity: Sparsity, model: torch.nn.Module) -> None:
    """Block and N:M patterns apply to linears whose shape they tile: a layer the user named that does not fit,
    or a model where none fits, is an error naming the layer and why."""
    modules = dict(model.named_modules())
    for prefix in sparsity.layers:
        if not any(name == prefix or name.startswith(prefix + ".") for name in modules):
            raise InputError(f"Sparsity layers=: the model has no module {prefix!r}")
    if sparsity.pattern == "structured":
        return
    linears = {name: m for name, m in modules.items() if isinstance(m, torch.nn.Linear)}
    chosen = {n: m for n, m in linears.items()
              if not sparsity.layers or any(n == p or n.startswith(p + ".") for p in sparsity.layers)}
    why = {n: misfit(sparsity, m.out_features, m.in_features) for n, m in chosen.items()}
    bad = {n: w for n, w in why.items() if w}
    if sparsity.layers and bad:
        name, reason = next(iter(bad.items()))
        raise InputError(f"Sparsity({sparsity.pattern!r}) does not fit layer {name!r}: {reason}")
    if not chosen or len(bad) == len(chosen):
        first = f" (e.g. {next(iter(bad))!r}: {next(iter(bad.values()))})" if bad else ""
        raise InputError(f"Sparsity({sparsity.pattern!r}) fits no linear layer of the model{first}")


def misfit(sparsity: Sparsity, out_features: int, in_features: int) -> str | None:
    """Why the pattern cannot tile an [out, in] weight (None: it can)."""
    if sparsity.nm:
        m = sparsity.nm[1]
        return None if in_features % m == 0 else f"{in_features} inputs are not a multiple of M={m}"
    bh, bw = sparsity.block
    if out_features % bh or in_features % bw:
        return f"its {out_features}×{in_features} weight does not tile into {bh}×{bw} blocks"
    return None
