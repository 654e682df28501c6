"""The executable of an optimized graph: what compile() builds once the passes have run."""
from __future__ import annotations

from ..backends import Backend, BuildInputs, Executable, OrtBackend
from ..ir import Graph
from ..passes import Pass, PassContext, PassManager
from ..targets import Target
from . import mixed
from .build import build_early_exit
from .control import has_cond, lower_conds


def build_program(graph: Graph, backend: Backend, target: Target, inputs: BuildInputs, pipeline: list[Pass],
                  plans: dict) -> Executable:
    """Segments behind a host dispatcher when early exit planned them (each through the passes after it); a host
    program of static segments when the graph has torch.cond (each branch through the pipeline); otherwise the
    backend's build, with graphopt's TVM kernels between ORT segments where backend "auto" measures that faster."""
    if "early_exit" in plans:
        after = pipeline[[p.name for p in pipeline].index("early_exit") + 1:]
        return build_early_exit(plans["early_exit"], backend, target, after, inputs.tune, inputs.cost)
    if has_cond(graph):          # auto's measured choices are made on straight-line graphs: segments run on ORT
        backend = OrtBackend() if backend.name == "auto" else backend

        def build(g, example):
            return backend.build(g, target, BuildInputs(tuple(example), {}, None, inputs.tune, inputs.precision,
                                                        inputs.cost))

        def optimize(g, example):
            PassManager(pipeline).run(g, PassContext(target, tuple(example), {}, [], inputs.cost))
        return lower_conds(graph, graph.flat_inputs(inputs.args, inputs.kwargs), build, optimize, backend.name)
    executable = backend.build(graph, target, inputs)
    if backend.name == "auto" and mixed.worth_trying(graph, target, inputs):
        executable = mixed.with_tvm_kernels(graph, target, inputs, executable)
    return executable
