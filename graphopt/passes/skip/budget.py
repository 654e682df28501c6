"""The quality a skipping plan spends: mean (1 − cosine) to the full model's outputs, as `accuracy_budget`
measures it, or top-1 disagreement with the full model (`metric="top1"`, for classifiers)."""
from __future__ import annotations

import torch

from ...errors import InputError
from ...options import fraction
from ...numerics import cosine_error

METRICS = ("cosine", "top1")


def check(option: str, budget, metric: str) -> None:
    """InputError for a budget outside (0, 1) or an unknown metric (raised when the option is made)."""
    fraction(option, "budget", budget, "the allowed quality loss, e.g. 0.01 (mean 1 − cosine to the full "
             "model's outputs, or top-1 disagreement with metric='top1')")
    if metric not in METRICS:
        raise InputError(f"{option}(metric={metric!r}): choose 'cosine' (mean 1 − cosine to the full model's outputs) "
                         "or 'top1' (top-1 disagreement with the full model, for classifiers)")


def per_sample(out: torch.Tensor, ref: torch.Tensor, metric: str) -> torch.Tensor:
    """The loss of each sample (row of dim 0) of one output against the full model's."""
    if metric == "top1":
        return (out.argmax(-1) != ref.argmax(-1)).double().reshape(len(out), -1).mean(1)
    return 1 - torch.nn.functional.cosine_similarity(out.reshape(len(out), -1).double(),
                                                     ref.reshape(len(ref), -1).double(), dim=1)


def loss(outs: list[torch.Tensor], refs: list[torch.Tensor], metric: str) -> float:
    """Mean loss over the outputs (flattened lists, as calibration.run_batches gives them)."""
    if metric == "cosine":
        return cosine_error(outs, refs)
    return sum(per_sample(o, r, metric).mean().item() for o, r in zip(outs, refs)) / max(len(outs), 1)
