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

import contextlib
import importlib.util
import logging
import math
import os
import shutil
import socket
import statistics
import tempfile
import time
import uuid
from typing import Any

from ..errors import InputError, UnsupportedError

WARM_TIMEOUT_S = 300.0   # a fresh worker imports torch and graphopt and reads the search's data once
SPACE_STATE = ("qopts", "maps")   # what Space.built reads besides the graph, the pruning and the fitting batches


class Ray:
    """Where graphopt.Auto evaluates its candidate plans: Ray tasks instead of this process. For example::

        graphopt.Auto(budget, workers=2)                      # a local Ray of 2 worker processes on this machine
        graphopt.Auto(budget, ray_address="10.0.0.5:6379")    # an existing cluster (its head's GCS address)
        graphopt.Auto(budget, workers=graphopt.Ray(address="10.0.0.5:6379", workers=64, task_timeout_s=300))

    `address`: a running cluster's "host:port" (or "ray://host:port" for Ray Client); None starts a local Ray on
    127.0.0.1 with `workers` CPUs for the search and stops it after. Where Ray is already initialized in this
    process (ray.init by the caller), that connection is used as it is and left running.
    `workers`: how many candidates are evaluated at once (default: the local CPUs, or the cluster's).
    `task_timeout_s`: the longest one candidate may take (a worker that hangs is abandoned, its candidate lost).
    `retries`: how many times a candidate whose worker died is submitted again before it is recorded as lost.
    `connect_timeout_s`: how long checking the address may take, before capture (an InputError when unreachable).
    The module's docstring (graphopt/distributed/ray_eval.py) says what travels."""

    def __init__(self, address: str | None = None, workers: int | None = None, task_timeout_s: float = 600.0,
                 retries: int = 2, connect_timeout_s: float = 5.0):
        if address is not None and (not isinstance(address, str) or _host_port(address) is None):
            raise InputError(f"Ray(address={address!r}): give the cluster's 'host:port' (its head node's GCS "
                             "address, e.g. '10.0.0.5:6379') or 'ray://host:port', or None for a local Ray")
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise InputError(f"Ray(workers={workers!r}): give how many candidates to evaluate at once (≥ 1)")
        for name, value in (("task_timeout_s", task_timeout_s), ("connect_timeout_s", connect_timeout_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise InputError(f"Ray({name}={value!r}): give seconds (> 0)")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise InputError(f"Ray(retries={retries!r}): give how many times a lost evaluation is retried (≥ 0)")
        self.address, self.workers, self.retries = address, workers, retries
        self.task_timeout_s, self.connect_timeout_s = float(task_timeout_s), float(connect_timeout_s)

    def __repr__(self) -> str:
        where = f"address={self.address!r}" if self.address else "local"
        return f"Ray({where}" + (f", workers={self.workers}" if self.workers else "") + ")"

    def check(self) -> None:
        """Before capture: Ray is installed, and the cluster's address answers within `connect_timeout_s`."""
        if importlib.util.find_spec("ray") is None:
            raise UnsupportedError(f"{self!r} evaluates candidates as Ray tasks, and Ray is not installed: "
                                   "pip install -e '.[distributed]'")
        if self.address is None:
            return
        host, port = _host_port(self.address)
        try:
            with socket.create_connection((host, port), timeout=self.connect_timeout_s):
                pass
        except OSError as e:
            raise InputError(f"the Ray cluster at {self.address!r} is unreachable ({e.strerror or e} within "
                             f"{self.connect_timeout_s:g} s): start it (`ray start --head --port {port}` on its head "
                             "node) or give the right address, or workers=N for a local Ray") from e


def _host_port(address: str) -> tuple[str, int] | None:
    rest = address[len("ray://"):] if address.startswith("ray://") else address
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host.strip("[]"), int(port)


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
        from .. import quality
        self.option, self.metric, self.per_batch = option, metric, per_batch
        self.seconds: list[float] = []       # per candidate, measured in the worker
        self.retried: list[str] = []
        self.lost: list[str] = []
        self.workers_seen: set[int] = set()
        self.owned, self._temp = False, None
        self.rounds, self.waited_s = 0, 0.0
        t0 = time.perf_counter()
        try:
            self._connect(ray)
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
            self._task = ray.remote(num_cpus=1, max_retries=0)(_evaluate)
            warm = ray.remote(num_cpus=1, max_retries=0)(_warm)
            versions = ray.get([warm.remote(self._data, self._token) for _ in range(self.width)],
                               timeout=WARM_TIMEOUT_S)
            import torch
            theirs = {v for v, _ in versions} - {torch.__version__}
            if theirs:
                raise UnsupportedError(f"the Ray workers run torch {', '.join(sorted(theirs))}, this process "
                                       f"{torch.__version__}: install the same graphopt and torch on every node")
        except BaseException:
            self.close()
            raise
        self.startup_s = time.perf_counter() - t0
        where = f"the cluster at {self.option.address}" if self.option.address else (
            "the Ray this process had started" if not self.owned else "a local Ray on 127.0.0.1")
        self.where = f"{where}, {self.width} at once"

    def _connect(self, ray) -> None:
        from ..quiet import quiet
        if ray.is_initialized():
            self.width = self.option.workers or max(int(ray.cluster_resources().get("CPU", 1)), 1)
            return
        settings = dict(log_to_driver=False, logging_level=logging.ERROR, include_dashboard=False)
        if self.option.address is None:   # its session files in a folder of ours, removed when it stops
            self.width = self.option.workers or os.cpu_count() or 1
            self._temp = tempfile.mkdtemp(prefix="graphopt-ray-")
            settings |= dict(num_cpus=self.width, _node_ip_address="127.0.0.1", _temp_dir=self._temp)
        else:
            settings |= dict(address=self.option.address)
        usage = os.environ.get("RAY_USAGE_STATS_ENABLED")
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"     # nothing reported to Ray's usage service from here
        try:
            with quiet(stdout=True), _ray_logs_quiet():
                ray.init(**settings)
        finally:
            if usage is None:
                os.environ.pop("RAY_USAGE_STATS_ENABLED", None)
            else:
                os.environ["RAY_USAGE_STATS_ENABLED"] = usage
        self.owned = True
        if self.option.address is not None:
            self.width = self.option.workers or max(int(ray.cluster_resources().get("CPU", 1)), 1)

    def close(self) -> None:
        if self.owned:
            import ray
            from ..quiet import quiet
            with quiet(stdout=True), _ray_logs_quiet():
                ray.shutdown()
            self.owned = False
        if self._temp is not None:
            shutil.rmtree(self._temp, ignore_errors=True)
            self._temp = None

    def losses(self, plans: list[tuple[str, dict]], which: str = "check", refs: list | None = None) -> list[float]:
        """Each (label, plan)'s loss on the held-out batches (`which` = "all": on every calibration batch, against
        `refs`), in the given order; a candidate lost to dead workers or the timeout is recorded and gets +inf."""
        import ray
        from .. import quality
        if which not in self._refs:
            self._refs[which] = [ray.put(refs if self.named else None)]
            self._host_refs[which] = refs
        calls = [self._submit(plan, which) for _, plan in plans]
        started = begun = time.perf_counter()
        self.rounds += 1
        waves = math.ceil(len(plans) / self.width)
        out = []
        for (label, plan), call in zip(plans, calls):
            attempt = 1
            while True:
                left = max(started + waves * self.option.task_timeout_s - time.perf_counter(), 0.01)
                try:
                    value, seconds, pid = ray.get(call, timeout=left)
                    break
                except ray.exceptions.GetTimeoutError:
                    ray.cancel(call, force=True)
                    why = f"no answer within {self.option.task_timeout_s:g} s"
                except ray.exceptions.RayTaskError as e:   # our code raised there: as it would have here
                    cause = getattr(e, "cause", None)
                    raise (cause if isinstance(cause, BaseException) else e) from None
                except ray.exceptions.RayError as e:       # the worker, its node or the object died
                    why = f"{type(e).__name__}: {_first_line(e)}"
                    if attempt <= self.option.retries:
                        attempt += 1
                        self.retried.append(f"{label}: {why}; submitted again (attempt {attempt})")
                        call, started = self._submit(plan, which), time.perf_counter()
                        waves = 1
                        continue
                value = None
                self.lost.append(f"{label}: {why}; lost after {attempt} attempt{'s' * (attempt > 1)}, counted "
                                 "as over the budget")
                break
            if value is None:
                out.append(math.inf)
                continue
            self.seconds.append(seconds)
            self.workers_seen.add(pid)
            out.append(float(value) if self.named else
                       quality.loss(value, self._host_refs[which], self.metric, self.per_batch))
        self.waited_s += time.perf_counter() - begun
        return out

    def _submit(self, plan: dict, which: str):
        return self._task.remote(self._data, self._token, plan, which, self._refs[which])

    def report(self) -> list[str]:
        """The pass's notes: where candidates were evaluated, how long each took, what was retried or lost."""
        lines = []
        if self.seconds:
            lines.append(f"candidates evaluated as Ray tasks on {self.where}: {len(self.seconds)} evaluations on "
                         f"{len(self.workers_seen)} worker processes, {statistics.median(self.seconds):.3f} s each "
                         f"(median, in the worker; mean {statistics.mean(self.seconds):.3f}, max "
                         f"{max(self.seconds):.3f}); {self.rounds} batches waited for {self.waited_s:.1f} s; "
                         f"start-up {self.startup_s:.1f} s")
        lines += [f"retried: {r}" for r in self.retried]
        lines += [f"lost: {r}" for r in self.lost]
        return lines


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


@contextlib.contextmanager
def _ray_logs_quiet():
    """Ray's own loggers at ERROR while it starts and stops (its start-up INFO lines, its shutdown warnings)."""
    loggers = [logging.getLogger(n) for n in ("ray", "ray.worker", "ray._private", "ray.util")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
