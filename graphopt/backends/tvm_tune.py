"""Kernel tuning for the TVM backend: MetaSchedule, with a persistent database.

Tasks already in the database for this target are not tuned again, so a second compile of the
same model does zero trials. Tasks are tuned costliest first (FLOPs × calls) and the time budget
is checked between tasks (a task starts only if the average task so far still fits); a task that
gets no trials keeps TVM's default schedule. Builder workers skip importing TVM's tensor intrinsics
(tens of seconds per worker on this machine) because fp32 schedules do not tensorize."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..quiet import quiet


@dataclass(frozen=True)
class Tune:
    """Tuning options: `trials` per task, `time_budget` in seconds for the whole model, `db` a directory
    holding the tuning records (created if missing; reused across compiles and processes)."""
    trials: int = 64
    time_budget: float = 600.0
    db: str | Path = "graphopt-tuning"
    progress: bool = True


@dataclass
class TuneReport:
    tuned: list[str] = field(default_factory=list)        # tasks tuned by this compile
    reused: list[str] = field(default_factory=list)       # tasks whose records were already in the database
    untuned: list[str] = field(default_factory=list)      # left to default schedules (budget spent)
    trials: int = 0
    seconds: float = 0.0

    def lines(self) -> list[str]:
        return [f"tuning: {self.trials} trials in {self.seconds:.0f} s; {len(self.tuned)} tasks tuned now, "
                f"{len(self.reused)} from the database, {len(self.untuned)} on default schedules"] + \
               [f"tuned: {t}" for t in self.tuned] + [f"from database: {t}" for t in self.reused] + \
               [f"default schedule: {t}" for t in self.untuned]


def build_without_intrinsics(mod, target, _params):
    """MetaSchedule's default builder, minus `import tvm.s_tir.tensor_intrin` (unused by fp32 schedules)."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def tune_and_compile(mod, target, tune: Tune):
    """Tune what the database lacks, then compile with the best records applied: (executable, report)."""
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.analysis import estimate_tir_flops

    start, report = time.perf_counter(), TuneReport()
    work_dir = Path(tune.db)
    work_dir.mkdir(parents=True, exist_ok=True)
    with target:
        mod = tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(),
                                        relax.transform.CanonicalizeBindings(), relax.get_pipeline("zero")])(mod)
    tasks = ms.relax_integration.extract_tasks(mod, target)
    database = ms.database.JSONDatabase(work_dir=str(work_dir))

    def best_us(task) -> float | None:
        """The database's best latency for this task on this target (records are keyed by both)."""
        record = database.query_tuning_record(task.dispatched[0], target, task.task_name)
        secs = [s.value for s in record.run_secs] if record is not None and record.run_secs else []
        return sum(secs) / len(secs) * 1e6 if secs else None

    todo = [task for task in tasks if best_us(task) is None]
    report.reused = [task.task_name for task in tasks if task not in todo]
    # the budget goes to the costliest kernels first: FLOPs × how often the model calls them
    todo.sort(key=lambda t: -t.weight * estimate_tir_flops(t.dispatched[0]))
    deadline = start + tune.time_budget
    builder = ms.builder.LocalBuilder(max_workers=None, timeout_sec=120, f_build=build_without_intrinsics)
    durations: list[float] = []
    for i, task in enumerate(todo):
        # a task starts only when a task as long as the average so far still fits in the budget
        expected = sum(durations) / len(durations) if durations else 0.0
        if time.perf_counter() + expected >= deadline:
            report.untuned.extend(t.task_name for t in todo[i:])
            break
        task_start = time.perf_counter()
        strategy = ms.search_strategy.EvolutionarySearch(population_size=max(32, 4 * tune.trials),
                                                         init_min_unmeasured=min(50, 2 * tune.trials))
        with quiet(stdout=True):   # MetaSchedule logs every trial to the console; its logs stay in db/logs
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts([task], str(work_dir),
                                                                                     strategy=strategy)
            ms.tune.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(work_dir),
                               max_trials_global=tune.trials, max_trials_per_task=tune.trials,
                               num_trials_per_iter=min(64, tune.trials), builder=builder, database=database)
        report.trials += tune.trials
        durations.append(time.perf_counter() - task_start)
        best = best_us(task)
        if best is None:   # every candidate failed to build or run: the default schedule stays
            report.untuned.append(f"{task.task_name} (no valid schedule found)")
        else:
            report.tuned.append(task.task_name)
        if tune.progress:
            left = max(0.0, deadline - time.perf_counter())
            found = f"best {best:.1f} µs" if best is not None else "no valid schedule"
            print(f"[graphopt tune] {i + 1}/{len(todo)} tasks ({len(report.reused)} reused)  {task.task_name}: "
                  f"{found}  {left:.0f} s of budget left", file=sys.stderr, flush=True)
    with target:
        mod = relax.transform.MetaScheduleApplyDatabase(str(work_dir))(mod)
    executable = tvm.compile(mod, target=target)
    report.seconds = time.perf_counter() - start
    return executable, report
