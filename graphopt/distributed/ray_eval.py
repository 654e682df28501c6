"""The joint planner's candidate evaluations as Ray tasks: graphopt.Auto(workers=N) or Auto(ray_address="host:port").

An evaluation is what the search does most: apply a candidate plan to the graph (prune, drop blocks, quantize) and
run the held-out calibration batches through it for its loss. It is pure compute on data graphopt already has, so it
can run anywhere; latency is never measured on a worker (the cost model times the finalists where the target is).

What travels, through Ray's object store between graphopt's own processes (Ray pickles it):
- once per search (ray.put): the graph as the planner holds it, as plain data (graphopt.ir.wire: nodes, operator
  names, shapes, weights), the pruning statistics and block maps already fitted, the quantization options, the
  calibration batches (the fitting half: int8 ranges, maps refitted on a pruned graph; the held-out half) and the
  full graph's outputs on them;
- per candidate: the plan (layer, group and block names → levels), and back its loss and the seconds it took;
  with a metric callable, the candidate's outputs on the held-out batches come back and the metric runs here.
Never the user's model object, never the metric callable, never code: the workers import the same graphopt and
torch (a version mismatch is an error at start).

Results do not depend on where or in which order evaluations finish: the search asks for losses in its serial order
and computes batches of them ahead (graphopt.passes.auto.search), so the plan is the serial plan for the same seed.
Faults: a worker that dies (killed, out of memory, its node lost) has its candidate submitted again, `retries`
times; then the candidate is recorded as lost (counted as over the budget) and the search goes on; the pass's notes
list what was retried and lost. Every wait has a timeout (`task_timeout_s` per candidate)."""
from __future__ import annotations

import math
import os
import time
import uuid
from typing import Any

from ..errors import UnsupportedError
from .ray_cluster import WARM_TIMEOUT_S, Ray, RayTasks

SPACE_STATE = ("qopts", "maps")   # what Space.built reads besides the graph, the pruning and the fitting batches


# --- the worker side ------------------------------------------------------------------------------------------
_LOADED: dict[str, Any] = {}   # per worker process: the search's data, by search token (the latest only)


class _NotHere:
    """The target and cost model a worker's pass context holds: a worker builds candidates, never times them."""
    host = False
    unmeasurable = "a Ray worker evaluates candidates' losses; latency is measured where the search runs"
    on = "a Ray worker"


class _Candidates:
    """A worker's copy of the search's space: builds a plan's graph as the search's own Space.built does (the same
    method, on the same graph, statistics, maps and options) and runs the held-out batches through it."""

    def __init__(self, data: dict):
        from ..ir.wire import from_wire
        from ..passes.auto.space import Space
        from ..passes.base import PassContext
        from ..passes.sparsity.prune import GroupPruning
        space = Space.__new__(Space)
        space.graph = from_wire(data["graph"])
        space.pruning = GroupPruning.restore(space.graph, data["pruning"]) if data["pruning"] else None
        space.ctx = PassContext(_NotHere(), *data["example"], [], _NotHere())
        space.fit = data["fit"]
        for name, value in data["space"].items():
            setattr(space, name, value)
        self.space, self.data = space, data
        self.refs: dict[str, list] = {}

    def evaluate(self, plan: dict, which: str, refs_box: list) -> Any:
        import ray
        from .. import quality
        from ..passes.auto.plan import Plan
        from ..passes.calibration import run_batches
        d = self.data
        batches = d["fit"] + d["batches"]["check"] if which == "all" else d["batches"][which]
        outs = run_batches(self.space.built(Plan(**plan)), batches)
        if d["metric"] is None:          # a metric callable: scored where the search runs
            return outs
        if which not in self.refs:
            self.refs[which] = ray.get(refs_box[0], timeout=WARM_TIMEOUT_S)
        return quality.loss(outs, self.refs[which], d["metric"], d["per_batch"])


def _loaded(data_box: list, token: str) -> _Candidates:
    if token not in _LOADED:
        import ray
        _LOADED.clear()
        _LOADED[token] = _Candidates(ray.get(data_box[0], timeout=WARM_TIMEOUT_S))
    return _LOADED[token]


def _warm(data_box: list, token: str) -> tuple[str, int]:
    """Load the search's data in this worker; say which torch it runs."""
    import torch
    _loaded(data_box, token)
    return torch.__version__, os.getpid()


def _evaluate(data_box: list, token: str, plan: dict, which: str, refs_box: list) -> tuple[Any, float, int]:
    """One candidate: (its loss, or its outputs for a metric callable; the seconds it took; this worker's pid)."""
    t0 = time.perf_counter()
    value = _loaded(data_box, token).evaluate(plan, which, refs_box)
    return value, time.perf_counter() - t0, os.getpid()


# --- the driver side ------------------------------------------------------------------------------------------
class RayPool:
    """The search's evaluations on Ray: `losses(plans)` evaluates a batch at once and answers in the batch's order."""

    def __init__(self, option: Ray, space, graph: dict, fit: list, check: list, refs: list, metric, per_batch: int):
        """`graph`: the search's graph as graphopt.ir.wire.to_wire wrote it."""
        import ray
        import torch
        from .. import quality
        self.metric, self.per_batch = metric, per_batch
        self.tasks = tasks = RayTasks(option)
        self.named = named = isinstance(metric, str) and metric in quality.METRICS
        data = {"graph": graph, "pruning": space.pruning.portable() if space.pruning else None, "fit": fit,
                "space": {k: getattr(space, k) for k in SPACE_STATE if hasattr(space, k)},
                "batches": {"check": check},
                "example": (space.ctx.example_args, space.ctx.example_kwargs),
                "metric": metric if named else None, "per_batch": per_batch}
        self._data = [ray.put(data)]
        self._refs = {"check": [ray.put(refs if named else None)]}
        self._host_refs = {"check": refs}
        self._token = uuid.uuid4().hex
        self._task = tasks.remote(_evaluate)
        theirs = {v for v, _ in tasks.warm(tasks.remote(_warm), self._data, self._token)} - {torch.__version__}
        if theirs:
            tasks.close()
            raise UnsupportedError(f"the Ray workers run torch {', '.join(sorted(theirs))}, this process "
                                   f"{torch.__version__}: install the same graphopt and torch on every node")
        self.width, self.startup_s = tasks.width, tasks.startup_s

    def losses(self, plans: list[tuple[str, dict]], which: str = "check", refs: list | None = None) -> list[float]:
        """Each (label, plan)'s loss on the held-out batches (`which` = "all": on every calibration batch, against
        `refs`), in the given order; a candidate lost to dead workers or the timeout is recorded and gets +inf."""
        import ray
        from .. import quality
        if which not in self._refs:
            self._refs[which] = [ray.put(refs if self.named else None)]
            self._host_refs[which] = refs
        values = self.tasks.gather(lambda plan: self._task.remote(self._data, self._token, plan, which,
                                                                  self._refs[which]),
                                   plans, "counted as over the budget")
        return [math.inf if v is None else float(v) if self.named else
                quality.loss(v, self._host_refs[which], self.metric, self.per_batch) for v in values]

    def report(self) -> list[str]:
        """The pass's notes: where candidates were evaluated, how long each took, what was retried or lost."""
        return self.tasks.report("candidates evaluated")

    def close(self) -> None:
        self.tasks.close()
