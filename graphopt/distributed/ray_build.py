"""MetaSchedule's candidate builds as Ray tasks: graphopt.Tune(workers=N) or Tune(ray_address="host:port").

Each round of a tuning, MetaSchedule asks its builder to compile a batch of candidate schedules (up to 64), then its
runner measures them. The builds are pure compilation (TIR lowering, LLVM, linking), so a Ray cluster can do them;
the measurements stay where the model will run: this machine's runner, or the boards of Tune(rpc=) / compile(rpc=).

What travels: to a worker, each candidate's TIR module and its target as TVM's own JSON (tvm.ir.save_json) and the
name of the cross compiler to link with (an arm64 board's); back, the built library's bytes (a .tar of object files
for this machine's runner, as MetaSchedule's LocalBuilder exports, or a linked .so for a board) or why the build
failed. The libraries are written into one temporary folder of this run (MetaSchedule removes each once measured),
removed when the tuning ends. Never the
user's model object; workers import the same TVM (a version mismatch is an error at start).

Faults: a build whose worker dies is submitted again (`Ray.retries` times), then recorded as a failed build (its
candidate not kept, as MetaSchedule does with a build error); the tuning report counts what was retried or lost.
Every wait has a timeout (`Ray.task_timeout_s` per build)."""
from __future__ import annotations

import os
import shutil
import tempfile
import time

from . import first_line
from ..errors import UnsupportedError
from .ray_cluster import Ray, RayTasks


def _warm() -> tuple[str, int]:
    """Import TVM's compiler in this worker once; say which TVM it runs."""
    import tvm
    from tvm.s_tir import meta_schedule  # noqa: F401  (the builder's imports, paid once per worker)
    return tvm.__version__, os.getpid()


def _build(mod_json: str, target_json: str, shared: bool, cc: str | None):
    """One candidate, as MetaSchedule's LocalBuilder builds it: ((file name, library bytes) or why it failed, the
    seconds it took, this worker's pid)."""
    t0 = time.perf_counter()
    import tvm
    from tvm.s_tir.meta_schedule.builder.local_builder import default_export
    from ..backends.tvm_tune import build_without_intrinsics
    from .rpc import export_shared
    try:
        built = build_without_intrinsics(tvm.ir.load_json(mod_json), tvm.ir.load_json(target_json), None)
        path = export_shared(built, cc) if shared else default_export(built)
        with open(path, "rb") as f:
            value = (os.path.basename(path), f.read())
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)
    except Exception as e:   # a candidate that does not build is a failed candidate, as in LocalBuilder
        value = f"{type(e).__name__}: {first_line(e)}"
    return value, time.perf_counter() - t0, os.getpid()


def ray_builder(option: Ray, shared: bool = False, cc: str | None = None):
    """A MetaSchedule builder whose builds are Ray tasks on `option`'s cluster. `shared`: link each candidate into
    a .so (by `cc`, the target's cross compiler, where given) for a board's server, else export the .tar this
    machine's runner links. Call `close()` when the tuning ends: it stops a Ray it started and removes the libraries."""
    import tvm
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder

    @derived_object
    class RayBuilder(PyBuilder):
        def __init__(self):
            super().__init__()
            self.tasks = RayTasks(option)
            theirs = {v for v, _ in self.tasks.warm(self.tasks.remote(_warm))} - {tvm.__version__}
            if theirs:
                self.tasks.close()
                raise UnsupportedError(f"the Ray workers run TVM {', '.join(sorted(theirs))}, this process "
                                       f"{tvm.__version__}: install the same graphopt and TVM on every node")
            self.task = self.tasks.remote(_build)
            self.folder = tempfile.mkdtemp(prefix="graphopt-ray-build-")
            self.count = 0

        def build(self, build_inputs):
            if any(b.params for b in build_inputs):
                raise UnsupportedError("MetaSchedule gave the Ray builder a candidate with bound parameters; "
                                       "graphopt tunes TIR kernels without them")
            items = [(f"candidate {self.count + i}", (tvm.ir.save_json(b.mod), tvm.ir.save_json(b.target)))
                     for i, b in enumerate(build_inputs)]
            values = self.tasks.gather(lambda a: self.task.remote(*a, shared, cc), items,
                                       "recorded as a failed build")
            results = []
            for (label, _), value in zip(items, values):
                if value is None:
                    results.append(BuilderResult(None, f"graphopt Ray builder: {label} lost (see the report)"))
                elif isinstance(value, str):
                    results.append(BuilderResult(None, f"graphopt Ray builder: {value}"))
                else:
                    name, data = value    # a folder each: MetaSchedule removes it once measured
                    path = os.path.join(self.folder, str(self.count), name)
                    os.mkdir(os.path.dirname(path))
                    with open(path, "wb") as f:
                        f.write(data)
                    results.append(BuilderResult(path, None))
                self.count += 1
            return results

        def report(self) -> list[str]:
            return self.tasks.report("candidates built")

        def close(self) -> None:
            self.tasks.close()
            shutil.rmtree(self.folder, ignore_errors=True)

    return RayBuilder()
