"""TVM backend: the optimized IR lowered to Relax, built for the target, run by the Relax VM.

Untuned CPU builds use TVM's default schedules, which are slow on CPU; `tune=graphopt.Tune(...)`
searches schedules with MetaSchedule (backends/tvm_tune.py). CUDA builds use DLight's default
schedules, falling back rule by rule where one fails (tvm_cuda.py). Cross builds (cuda without a GPU, arm64) compile and export
(`CompiledModule.export_library`) but cannot run on this machine; given an RPC device (`Target.rpc`), an arm64 build's
calls run on a board of its key, and the cost model times TVM builds there (distributed/rpc.py)."""
from __future__ import annotations

import os
import shutil
from functools import partial
from pathlib import Path

import torch

from ..codegen.relax import size_limits, to_relax
from ..errors import InputError, UnsupportedError
from ..ir import Graph
from ..quiet import native_quiet
from ..cost import CostModel
from ..targets import Target, host_cores
from .base import BuildInputs
from .tvm_cuda import ScheduleLog, cuda_pipeline
from .tvm_fast_math import fast_math
from .tvm_tune import tune_and_compile

def use_all_cores() -> None:
    """TVM's thread pool assumes two hyper-threads per x86 core and takes half the logical CPUs: one thread on
    a 2-vCPU machine, which halved every TVM timing here (ResNet-50 tuned: 133 ms on 1 thread, 71 ms on 2).
    TVM_NUM_THREADS overrides that; it is read when the pool starts, in this process and in MetaSchedule's
    runner workers, so it is set before anything runs. A value the user set is kept."""
    os.environ.setdefault("TVM_NUM_THREADS", str(host_cores()))


def tvm_target(target: Target):
    """graphopt Target → tvm.target.Target (Target.tvm), with TVM's thread pool on every core for host builds."""
    if target.host:
        use_all_cores()
    return target.tvm()


class TvmExecutable:
    def __init__(self, executable, target: Target, tune_report=None, kernels: tuple[str, ...] = (),
                 schedules: list[str] = (), limits: list[tuple[int, int, int]] = (), precision: str = "fp32"):
        self.executable, self.target, self.tune_report, self.precision = executable, target, tune_report, precision
        self.limits = list(limits)        # (input, dim, highest size): TVM planned its memory for those
        self.kernels = kernels            # TIR kernels graphopt wrote for its ops (not scheduled by TVM)
        self.schedules = list(schedules)  # CUDA: which DLight rule scheduled the kernels, and the fallbacks
        self.vm, self.board = None, None
        if not target.runs_here and target.rpc is not None:   # calls go to a board of the key
            self.board = self.on_board()
        if target.runs_here:
            import tvm
            from tvm import relax
            self.device = tvm.cuda() if target.gpu else tvm.cpu()
            self.vm = relax.VirtualMachine(executable, self.device)

    @property
    def runs_here(self) -> bool:
        """Calls run: on this machine, or on a board of the target's RPC key."""
        return self.vm is not None or self.board is not None

    def on_board(self):
        """This executable as a function on a board of the target's RPC key (distributed.rpc.BoardFunction)."""
        from ..distributed.rpc import BoardFunction
        return BoardFunction(self.export_library, self.target.rpc)

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.vm is None and self.board is not None:
            return self.board(inputs)
        if self.vm is None:
            raise UnsupportedError(f"this module was built for {self.target}, which this machine cannot run; "
                                   "use export_library(path) and load it there")
        for i, d, highest in self.limits:
            if inputs[i].shape[d] > highest:
                raise InputError(f"input {i} has size {inputs[i].shape[d]} in dim {d}; this model was compiled for at "
                                 f"most {highest} there (torch.export's bound: the model's own tensors end there)")
        import tvm
        # DLPack both ways: no copies, and dtypes numpy lacks (bfloat16) pass through
        out = self.vm["main"](*[tvm.runtime.from_dlpack(t.detach().to(self.target.device).contiguous()) for t in inputs])
        outs = [out] if isinstance(out, tvm.runtime.Tensor) else list(out)
        return [torch.from_dlpack(o) for o in outs]

    def artifact(self):
        return self.executable

    def tables(self) -> list[dict]:
        return [self.tune_report.table()] if self.tune_report is not None and self.tune_report.progress else []

    def describe(self) -> list[str]:
        untuned = " (untuned: default schedules)" if self.tune_report is None else ""
        board = f"; calls run on a board of {self.target.rpc}" if self.board is not None else ""
        head = f"TVM Relax VM executable for {self.target}{untuned}{board}"
        half = ["precision fp16: convs and matmuls in half precision, accumulating in fp32"] \
            if self.precision == "fp16" else []
        own = [f"graphopt's own kernels: {', '.join(self.kernels)}"] if self.kernels else []
        tuned = self.tune_report.lines() if self.tune_report is not None else []
        return [head] + half + own + tuned + self.schedules

    def export_library(self, path: str | Path) -> Path:
        cc = self.target.cross_cc
        if cc is not None and shutil.which(cc) is None:
            raise UnsupportedError(f"exporting for {self.target} needs the cross compiler {cc} "
                                   "(Debian: apt-get install gcc-aarch64-linux-gnu)")
        kwargs = {}
        if cc is not None:
            from tvm.support import cc as tvm_cc
            kwargs["fcompile"] = tvm_cc.cross_compiler(cc)
        self.executable.export_library(str(path), **kwargs)
        return Path(path)


class TvmBackend:
    name = "tvm"

    def check(self, target: Target, tune=None) -> None:
        try:
            import tvm  # noqa: F401
        except ImportError as e:
            raise UnsupportedError("backend 'tvm' needs Apache TVM: pip install -e '.[tvm]'") from e
        if tune is not None:
            from .tvm_tune import Tune
            if not isinstance(tune, Tune):
                raise InputError(f"tune= takes a graphopt.Tune and needs backend='tvm' or 'auto', got "
                                 f"{type(tune).__name__}")
            refusal = target.tune_refusal(tune.time_budget)
            if refusal is not None:
                raise refusal
            if tune.builders is not None and target.gpu:
                raise UnsupportedError(f"Tune(workers={tune.builders!r}) builds CPU targets' candidates on Ray; "
                                       "CUDA candidates are built on this machine: leave workers= and ray_address= out")
            if tune.builders is not None:      # Ray installed, the cluster's address answers: before capture
                tune.builders.check()

    def cost_model(self, target: Target) -> CostModel:
        """Decisions timed on TVM builds of this target (untuned: the tuner runs after the passes); with an RPC
        device, on a board of its key (each build exported and timed there)."""
        def lower(graph, args, kwargs):
            built = self.build(graph, target, BuildInputs(args, kwargs))
            return built.on_board() if target.rpc is not None else built.run
        return CostModel(target, "tvm", lower)

    def build(self, graph: Graph, target: Target, inputs: BuildInputs) -> TvmExecutable:
        if inputs.tune is not None and inputs.tune.progress:   # its progress lines go to the same stderr
            return self._build(graph, target, inputs)
        with native_quiet():
            return self._build(graph, target, inputs)

    def _build(self, graph: Graph, target: Target, inputs: BuildInputs) -> TvmExecutable:
        import tvm
        mod = to_relax(graph, inputs.args, inputs.kwargs, inputs.dynamic_shapes, target)
        if inputs.precision == "fp16":   # before fast_math, whose TE-built kernels the rewrite does not take
            from tvm import relax
            mod = relax.transform.ToMixedPrecision(out_dtype="float32")(mod)
        if not target.gpu:   # LLVM CPU targets scalarize exp/tanh/erf; CUDA has fast intrinsics of its own
            mod = fast_math(mod)
        kernels = tuple(sorted(gv.name_hint for gv, f in mod.functions.items() if f.attrs and
                               f.attrs.get("tirx.is_scheduled", False)))
        made = partial(TvmExecutable, target=target, kernels=kernels, limits=size_limits(mod), precision=inputs.precision)
        if target.gpu:
            return self._build_cuda(mod, target, inputs, made)
        if inputs.tune is None:
            return made(tvm.compile(mod, target=tvm_target(target)))
        rpc, tuned_for = target.rpc or inputs.tune.rpc, tvm_target(target)
        if rpc is not None:   # MetaSchedule needs the cores of the board it measures on
            from ..distributed.rpc import with_board_cores
            tuned_for = with_board_cores(tuned_for, rpc)
        executable, report = tune_and_compile(mod, tuned_for, inputs.tune, rpc=rpc, cross_cc=target.cross_cc)
        return made(executable, tune_report=report)

    @staticmethod
    def _build_cuda(mod, target: Target, inputs: BuildInputs, made) -> TvmExecutable:
        """DLight schedules the kernels a tuning database has no record for (all of them untuned); batch-1
        inference is launch-bound, so with static shapes the VM's kernel launches are replayed as CUDA graphs."""
        import tvm
        log, graphs, report, gpu = ScheduleLog(), inputs.dynamic_shapes is None, None, tvm_target(target)
        with tvm.transform.PassContext(opt_level=3, config={"relax.backend.use_cuda_graph": graphs}):
            if inputs.tune is None:
                built = tvm.compile(mod, target=gpu, relax_pipeline=cuda_pipeline(gpu, log))
            else:
                built, report = tune_and_compile(mod, gpu, inputs.tune, cuda_pipeline(gpu, log))
        launches = ["CUDA graphs: the kernel launches are captured once and replayed" if graphs else
                    "CUDA graphs: not used (dynamic shapes)"]
        return made(built, tune_report=report, schedules=launches + log.lines())
