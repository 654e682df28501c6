"""compile()'s optimize= option: one accuracy budget for every lossy family.

    graphopt.Auto(budget=0.01, metric="cosine" | "top1" | callable, time_budget=None)
        search the fastest plan across quantization, structured pruning and layer skipping whose loss on
        held-out calibration batches fits the budget (cm.plan says what it chose)
    graphopt.Auto(..., workers=4) / Auto(..., ray_address="host:port") / Auto(..., workers=graphopt.Ray(...))
        the same search, the same plan, its candidates' losses evaluated as Ray tasks (a local Ray of 4 worker
        processes, or an existing cluster); latency is still measured here, on the target
    graphopt.Plan.load("plan.json")  (or the path itself)
        rebuild a saved plan without searching
A metric callable gets (outputs, reference) — lists with one entry per held-out batch, the candidate's and the
full model's outputs — and returns the loss (e.g. accuracy lost on the user's labels for those batches;
graphopt.Auto.split(calibration) says which batches are held out)."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ... import quality
from ...distributed.ray_cluster import Ray, ray_option
from ...errors import InputError, UnsupportedError
from ...numerics import flat_tensors
from ...options import Option
from ..base import available
from .joint import split
from .plan import Plan
from ..skip import EarlyExit
from .space import FAMILIES

EXIT_SHARE = 0.5    # of the budget, to the static plan when early exit follows it


class _Planned(Option):
    """What Auto and a saved plan share: both need calibration batches, split into a fitting and a held-out half."""
    keyword = "optimize"
    why_batches = ": one part fits (pruning's reconstruction, int8 ranges), the held-out rest checks the budget"

    @property
    def needs_calibration(self) -> bool:
        return True

    @property
    def min_batches(self) -> int:
        return 2


class Auto(_Planned):

    def __init__(self, budget: float = 0.01, metric: quality.Metric = "cosine", time_budget: float | None = None,
                 families=FAMILIES, seed: int = 0, progress: bool | None = None, early_exit: bool = False,
                 workers: int | Ray | None = None, ray_address: str | None = None):
        """workers / ray_address: where candidate plans' losses are evaluated — this process (None, the default),
        a local Ray of `workers` processes, the Ray cluster at `ray_address`, or graphopt.Ray(...) for its timeouts
        and retries. The plan is the same as the serial search's for the same seed (graphopt.Ray says what
        travels); Ray is imported only when asked for."""
        quality.check("Auto", budget, metric)
        if not isinstance(early_exit, bool):
            raise InputError(f"Auto(early_exit={early_exit!r}): True allows a dynamic program (per-sample exits), "
                             "False keeps one static graph")
        if early_exit and not isinstance(metric, str):
            raise InputError("Auto(early_exit=True) scores each sample to set exit thresholds: give metric='cosine' "
                             "or 'top1', not a callable")
        if time_budget is not None and (isinstance(time_budget, bool) or not isinstance(time_budget, (int, float))
                                        or not math.isfinite(time_budget) or time_budget <= 0):
            raise InputError(f"Auto(time_budget={time_budget!r}): give the seconds the search may take (> 0), or "
                             "None to search until it stops improving")
        families = (families,) if isinstance(families, str) else tuple(families)
        if not families or set(families) - set(FAMILIES):
            raise InputError(f"Auto(families={families!r}): give some of {', '.join(map(repr, FAMILIES))}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InputError(f"Auto(seed={seed!r}): give an int")
        self.budget, self.metric, self.time_budget = float(budget), metric, time_budget
        self.families, self.seed, self.progress, self.early_exit = families, seed, progress, early_exit
        self.distributed = ray_option("Auto", workers, ray_address)

    def __repr__(self) -> str:
        extra = (f", time_budget={self.time_budget:g}" if self.time_budget else "") + \
            (", early_exit=True" if self.early_exit else "") + (f", workers={self.distributed!r}" if self.distributed
                                                                else "")
        return f"Auto(budget={self.budget:g}, metric={quality.name(self.metric)!r}{extra})"

    split = staticmethod(split)   # (fitting batches, held-out batches) of a calibration list

    @property
    def dynamic_batch(self) -> bool:   # early exit's segments run on the samples still going
        return self.early_exit

    def check_graph(self, graph) -> None:
        if self.early_exit:
            EarlyExit(self.budget, self.metric).check_graph(graph)

    def check(self, model: torch.nn.Module, target, backend: str) -> None:
        if self.distributed is not None:      # Ray installed, the cluster's address answers: before capture
            self.distributed.check()
        why = target.ort_unavailable() if backend in ("ort", "auto") else target.unmeasurable
        if why:
            raise UnsupportedError(f"optimize={self!r} measures every plan's latency on the target, and {why}; "
                                   "search on a machine that can time the target, save cm.plan, and give the plan "
                                   "back here as optimize=")
        dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
        if dtypes - {torch.float32}:
            raise UnsupportedError(f"optimize={self!r} plans float32 models; this one has "
                                   f"{', '.join(sorted(map(str, dtypes)))} weights: call model.float() first")

    def check_data(self, model: torch.nn.Module, calibration: list) -> None:
        """A metric callable is tried before capture on the full model's own held-out outputs (loss 0 expected):
        one that raises or returns a non-number is an InputError naming it now, not after minutes of search."""
        if callable(self.metric):
            _, check = split(calibration)
            with torch.no_grad():
                outs = [t for args, kwargs in check for t in flat_tensors(model(*args, **kwargs))
                        if t.is_floating_point()]
            quality.loss(outs, outs, self.metric, len(outs) // len(check))

    def passes(self) -> list:
        """The joint plan; with early_exit=True, exits planned on the planned graph after it, each within half the
        budget (top-1 disagreement with the full model is at most the sum of the two disagreements; cosine
        error nearly so): a fixed split, not yet searched."""
        made = available()
        static = EXIT_SHARE if self.early_exit else 1.0
        joint = made["auto"](self.budget * static, self.metric, self.time_budget, self.families, self.seed,
                             self.progress, workers=self.distributed)
        return [joint] + ([made["early_exit"](self.budget * (1 - static), self.metric)] if self.early_exit else [])


class SavedPlan(_Planned):
    """A plan given back to compile(): applied as saved, no search."""

    def __init__(self, plan: Plan):
        self.plan = plan

    def __repr__(self) -> str:
        return f"Plan({self.plan.summary()})"

    def passes(self) -> list:
        return [available()["apply_plan"](self.plan)]


def optimize_option(value) -> Option | None:
    """compile()'s optimize=: a graphopt.Auto, a graphopt.Plan, or the path of a saved plan."""
    if value is None or isinstance(value, Auto):
        return value
    if isinstance(value, Plan):
        return SavedPlan(value)
    if isinstance(value, (str, Path)):
        return SavedPlan(Plan.load(value))
    raise InputError(f"optimize= takes a graphopt.Auto(...), a graphopt.Plan or the path of a saved plan, got "
                     f"{type(value).__name__}")

