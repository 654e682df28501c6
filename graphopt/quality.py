"""The quality a lossy plan spends, one definition for every family: mean (1 − cosine) to the full model's
outputs ("cosine"), top-1 disagreement with the full model ("top1", for classifiers), or the user's own
callable `metric(outputs, reference) -> loss` (task accuracy on their labels, say). A budget is the loss
allowed, a number in (0, 1); planners measure it end to end on held-out calibration batches."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from .errors import InputError
from .options import fraction
from .numerics import cosine_error

METRICS = ("cosine", "top1")
Metric = str | Callable[[list, list], float]


def check(option: str, budget, metric, callables: bool = True) -> None:
    """InputError for a budget outside (0, 1) or a metric that is neither a known name nor (where the option
    takes one) a callable: raised when the option is made."""
    fraction(option, "budget", budget, "the allowed quality loss, e.g. 0.01 (mean 1 − cosine to the full "
             "model's outputs, top-1 disagreement with metric='top1', or what your metric callable returns)")
    if isinstance(metric, str) and metric in METRICS or callables and callable(metric) and not isinstance(metric, str):
        return
    takes = "'cosine', 'top1' or a callable metric(outputs, reference) -> loss" if callables else "'cosine' or 'top1'"
    raise InputError(f"{option}(metric={metric!r}): give {takes} ('cosine': mean 1 − cosine to the full model's "
                     "outputs; 'top1': top-1 disagreement with the full model, for classifiers)")


def name(metric: Metric) -> str:
    """How the report and the plan name the metric: the name, or the callable's qualified name."""
    return metric if isinstance(metric, str) else getattr(metric, "__qualname__", type(metric).__name__)


def per_sample(out: torch.Tensor, ref: torch.Tensor, metric: str) -> torch.Tensor:
    """The loss of each sample (row of dim 0) of one output against the full model's."""
    if metric == "top1":
        return (out.argmax(-1) != ref.argmax(-1)).double().reshape(len(out), -1).mean(1)
    return 1 - torch.nn.functional.cosine_similarity(out.reshape(len(out), -1).double(),
                                                     ref.reshape(len(ref), -1).double(), dim=1)


def loss(outs: list[torch.Tensor], refs: list[torch.Tensor], metric: Metric, per_batch: int = 1) -> float:
    """Mean loss over the outputs (flattened lists, as calibration.run_batches gives them: `per_batch` float
    outputs per batch). A callable gets one entry per batch on each side — the output tensor, or a tuple of them
    where the model has several — and returns the loss; what it raises or returns other than a finite number is
    an InputError naming it."""
    if metric == "cosine":
        return cosine_error(outs, refs)
    if metric == "top1":
        return sum(per_sample(o, r, metric).mean().item() for o, r in zip(outs, refs)) / max(len(outs), 1)
    group = (lambda ts: [ts[i] if per_batch == 1 else tuple(ts[i:i + per_batch])
                         for i in range(0, len(ts), per_batch)])
    try:
        value: Any = metric(group(outs), group(refs))
    except Exception as e:
        raise InputError(f"the metric callable {name(metric)!r} raised {type(e).__name__}: {e}") from e
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"the metric callable {name(metric)!r} returned {value!r}: it must return the quality lost "
                         "as a finite number (0 for the full model's own outputs)")
    return float(value)
