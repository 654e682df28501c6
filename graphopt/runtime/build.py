"""Building a planned early exit: each segment through the rest of the pipeline, then the backend."""
from __future__ import annotations

import torch
from torch.export import Dim

from ..backends import Backend, BuildInputs
from ..ir import Graph, tensor_meta
from ..passes import Pass, PassContext, PassManager
from ..targets import Target
from ..backends.ort import OrtExecutable
from ..sessions import ort_session
from .dispatch import EarlyExitExecutable
from .exit_graph import exits_as_if


def build_early_exit(plan, backend: Backend, target: Target, passes: list[Pass], tune=None,
                     cost=None) -> EarlyExitExecutable:
    """`plan` (passes.skip.ExitPlan): every segment optimized by `passes` (those after early_exit in the
    pipeline: epilogue fusions, cleanup) and built by `backend` with a dynamic batch dim, since each runs
    on the samples still going. Segments run one after another: graphopt's ORT sessions do not spin after a
    run (sessions.py), so one segment's workers do not take the cores from the next (on the digits classifier,
    2 cores, spinning sessions measured 57 vs 45 ms for 397 images, 2.24 vs 0.79 ms per single image)."""
    executables = []
    for segment, example in zip(plan.segments, plan.example):
        if passes:
            PassManager(passes).run(segment.graph, PassContext(target, example, cost=cost))
        if backend.name in ("ort", "auto") and segment.has_hidden:
            blocked_layout_entry(segment.graph, segment.graph.inputs[:1])
        dynamic = tuple({0: Dim.DYNAMIC} for _ in example)
        executables.append(backend.build(segment.graph, target, BuildInputs(example, {}, dynamic, tune, cost=cost)))
    routes = [s.inputs for s in plan.segments]
    dispatcher = EarlyExitExecutable(executables, routes, plan.thresholds, plan.labels,
                                     getattr(executables[0], "backend", backend.name),
                                     [s.graph for s in plan.segments], plan.example)
    dispatcher.single, dispatcher.single_notes = one_sample_graph(dispatcher, plan, target, cost)
    return dispatcher


def one_sample_graph(dispatcher: EarlyExitExecutable, plan, target: Target, cost) -> tuple:
    """(ONNX Runtime session of the exits nested in `If` nodes, or None; why): for one sample per call,
    kept where the cost model times it faster than the dispatcher on a calibration sample. The dispatcher's
    per-segment calls and host work cost more than the segments themselves on a small model (the digits
    classifier: 0.25 ms against 0.11 ms for ORT's `If`). The `If` session is timed with ORT's workers (one per
    core) and with one thread: one sample's small ops gain less from a parallel-for than it costs to hand them
    out (the digits classifier on 2 cores: 0.041 against 0.047 ms)."""
    segments = [getattr(s, "chosen", s) for s in dispatcher.segments]   # backend="auto": the executable it kept
    if cost is None or not all(isinstance(s, OrtExecutable) and s.runs_here for s in segments):
        return None, ["one sample per call: the host dispatcher (the exits as ONNX `If` need every segment "
                      "on ONNX Runtime, run here)"]
    if any(s.weights_outside for s in segments):
        return None, ["one sample per call: the host dispatcher (a segment keeps its weights outside its ONNX model, "
                      "past 2 GB: the exits as one ONNX graph with `If` would hold them all)"]
    model = exits_as_if([s.artifact() for s in segments], dispatcher.routes, dispatcher.thresholds)
    providers, serialized = target.providers or ("CPUExecutionProvider",), model.SerializeToString()
    sessions = {"If": ort_session(serialized, providers)}
    if providers[0] == "CPUExecutionProvider":
        sessions["If, 1 thread"] = ort_session(serialized, providers, threads=1)
    given = {}                            # the model's inputs, first sample: from each segment's example inputs
    for k, (route, example) in enumerate(zip(dispatcher.routes, plan.example)):
        given.update(zip(route, example[0 if k == 0 else 1:]))
    sample = [given[i][:1] if i in given else None for i in range(max(given, default=-1) + 1)]
    order = [(i.name, int(i.name.removeprefix("input"))) for i in sessions["If"].get_inputs()]
    feeds = {name: sample[i].numpy() for name, i in order}
    ms = cost.compare({"dispatcher": lambda: dispatcher.run_segments(sample),
                       **{name: (lambda s=s: s.run(None, feeds)) for name, s in sessions.items()}}, ())
    best = min(ms, key=ms.get)
    why = ("one sample per call, timed on a calibration sample: " +
           ", ".join(f"{name} {t:.3f} ms" for name, t in ms.items()) +
           " (If: the exits as one ONNX graph with If nodes; the dispatcher: one call per segment)")
    if best != "dispatcher":
        return (model, sessions[best], order), [why + f": {best} kept for batch 1; batches run on the dispatcher"]
    return None, [why + ": the dispatcher kept"]


def blocked_layout_entry(graph: Graph, inputs) -> None:
    """Feature maps coming into a segment (4-D float `inputs`) pass a 1×1 max-pool (an identity) first. ONNX
    Runtime's NCHWc layout pass reorders a conv's input but not the residual a fused conv adds, so a segment
    starting inside a residual stream ran every block in plain NCHW, with reorders between: a 5-block segment
    of the digits classifier measured 171 ms against 100 ms with the pool, which it turns into a reorder."""
    first = next(n for n in graph.fx.nodes if n.op != "placeholder")
    for hidden in inputs:
        val = tensor_meta(hidden)
        if val is None or val.dim() != 4 or not val.is_floating_point() or not hidden.users:
            continue
        pooled = graph.call(torch.ops.aten.max_pool2d.default, (hidden, [1, 1]), before=first)
        hidden.replace_all_uses_with(pooled, delete_user_cb=lambda user, p=pooled: user is not p)
    graph.module.recompile()
