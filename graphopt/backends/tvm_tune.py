"""Kernel tuning for the TVM backend: MetaSchedule, with a persistent database (CPU, or CUDA on the GPU).

Tasks already in the database for this target are not tuned again, so a second compile of the
same model does zero trials. Each target tunes into a folder of its own inside the database directory
(`target_folder`): MetaSchedule matches records by workload alone, so one database shared between a
2-core and a 16-core machine, or a CPU and a GPU, would apply one's schedules to the other. Tasks are tuned costliest first (FLOPs × calls); the time budget is
planned between tasks from the seconds per trial so far: when `trials` for every task left no longer
fits, each gets an even share (at least MIN_TRIALS), and a task that gets no trials keeps TVM's default
schedule. Neither builder workers nor this process import all of TVM's tensor intrinsics (60–100 s here, nearly all
of it CUDA's and ROCm's): a CPU tuning registers only its own ISA's (`cpu_intrinsics_only`)."""
from __future__ import annotations

import contextlib
import fcntl
import importlib
import importlib.util
import hashlib
import json
import math
import os
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..artifacts import write_bytes_atomically
from ..errors import InputError
from ..options import Option
from ..quiet import quiet


@dataclass(frozen=True)
class Tune(Option):
    """Tuning options: `trials` per task, `time_budget` in seconds for the whole model, `db` a directory
    holding the tuning records (created if missing; reused across compiles and processes; by default
    graphopt/tuning in the user's cache directory, $XDG_CACHE_HOME or ~/.cache, not the working directory).
    `rpc` (a graphopt.RPC): measure the candidates on boards behind TVM's RPC tracker instead of here (built here,
    cross-compiled for the target); the same as compile(rpc=...), which also times the cost model's decisions there.
    `workers` / `ray_address`: build the candidates as Ray tasks — a local Ray of `workers` processes, the cluster at
    `ray_address`, or a graphopt.Ray(...) for its timeouts and retries (distributed/ray_build.py); measurements
    stay here or on the boards of `rpc`. By default MetaSchedule's LocalBuilder builds them on this machine's cores.
    An option of the backend (no passes): TVM and backend "auto" take it (Backend.check)."""
    keyword = "tune"
    trials: int = 64
    time_budget: float = 600.0
    db: str | Path | None = None
    progress: bool = True
    rpc: Any = None
    workers: Any = None
    ray_address: str | None = None

    def __post_init__(self):
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 1:
            raise InputError(f"Tune(trials={self.trials!r}): give a positive int, the trials per task (e.g. 64)")
        budget = self.time_budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget < 0:
            raise InputError(f"Tune(time_budget={budget!r}): give the seconds the whole model may spend tuning, "
                             "a finite number ≥ 0 (0: tune nothing, reuse the database)")
        if self.db is not None and not isinstance(self.db, (str, Path)):
            raise InputError(f"Tune(db={self.db!r}): give a directory path")
        if self.db is not None and Path(self.db).exists() and not Path(self.db).is_dir():
            raise InputError(f"Tune(db={str(self.db)!r}): exists and is not a directory; give a folder for the "
                             "tuning records")
        object.__setattr__(self, "db", Path(self.db) if self.db is not None else default_db())
        if self.rpc is not None:
            from ..distributed.rpc import RPC
            if not isinstance(self.rpc, RPC):
                raise InputError(f"Tune(rpc={self.rpc!r}): give a graphopt.RPC(tracker=\"host:port\", key=...)")
        from ..distributed.ray_cluster import ray_option
        object.__setattr__(self, "builders", ray_option("Tune", self.workers, self.ray_address))


def default_db() -> Path:
    """Where tuning records go when the user names no directory: the XDG cache directory."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "graphopt" / "tuning"


def target_folder(db: Path, target) -> Path:
    """The database folder of one TVM target: its kind, CPU or GPU arch and cores in the name for people, a hash
    of its whole configuration for exactness. Copy it to another machine with the same target to reuse it there
    (MetaSchedule's QueryTuningRecord ignores its target argument, so the key cannot live in the records)."""
    config = target.export()
    model = config.get("mcpu") or config.get("arch") or config.get("mtriple") or "generic"
    cores = f"-{config['num-cores']}cores" if config.get("num-cores") else ""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return Path(db) / f"{config['kind']}-{model}{cores}-{digest}"


@dataclass
class TuneReport:
    tuned: list[str] = field(default_factory=list)        # tasks tuned by this compile
    reused: list[str] = field(default_factory=list)       # tasks whose records were already in the database
    untuned: list[str] = field(default_factory=list)      # left to default schedules (budget spent)
    repairs: list[str] = field(default_factory=list)      # what check_database fixed before opening
    trials: int = 0
    seconds: float = 0.0
    progress: list[list] = field(default_factory=list)   # per task tuned now, in order: name, trials, best µs, s
    measured: list[str] = field(default_factory=list)     # where candidates were measured (RPC: per server, lost)
    built: list[str] = field(default_factory=list)        # how candidates were built: batches, seconds, Ray's tally

    def table(self) -> dict:
        return {"title": "MetaSchedule tuning per task, in the order tuned (costliest first)",
                "columns": ["task", "trials", "best µs", "seconds"], "rows": self.progress,
                "bars": ["best µs", "seconds"], "unit": ""}

    def lines(self) -> list[str]:
        return [f"tuning: {self.trials} trials in {self.seconds:.0f} s; {len(self.tuned)} tasks tuned now, "
                f"{len(self.reused)} from the database, {len(self.untuned)} on default schedules"] + \
               [f"tuned: {t}" for t in self.tuned] + [f"from database: {t}" for t in self.reused] + \
               [f"default schedule: {t}" for t in self.untuned] + self.built + self.measured + self.repairs


DB_FILES = ("database_workload.json", "database_tuning_record.json")   # MetaSchedule's JSONDatabase, one JSON per line


def check_database(work_dir: Path) -> list[str]:
    """Make a tuning database safe to open, or say why it is not. MetaSchedule appends one JSON line per
    workload and record, and a process killed mid-append leaves the last line cut short, which made
    JSONDatabase fail to load with a parser error. Such a last line is dropped (the file rewritten
    atomically; what was lost is one record, tuned again); damage anywhere else, or a record pointing at a
    workload the file lacks, is an InputError naming the file and line. Returns one note per repair."""
    notes, workloads = [], None
    for name in DB_FILES:
        path = work_dir / name
        if not path.exists():
            continue
        lines = path.read_bytes().split(b"\n")
        kept = [ln for ln in lines if ln.strip()]
        bad = [i for i, ln in enumerate(kept) if not _json_line(ln)]
        if bad and bad != [len(kept) - 1]:
            raise InputError(f"tuning database {path}: line {bad[0] + 1} is damaged (not one JSON value); delete "
                             f"the directory {work_dir} to tune again from scratch, or restore it from a copy")
        if bad:
            kept.pop()
            write_bytes_atomically(path, "tuning database", b"".join(ln + b"\n" for ln in kept))
            notes.append(f"tuning database: dropped {name}'s last line, cut short by an interrupted run")
        if name == DB_FILES[0]:
            workloads = len(kept)
        elif workloads is not None:
            beyond = [i for i, ln in enumerate(kept) if json.loads(ln)[0] >= workloads]
            if beyond:
                raise InputError(f"tuning database {path}: line {beyond[0] + 1} names workload "
                                 f"{json.loads(kept[beyond[0]])[0]} but {DB_FILES[0]} has {workloads}; delete the "
                                 f"directory {work_dir} to tune again from scratch")
    return notes


def _json_line(line: bytes) -> bool:
    try:
        json.loads(line)
        return True
    except ValueError:
        return False


def build_without_intrinsics(mod, target, _params):
    """MetaSchedule's default builder, minus `import tvm.s_tir.tensor_intrin` (unused by fp32 schedules)."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


INTRINSICS = "tvm.s_tir.tensor_intrin"
CPU_INTRINSICS = {"aarch64": "arm_cpu", "riscv": "riscv_cpu"}   # by the target triple's arch; x86 otherwise


@contextlib.contextmanager
def cpu_intrinsics_only(target):
    """While tuning for a CPU: TVM's tensor intrinsics package with only that ISA's intrinsics registered.
    MetaSchedule's TuneContext imports the whole package, whose CUDA, ROCm and Hexagon intrinsics are parsed
    from TVMScript at import: 60–100 s on this machine, for intrinsics a CPU schedule never uses. A package
    object of the same name and path stands in while tuning (its submodules import as usual) and is taken out
    of sys.modules after, so a later import anywhere gets TVM's whole package (the CPU submodules stay loaded)."""
    if INTRINSICS in sys.modules or target.kind.name != "llvm":
        yield
        return
    triple = str(target.attrs.get("mtriple", "")) or os.uname().machine
    isa = next((module for arch, module in CPU_INTRINSICS.items() if triple.startswith(arch)), "x86")
    lean = types.ModuleType(INTRINSICS, "TVM's tensor intrinsics for one CPU ISA only (graphopt, while tuning)")
    lean.__path__ = list(importlib.util.find_spec(INTRINSICS).submodule_search_locations)
    sys.modules[INTRINSICS] = lean
    try:
        importlib.import_module(f"{INTRINSICS}.{isa}")
        yield
    finally:
        if sys.modules.get(INTRINSICS) is lean:
            del sys.modules[INTRINSICS]


MIN_TRIALS = 8   # one search round; fewer finds little, and TVM's default CPU schedules are single-threaded


def trials_for(wanted: int, seconds_left: float, tasks_left: int, seconds_per_trial: float | None) -> int:
    """Trials for the next task (costliest first): `wanted` while the rest of the budget covers that for every
    task left, else an even share of what it covers, but at least MIN_TRIALS; 0 once even that does not fit.
    An untuned task is far worse than a briefly tuned one, so depth gives way to breadth."""
    if seconds_per_trial is None:   # nothing measured yet
        return wanted if seconds_left > 0 else 0
    share = int(seconds_left / tasks_left / seconds_per_trial)
    trials = min(wanted, max(MIN_TRIALS, share))
    return trials if trials * seconds_per_trial <= seconds_left else 0


def tune_and_compile(mod, target, tune: Tune, pipeline=None, rpc=None, cross_cc: str | None = None):
    """Tune what the database lacks, then compile with the best records applied by `pipeline` (TVM's default;
    for CUDA, one where DLight schedules the kernels without a record): (executable, report). One
    process at a time per database: a second one waits for the first, then reuses what it tuned (two
    processes appending at once could interleave their lines and cut each other's records). With `rpc` (a
    graphopt.RPC) the candidates are built here (linked by `cross_cc` for another ISA) and measured on its boards."""
    work_dir = target_folder(tune.db, target)
    work_dir.mkdir(parents=True, exist_ok=True)
    with open(work_dir / ".lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if tune.progress:
                print(f"[graphopt tune] another process is tuning into {work_dir}; waiting for it to finish",
                      file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        return _tune_and_compile(mod, target, tune, work_dir, pipeline, rpc, cross_cc)


def _tune_and_compile(mod, target, tune: Tune, work_dir: Path, pipeline, rpc=None, cross_cc=None):
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.analysis import estimate_tir_flops

    start, report = time.perf_counter(), TuneReport()
    report.repairs = check_database(work_dir)
    with target:
        mod = tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(),
                                        relax.transform.CanonicalizeBindings(), relax.get_pipeline("zero")])(mod)
    # kernels graphopt wrote itself (tirx.is_scheduled) have no schedule space: MetaSchedule would only fail on them
    tasks = [task for task in ms.relax_integration.extract_tasks(mod, target)
             if not task.dispatched[0]["main"].attrs.get("tirx.is_scheduled", False)]
    database = ms.database.JSONDatabase(work_dir=str(work_dir))

    def best_us(task) -> float | None:
        """The database's best latency for this task (the folder holds this target's records only)."""
        record = database.query_tuning_record(task.dispatched[0], target, task.task_name)
        secs = [s.value for s in record.run_secs] if record is not None and record.run_secs else []
        return sum(secs) / len(secs) * 1e6 if secs else None

    todo = [task for task in tasks if best_us(task) is None]
    report.reused = [task.task_name for task in tasks if task not in todo]
    # the budget goes to the costliest kernels first: FLOPs × how often the model calls them
    todo.sort(key=lambda t: -t.weight * estimate_tir_flops(t.dispatched[0]))
    deadline = start + tune.time_budget
    builds: list[tuple[int, float]] = []     # per batch MetaSchedule built: (candidates, seconds)
    on_ray = tune.builders is not None and bool(todo)
    if on_ray:   # candidates built as Ray tasks (distributed/ray_build.py)
        from ..distributed.ray_build import ray_builder
        builder = ray_builder(tune.builders, shared=rpc is not None, cc=cross_cc)
    else:
        export = {}
        if rpc is not None:   # a board's server loads a library linked here
            from functools import partial
            from ..distributed.rpc import export_shared
            export = {"f_export": partial(export_shared, cc=cross_cc)}
        builder = ms.builder.LocalBuilder(max_workers=None, timeout_sec=120, f_build=build_without_intrinsics,
                                          **export)
    runner = tally = None
    try:
        if rpc is not None and todo:   # built here for the target, measured on its boards (distributed/rpc.py)
            from ..distributed.rpc import Tally, board_runner
            tally = Tally()
            runner = board_runner(rpc, len(rpc.probe()), tally)
        _tune_tasks(todo, target, tune, deadline, _timed(builder, builds), runner, database, work_dir, report, best_us)
    finally:
        if runner is not None:
            runner.shutdown()
            report.measured = tally.lines(rpc)
        if builds:
            how = "as Ray tasks" if on_ray else \
                "by MetaSchedule's LocalBuilder (a fresh pool of worker processes per batch, each importing TVM)"
            report.built = [f"built {sum(n for n, _ in builds)} candidates {how} in {len(builds)} batches: "
                            f"{sum(s for _, s in builds):.1f} s"]
        if on_ray:
            builder.close()
            report.built += builder.report()
    with target:
        mod = relax.transform.MetaScheduleApplyDatabase(str(work_dir))(mod)
    executable = tvm.compile(mod, target=target, relax_pipeline=pipeline or "default")
    report.seconds = time.perf_counter() - start
    return executable, report


def _timed(builder, builds: list):
    """`builder` with each batch's size and seconds appended to `builds`: the tuning report's build time."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import PyBuilder

    @derived_object
    class TimedBuilder(PyBuilder):
        def build(self, build_inputs):
            t0 = time.perf_counter()
            results = builder.build(build_inputs)
            builds.append((len(build_inputs), time.perf_counter() - t0))
            return results
    return TimedBuilder()


def _tune_tasks(todo, target, tune: Tune, deadline: float, builder, runner, database, work_dir: Path,
                report: TuneReport, best_us) -> None:
    """Tune `todo` costliest first within the deadline, each task's trials planned from the seconds per trial so far
    (the first task's before anything is imported: a small budget still tunes it, as before)."""
    from tvm.s_tir import meta_schedule as ms
    spent, done = 0.0, 0          # seconds and trials of the tasks tuned so far: the rate for what is left
    for i, task in enumerate(todo):
        trials = trials_for(tune.trials, deadline - time.perf_counter(), len(todo) - i, spent / done if done else None)
        if trials == 0:
            report.untuned.extend(t.task_name for t in todo[i:])
            break
        task_start = time.perf_counter()
        strategy = ms.search_strategy.EvolutionarySearch(population_size=max(32, 4 * trials),
                                                         init_min_unmeasured=min(50, 2 * trials))
        # MetaSchedule logs every trial to the console (its logs stay in db/logs); the intrinsics import once
        with quiet(stdout=True), cpu_intrinsics_only(target):
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts([task], str(work_dir),
                                                                                     strategy=strategy)
            ms.tune.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(work_dir),
                               max_trials_global=trials, max_trials_per_task=trials,
                               num_trials_per_iter=min(64, trials), builder=builder, database=database,
                               **({"runner": runner} if runner is not None else {}))
        report.trials += trials
        spent, done = spent + time.perf_counter() - task_start, done + trials
        best = best_us(task)
        if best is None:   # every candidate failed to build or run: the default schedule stays
            report.untuned.append(f"{task.task_name} (no valid schedule found)")
        else:
            report.tuned.append(task.task_name)
        report.progress.append([task.task_name, trials, best, round(time.perf_counter() - task_start, 1)])
        if tune.progress:
            left = max(0.0, deadline - time.perf_counter())
            found = f"best {best:.1f} µs" if best is not None else "no valid schedule"
            print(f"[graphopt tune] {i + 1}/{len(todo)} tasks ({len(report.reused)} reused)  {task.task_name}: "
                  f"{found} in {trials} trials  {left:.0f} s of budget left", file=sys.stderr, flush=True)
