"""Ray, the engine graphopt's work runs on where it outgrows this process: the option naming where (graphopt.Ray),
its check before capture, and one run's tasks on it (RayTasks: connect or start, warm the workers, gather results
in order with timeouts and retries, stop what was started).

Two kinds of work use it: the joint planner's candidate evaluations (ray_eval.py, graphopt.Auto(workers=)) and
MetaSchedule's candidate builds (ray_build.py, graphopt.Tune(workers=)). Each remote function returns
(value, seconds, worker pid); Ray pickles values between graphopt's own processes, never anything the user gave."""
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
from typing import Any, Callable

from . import first_line
from ..errors import InputError, UnsupportedError

WARM_TIMEOUT_S = 300.0   # a fresh worker imports torch, graphopt (and TVM) and reads the run's data once


class Ray:
    """Where graphopt runs its candidates' work as Ray tasks instead of this process: Auto's evaluations, Tune's
    builds. For example::

        graphopt.Auto(budget, workers=2)                      # a local Ray of 2 worker processes on this machine
        graphopt.Auto(budget, ray_address="10.0.0.5:6379")    # an existing cluster (its head's GCS address)
        graphopt.Auto(budget, workers=graphopt.Ray(address="10.0.0.5:6379", workers=64, task_timeout_s=300))
        graphopt.Tune(trials=64, workers=graphopt.Ray(address="10.0.0.5:6379"))   # MetaSchedule's builds

    `address`: a running cluster's "host:port" (or "ray://host:port" for Ray Client); None starts a local Ray on
    127.0.0.1 with `workers` CPUs for the run and stops it after. Where Ray is already initialized in this
    process (ray.init by the caller), that connection is used as it is and left running.
    `workers`: how many tasks run at once (default: the local CPUs, or the cluster's).
    `task_timeout_s`: the longest one task may take (a worker that hangs is abandoned, its task lost).
    `retries`: how many times a task whose worker died is submitted again before it is recorded as lost.
    `connect_timeout_s`: how long checking the address may take, before capture (an InputError when unreachable).
    ray_eval.py and ray_build.py say what travels."""

    def __init__(self, address: str | None = None, workers: int | None = None, task_timeout_s: float = 600.0,
                 retries: int = 2, connect_timeout_s: float = 5.0):
        if address is not None and (not isinstance(address, str) or _host_port(address) is None):
            raise InputError(f"Ray(address={address!r}): give the cluster's 'host:port' (its head node's GCS "
                             "address, e.g. '10.0.0.5:6379') or 'ray://host:port', or None for a local Ray")
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise InputError(f"Ray(workers={workers!r}): give how many tasks to run at once (≥ 1)")
        for name, value in (("task_timeout_s", task_timeout_s), ("connect_timeout_s", connect_timeout_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise InputError(f"Ray({name}={value!r}): give seconds (> 0)")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise InputError(f"Ray(retries={retries!r}): give how many times a lost task is retried (≥ 0)")
        self.address, self.workers, self.retries = address, workers, retries
        self.task_timeout_s, self.connect_timeout_s = float(task_timeout_s), float(connect_timeout_s)

    def __repr__(self) -> str:
        where = f"address={self.address!r}" if self.address else "local"
        return f"Ray({where}" + (f", workers={self.workers}" if self.workers else "") + ")"

    def check(self) -> None:
        """Before capture: Ray is installed, and the cluster's address answers within `connect_timeout_s`."""
        if importlib.util.find_spec("ray") is None:
            raise UnsupportedError(f"{self!r} runs tasks on Ray, and Ray is not installed: "
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


def ray_option(owner: str, workers, ray_address) -> Ray | None:
    """An option's workers= and ray_address= as one graphopt.Ray (or None: this process does the work)."""
    if isinstance(workers, Ray):
        if ray_address is not None:
            raise InputError(f"{owner}(workers=graphopt.Ray(...), ray_address=...): give the address inside "
                             "Ray(address=)")
        return workers
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise InputError(f"{owner}(workers={workers!r}): give how many tasks to run at once on Ray (an int ≥ 1), "
                         "a graphopt.Ray(...), or None to do the work in this process")
    if ray_address is not None and (not isinstance(ray_address, str) or _host_port(ray_address) is None):
        raise InputError(f"{owner}(ray_address={ray_address!r}): give the cluster's 'host:port' (its head node's "
                         "GCS address, e.g. '10.0.0.5:6379') or 'ray://host:port'")
    if workers is None and ray_address is None:
        return None
    return Ray(address=ray_address, workers=workers)


def _host_port(address: str) -> tuple[str, int] | None:
    rest = address[len("ray://"):] if address.startswith("ray://") else address
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host.strip("[]"), int(port)


class RayTasks:
    """One run's tasks on Ray. Connects where the option says (starting a local Ray where it names none, in a
    temporary folder of ours), runs tasks `width` at once, and `gather`s their results in the order asked, with
    the option's timeout and retries; `close` stops only what it started. What was retried or lost, and how long
    each task took in its worker, is kept for the run's report."""

    def __init__(self, option: Ray):
        import ray
        self.option = option
        self.seconds: list[float] = []       # per task, measured in the worker
        self.retried: list[str] = []
        self.lost: list[str] = []
        self.workers_seen: set[int] = set()
        self.owned, self._temp = False, None
        self.rounds, self.waited_s = 0, 0.0
        self.startup_s = 0.0                 # connecting and warming the workers (warm)
        self._started = time.perf_counter()
        try:
            self._connect(ray)
        except BaseException:
            self.close()
            raise
        where = f"the cluster at {option.address}" if option.address else (
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
            with quiet(stdout=True), ray_logs_quiet():
                ray.init(**settings)
        finally:
            if usage is None:
                os.environ.pop("RAY_USAGE_STATS_ENABLED", None)
            else:
                os.environ["RAY_USAGE_STATS_ENABLED"] = usage
        self.owned = True
        if self.option.address is not None:
            self.width = self.option.workers or max(int(ray.cluster_resources().get("CPU", 1)), 1)

    def remote(self, fn: Callable):
        """`fn` as a Ray task of one CPU that Ray itself never retries (retries are ours, counted)."""
        import ray
        return ray.remote(num_cpus=1, max_retries=0)(fn)

    def warm(self, task, *args) -> list:
        """Run `task` once per worker slot (each worker imports what it needs and loads the run's data) and
        return the results; the start-up seconds are counted from connecting."""
        import ray
        try:
            out = ray.get([task.remote(*args) for _ in range(self.width)], timeout=WARM_TIMEOUT_S)
        except BaseException:
            self.close()
            raise
        self.startup_s = time.perf_counter() - self._started
        return out

    def gather(self, submit: Callable[[Any], Any], items: list[tuple[str, Any]], lost_means: str) -> list:
        """Each (label, arg)'s value, in the given order: `submit(arg)` starts a task answering (value, seconds,
        pid). A task whose worker died is submitted again, `retries` times; one that died every time, or did not
        answer within the timeout, is recorded as lost (`lost_means`: what the run makes of it) and gets None.
        An exception raised by the task's own code is raised here, as it would have been in this process."""
        import ray
        calls = [submit(arg) for _, arg in items]
        started = begun = time.perf_counter()
        self.rounds += 1
        waves = math.ceil(len(items) / self.width)
        out = []
        for (label, arg), call in zip(items, calls):
            attempt = 1
            while True:
                left = max(started + waves * self.option.task_timeout_s - time.perf_counter(), 0.01)
                try:
                    value, seconds, pid = ray.get(call, timeout=left)
                    self.seconds.append(seconds)
                    self.workers_seen.add(pid)
                    break
                except ray.exceptions.GetTimeoutError:
                    ray.cancel(call, force=True)
                    why = f"no answer within {self.option.task_timeout_s:g} s"
                except ray.exceptions.RayTaskError as e:   # our code raised there: as it would have here
                    cause = getattr(e, "cause", None)
                    raise (cause if isinstance(cause, BaseException) else e) from None
                except ray.exceptions.RayError as e:       # the worker, its node or the object died
                    why = f"{type(e).__name__}: {first_line(e)}"
                    if attempt <= self.option.retries:
                        attempt += 1
                        self.retried.append(f"{label}: {why}; submitted again (attempt {attempt})")
                        call, started, waves = submit(arg), time.perf_counter(), 1
                        continue
                value = None
                self.lost.append(f"{label}: {why}; lost after {attempt} attempt{'s' * (attempt > 1)}, {lost_means}")
                break
            out.append(value)
        self.waited_s += time.perf_counter() - begun
        return out

    def report(self, what: str) -> list[str]:
        """Notes for the run's report: where `what` (e.g. "candidates evaluated") ran, how long each took, what was
        retried or lost."""
        lines = []
        if self.seconds:
            lines.append(f"{what} as Ray tasks on {self.where}: {len(self.seconds)} tasks on "
                         f"{len(self.workers_seen)} worker processes, {statistics.median(self.seconds):.3f} s each "
                         f"(median, in the worker; mean {statistics.mean(self.seconds):.3f}, max "
                         f"{max(self.seconds):.3f}); {self.rounds} batches waited for {self.waited_s:.1f} s; "
                         f"start-up {self.startup_s:.1f} s")
        return lines + [f"retried: {r}" for r in self.retried] + [f"lost: {r}" for r in self.lost]

    def close(self) -> None:
        if self.owned:
            import ray
            from ..quiet import quiet
            with quiet(stdout=True), ray_logs_quiet():
                ray.shutdown()
            self.owned = False
        if self._temp is not None:
            shutil.rmtree(self._temp, ignore_errors=True)
            self._temp = None


@contextlib.contextmanager
def ray_logs_quiet():
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
