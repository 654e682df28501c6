"""backend="auto" across backends within one model: ONNX Runtime for the graph, graphopt's own TVM kernels
for the ops ONNX Runtime has no fast form of — depthwise FFT convs, which ORT runs as matmul (Monarch) FFTs
×7–15 slower than the fused kernel (benchmarks/bench_fft_conv.py). The graph is cut around each such op into
ORT segments and one-op TVM segments, run by a host program, and kept only where it measures faster than
the executable auto chose without it, both timings in the report's backend row."""
from __future__ import annotations

import torch
import torch.fx as fx

from ..backends import BuildInputs, Executable, OrtBackend, TvmBackend
from ..backends.auto import ChosenExecutable
from ..ir import Graph
from ..ops.fft_conv import fused_kernel_applies
from ..targets import Target
from .control import HostProgram, segment, values_on


def tvm_kernel_ops(graph: Graph, target: Target) -> list[fx.Node]:
    """The ops that run a TIR kernel of graphopt's own on TVM for `target`: fft_conv1d where the fused kernel
    applies (the same rule its Relax lowering follows) and its spectrum is a weight."""
    return [n for n in graph.fx.nodes if n.target is torch.ops.graphopt.fft_conv1d.default
            and n.args[1].op == "get_attr" and fused_kernel_applies(graph.constant(n.args[1]).shape, n.args[2], target)]


def worth_trying(graph: Graph, target: Target, inputs: BuildInputs) -> bool:
    """Only where both sides can be timed here, with static shapes (the TVM kernels are built for the example's)."""
    if not target.host or inputs.dynamic_shapes is not None or not tvm_kernel_ops(graph, target):
        return False
    try:
        import tvm  # noqa: F401
    except ImportError:
        return False
    return True


def lower_mixed(graph: Graph, target: Target, example: list[torch.Tensor], cost=None) -> HostProgram:
    """ORT segments between one-op TVM segments (their inputs and outputs passed as torch tensors)."""
    kernels, values = set(tvm_kernel_ops(graph, target)), values_on(graph, example)

    def build(backend):                    # graphopt's ORT sessions do not spin after a run (sessions.py)
        return lambda piece, ex: backend.build(piece, target, BuildInputs(tuple(ex), cost=cost))
    steps, run = [], []
    for n in (n for n in graph.fx.nodes if n.op == "call_function"):
        if n not in kernels:
            run.append(n)
            continue
        if run:
            steps.append(segment(graph, run, values, build(OrtBackend()), blocked_entry=bool(steps)))
            run = []
        steps.append(segment(graph, [n], values, build(TvmBackend())))
    if run:
        steps.append(segment(graph, run, values, build(OrtBackend()), blocked_entry=bool(steps)))
    return HostProgram([i.name for i in graph.inputs], steps, [o.name for o in graph.outputs], "ort+tvm")


def with_tvm_kernels(graph: Graph, target: Target, inputs: BuildInputs, chosen: Executable) -> Executable:
    """`chosen` (backend auto's pick) or the mixed program, whichever measures faster on the example inputs."""
    flat = graph.flat_inputs(inputs.args, inputs.kwargs)
    mixed = lower_mixed(graph, target, flat, inputs.cost)
    ms = inputs.cost.compare({"chosen": chosen.run, "mixed": mixed.run}, (flat,))
    n = len(tvm_kernel_ops(graph, target))
    line = (f"backend auto: {n} depthwise FFT conv(s) on graphopt's TVM kernel between ONNX Runtime segments "
            f"{ms['mixed']:.3g} ms vs without {ms['chosen']:.3g} ms per call (interleaved rounds, medians): ")
    if ms["mixed"] < ms["chosen"]:
        return ChosenExecutable(mixed, "ort+tvm", [line + "kept"])
    return ChosenExecutable(chosen, getattr(chosen, "backend", "ort"), [line + "not kept"])
