"""Numerics every layer may use: drift (how far a graph's outputs are from eager PyTorch's on the example inputs),
accuracy measures lossy passes are judged by (cosine error, SQNR, rank correlation)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree


@dataclass(frozen=True)
class Drift:
    max_abs: float     # largest |out - ref| over all output elements
    rel: float         # the same, divided by the output's scale (max |ref|): the number tolerances bound
    output: int        # index of the flattened output where `rel` is worst

    def as_dict(self) -> dict:
        return {"max_abs_err": self.max_abs, "rel_err": self.rel, "worst_output": self.output}


def flat_tensors(outputs) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]


def drift(outputs, reference: list[torch.Tensor]) -> Drift:
    got = flat_tensors(outputs)
    if len(got) != len(reference):
        return Drift(float("inf"), float("inf"), -1)
    worst = Drift(0.0, 0.0, 0)
    for i, (a, r) in enumerate(zip(got, reference)):
        if a.shape != r.shape:
            return Drift(float("inf"), float("inf"), i)
        a, r = a.detach().double().cpu(), r.detach().double().cpu()
        if a.numel() == 0:
            continue
        err = (a - r).abs().max().item()
        if err != err:  # NaN
            err = float("inf")
        rel = err / max(r.abs().max().item(), 1e-12) if err else 0.0
        if rel > worst.rel or (i == 0 and worst.max_abs == 0):
            worst = Drift(err, rel, i)
    return worst


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of `out` against `ref`, in dB."""
    ref, out = ref.detach().double(), out.detach().double()
    return (10 * torch.log10(ref.square().sum() / (ref - out).square().sum().clamp(min=1e-30))).item()


def rank_correlation(a, b) -> float:
    """Spearman's ρ: how well `b` preserves the order of `a`."""
    ra, rb = (torch.as_tensor(v).argsort().argsort().double() for v in (a, b))
    return torch.corrcoef(torch.stack([ra, rb]))[0, 1].item()


def cosine_error(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
    """mean (1 − cosine similarity) over outputs, each flattened per sample: the budget lossy passes
    (quantize='auto', layer skipping, pruning) spend."""
    errs = [1 - torch.nn.functional.cosine_similarity(o.reshape(len(o), -1).double(), r.reshape(len(r), -1).double(),
                                                      dim=1).mean().item() for o, r in zip(outs, refs)]
    return max(sum(errs) / len(errs), 0.0)
