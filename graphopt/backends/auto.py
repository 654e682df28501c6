"""backend="auto": ONNX Runtime or tuned TVM, whichever measures faster on the example inputs; on arm64, where
nothing can be timed from here, both (the ONNX model and TVM's cross-compiled library, shipped side by side).

TVM is only a candidate when tuning is asked for (`tune=`; its records are reused from the
database): with default schedules TVM on CPU is tens of times slower than ORT (ResNet-50: 6.6 s
vs 42 ms measured here), so building it untuned would only cost time. The decision and both
timings go into the report's backend row."""
from __future__ import annotations

from ..errors import InputError
from ..ir import Graph
from ..targets import Target
from .base import BuildInputs, Executable
from .ort import OrtBackend
from .tvm import TvmBackend


class ChosenExecutable:
    """The faster of the candidates, with the measurements behind the choice."""

    def __init__(self, chosen: Executable, backend: str, decision: list[str]):
        self.chosen, self.backend, self.decision = chosen, backend, decision

    def run(self, inputs):
        return self.chosen.run(inputs)

    def artifact(self):
        return self.chosen.artifact()

    def describe(self) -> list[str]:
        return self.chosen.describe() + self.decision

    def __getattr__(self, name):          # export_library when TVM was kept
        return getattr(self.chosen, name)


class BothExecutable:
    """The ONNX model and TVM's library for a target this machine cannot run: `export(dir)` ships both and the
    board's run.py runs either. Calls here run the ONNX model on this machine's CPU (the reference)."""
    backend = "ort,tvm"

    def __init__(self, ort_exe: Executable, tvm_exe: Executable):
        self.ort, self.tvm = ort_exe, tvm_exe
        self.disabled_optimizers = ort_exe.disabled_optimizers

    def run(self, inputs):
        return self.ort.run(inputs)

    def artifact(self):
        return self.ort.artifact()

    def export_library(self, path):
        return self.tvm.export_library(path)

    def tables(self) -> list[dict]:
        return self.ort.tables() + self.tvm.tables()

    def describe(self) -> list[str]:
        return ([f"backend auto on {self.tvm.target}: built both, for the board to run either (nothing can be timed "
                 "for it from here); calls here run the ONNX model on this machine's CPU"]
                + self.ort.describe() + self.tvm.describe())


class AutoBackend:
    """The default: ONNX Runtime, with graphopt's TVM kernels between ORT segments where that measures faster
    (runtime/mixed.py), or tuned TVM where `tune=` asks and it measures faster. Decisions of the passes are
    timed on ONNX Runtime, which runs the model unless a measurement says otherwise."""
    name = "auto"

    def check(self, target: Target, tune=None) -> None:
        if not (target.host or target.ships_both):
            raise InputError(f"backend='auto' chooses between ONNX Runtime and TVM on target 'cpu' (and ships both "
                             f"for arm64); for {target} give backend='ort' or backend='tvm'")
        if tune is not None or target.ships_both:
            TvmBackend().check(target, tune)

    def cost_model(self, target: Target):
        return OrtBackend().cost_model(target)

    def build(self, graph: Graph, target: Target, inputs: BuildInputs) -> ChosenExecutable | BothExecutable:
        if target.ships_both:
            return BothExecutable(OrtBackend().build(graph, target, inputs), TvmBackend().build(graph, target, inputs))
        ort_exe = OrtBackend().build(graph, target, inputs)
        if inputs.tune is None:
            return ChosenExecutable(ort_exe, "ort", [(
                "backend auto: kept ONNX Runtime without building TVM (no tune=: TVM's default CPU schedules are "
                "far slower; give tune=graphopt.Tune(...) to compare against tuned TVM)")])
        tvm_exe = TvmBackend().build(graph, target, inputs)
        flat = graph.flat_inputs(inputs.args, inputs.kwargs)
        ms = inputs.cost.compare({"ort": ort_exe.run, "tvm": tvm_exe.run}, (flat,))
        best = min(ms, key=ms.get)
        names = {"ort": "ONNX Runtime", "tvm": "tuned TVM"}
        return ChosenExecutable({"ort": ort_exe, "tvm": tvm_exe}[best], best, [(
            f"backend auto: kept {names[best]} — measured ONNX Runtime {ms['ort']:.3g} ms, tuned TVM "
            f"{ms['tvm']:.3g} ms per call on the example inputs (interleaved rounds, medians)")])

