"""Targets: where the compiled model runs, resolved once.

A Target carries everything the rest of graphopt asks about it — the ONNX Runtime providers, the
TVM target, the ISA, whether it runs (and can be timed) on this machine, the backend `compile`
picks by default — so backends, passes and the cost model read its fields instead of branching on
its name. This is the only module that branches on target names.

A Target may carry an RPC device (`rpc`, a graphopt.RPC: boards of that kind behind TVM's RPC tracker), given once
to compile() (`rpc=`, or with `Tune(rpc=...)`): then TVM's measurements for it — MetaSchedule's and the cost
model's — are made on those boards, so a target this machine cannot run (arm64) can be tuned and measured
(distributed/rpc.py)."""
from __future__ import annotations

import platform
from dataclasses import dataclass, field, replace
from functools import cache
from typing import Any

from .errors import GraphoptError, InputError, UnsupportedError


@dataclass(frozen=True)
class Target:
    name: str                 # "cpu" | "cuda" | "arm64"
    device: str               # torch device the compiled model takes its inputs on
    arch: str                 # "x86_64" | "aarch64"
    features: frozenset[str] = field(default_factory=frozenset)  # ISA extensions (avx512f, amx_tile, ...)
    providers: tuple[str, ...] = ()      # ONNX Runtime execution providers; () where ORT cannot run it here
    gpu: bool = False                    # kernels run on a GPU (TVM: CUDA codegen, DLight schedules)
    cross_cc: str | None = None          # C compiler for TVM libraries of another ISA (None: the host's)
    default_backend: str = "auto"        # what compile() builds when no backend= is given
    ships_both: bool = False             # backend auto builds ONNX and TVM's library: nothing here times it
    rpc: Any = None                      # distributed.rpc.RPC: TVM builds for it are measured on those boards

    def __str__(self) -> str:
        return self.name

    @property
    def host(self) -> bool:
        """Code for it runs on this machine's CPU (graphopt's own TIR kernels, ORT's fusion probes apply)."""
        return not self.gpu and self.arch == host_arch() and not self.cross_cc

    @property
    def unmeasurable(self) -> str | None:
        """Why nothing built for this target can run (or be timed) on this machine; None where it can."""
        if self.cross_cc is not None:
            return f"target {self.name} does not run on this machine"
        if self.gpu:
            import torch
            if not torch.cuda.is_available():
                return "torch sees no CUDA GPU on this machine"
        return None

    @property
    def runs_here(self) -> bool:
        return self.unmeasurable is None

    def ort_unavailable(self) -> str | None:
        """Why ONNX Runtime cannot run this target's providers here (None: it can)."""
        import onnxruntime as ort
        if not self.providers:
            return self.unmeasurable or f"ONNX Runtime has no execution provider for target {self.name}"
        missing = [p for p in self.providers if p not in ort.get_available_providers()]
        if missing:
            gpu = " (pip install -e '.[gpu]': onnxruntime-gpu)" if "CUDAExecutionProvider" in missing else ""
            return f"ONNX Runtime here lacks {', '.join(missing)}{gpu}"
        return self.unmeasurable   # with a CUDA provider but no GPU, ORT would run on its CPU provider

    def tvm(self):
        """This target as a tvm.target.Target (the host CPU's model detected; the GPU's arch read from torch)."""
        import tvm
        from tvm.target import codegen
        if self.gpu:
            import torch
            arch = None
            if torch.cuda.is_available():
                major, minor = torch.cuda.get_device_capability()
                arch = f"sm_{major}{minor}"
            # the limits every GPU since sm_50 has; MetaSchedule's CUDA rules need them stated
            return tvm.target.Target({"kind": "cuda", "arch": arch or "sm_80", "max_threads_per_block": 1024,
                                      "max_shared_memory_per_block": 49152, "thread_warp_size": 32,
                                      "registers_per_block": 65536}, host={"kind": "llvm"})
        if self.cross_cc is not None:
            return tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
        mcpu = "sapphirerapids" if "amx_tile" in self.features else codegen.llvm_get_system_cpu()
        return tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": host_cores()})

    def tune_refusal(self, time_budget: float) -> GraphoptError | None:
        """The error to raise where MetaSchedule cannot tune for this target from here (None: it can): it
        measures where the code runs, here or on the RPC device's boards."""
        if self.cross_cc is not None and self.rpc is None:
            return InputError(f"tune= on target {self.name}: MetaSchedule tunes where the code runs, and this machine "
                              f"cannot run {self.name} code; give no tune=, or give boards of that kind to measure "
                              f"on: rpc=graphopt.RPC(tracker=\"host:9190\", key=...)")
        if self.gpu and time_budget > 0 and self.unmeasurable:
            return UnsupportedError("tune= on target cuda measures kernels on the GPU, and this machine has none: tune "
                                    "on a GPU machine, copy the database folder here and pass graphopt.Tune(db=that "
                                    "folder, time_budget=0) to reuse its records")
        return None


@cache
def host_cpu_features() -> frozenset[str]:
    """ISA flags of this machine, read once from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def host_arch() -> str:
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())


@cache
def host_cores() -> int:
    """Physical cores this process may run on: its affinity mask (so `taskset` and containers are respected),
    with hyper-thread siblings counted once, as Linux's topology files list them. Read once per process."""
    import os
    from pathlib import Path
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    try:
        return len({Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read_text() for c in cpus})
    except OSError:
        return len(cpus)


@cache
def _known() -> dict[str, Target]:
    return {
        "cpu": Target("cpu", "cpu", host_arch(), host_cpu_features(), providers=("CPUExecutionProvider",)),
        # no measured choice on a GPU yet (ORT's CUDA provider vs TVM): ONNX Runtime unless backend= says
        "cuda": Target("cuda", "cuda", host_arch(), providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
                       gpu=True, default_backend="ort"),
        "arm64": Target("arm64", "cpu", "aarch64", cross_cc="aarch64-linux-gnu-gcc", ships_both=True),
    }


TARGET_NAMES = ("cpu", "cuda", "arm64")


def get_target(target: str | Target, rpc=None) -> Target:
    """Resolve a target name; an unknown one is an InputError listing the known ones. `rpc` (a graphopt.RPC) puts
    the boards that measure for it on the target; a GPU target takes none (RPC measures CPU boards)."""
    if not isinstance(target, Target):
        if not isinstance(target, str) or target not in TARGET_NAMES:
            raise InputError(f"unknown target {target!r}; choose one of: {', '.join(TARGET_NAMES)}")
        target = _known()[target]
    if rpc is None or rpc == target.rpc:
        return target
    from .distributed.rpc import RPC
    if not isinstance(rpc, RPC):
        raise InputError(f"rpc= takes a graphopt.RPC(tracker=\"host:port\", key=...), got {type(rpc).__name__}")
    if target.gpu:
        raise UnsupportedError(f"rpc= on target {target}: measuring on boards through TVM's RPC tracker is implemented "
                               "for CPU targets (cpu, arm64)")
    return replace(target, rpc=rpc)
