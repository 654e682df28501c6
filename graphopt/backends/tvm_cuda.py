"""TVM's CUDA pipeline with DLight schedules that fall back instead of failing the build.

TVM's default CUDA pipeline schedules every kernel with the first DLight rule that applies (Matmul, GEMV,
Reduction, GeneralReduction, Fallback) and lets a rule's failure end the build: on MobileNetV2's kernels that
fuse a conv with its bias, clip and the next layer's pad, Matmul asserts ("some consumers of the cache-write
stage are not properly inlined": it cannot inline the pad); GeneralReduction schedules them. Here each kernel tries the rules in order, a rule that raises is skipped for the next, and which
rule scheduled each kernel after which failed is kept for the report."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ScheduleLog:
    fallbacks: list[str] = field(default_factory=list)    # "kernel: Rule failed (reason), scheduled by Rule"
    by_rule: dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        counts = ", ".join(f"{rule} {n}" for rule, n in sorted(self.by_rule.items(), key=lambda kv: -kv[1]))
        return [f"DLight schedules: {counts}"] + [f"DLight fallback: {f}" for f in self.fallbacks]


def cuda_pipeline(target, log: ScheduleLog):
    """The CUDA relax pipeline of TVM 0.27 (relax/backend/cuda/pipeline.py) with `scheduled` in place of its
    legalization and dl.ApplyDefaultSchedule."""
    import tvm
    from tvm.relax.backend.cuda import pipeline as cuda

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod, _ctx):
        mod = scheduled(mod, target, log)
        with target:
            return tvm.transform.Sequential(cuda.dataflow_lower_passes(target) + cuda.finalize_passes(target))(mod)
    return _pipeline


def scheduled(mod, target, log: ScheduleLog):
    """`mod` legalized as TVM's CUDA pipeline does, each kernel then scheduled by the first DLight rule that
    applies without failing."""
    import tvm
    from tvm.relax.backend.cuda import pipeline as cuda
    passes = cuda.legalize_passes(target)
    legalize = [p for p in passes if "ApplyDefaultSchedule" not in type(p).__name__]
    if len(legalize) != len(passes) - 1:
        raise RuntimeError("TVM's CUDA pipeline changed: no single ApplyDefaultSchedule to replace")
    with target:
        return _schedule(tvm.transform.Sequential(cuda.library_dispatch_passes(target) + legalize)(mod), target, log)


def _schedule(mod, target, log: ScheduleLog):
    from tvm import tirx
    from tvm.s_tir import dlight as dl
    rules = [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
    updated = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or (func.attrs and func.attrs.get("tirx.is_scheduled", False)):
            continue
        failed = []
        for rule in rules:
            try:
                space = rule.apply(func, target, False)
            except Exception as e:          # a rule's own assertion: try the next rule
                failed.append(f"{type(rule).__name__} failed ({type(e).__name__}: {str(e).strip().splitlines()[0]})")
                continue
            if space is None:
                continue
            sch = space[0] if isinstance(space, list) else space
            updated[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
            name = type(rule).__name__
            log.by_rule[name] = log.by_rule.get(name, 0) + 1
            if failed:
                log.fallbacks.append(f"{gv.name_hint}: {'; '.join(failed)}; scheduled by {name}")
            break
        else:
            raise RuntimeError(f"no DLight rule schedules {gv.name_hint}: {'; '.join(failed)}")
    for gv, func in updated.items():
        mod[gv] = func
    return mod
