"""ONNX Runtime backend: one InferenceSession per compiled model, providers from the target."""
from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import torch

from ..codegen import to_onnx
from ..codegen.external import inline, kept_outside, session_source
from ..cost import CostModel
from ..errors import InputError, UnsupportedError
from ..ir import Graph
from ..sessions import ort_session
from ..targets import Target
from .base import BuildInputs


class OrtExecutable:
    """`fusions`: (ORT fusion, fused µs, unfused µs) measured on the target; those in `disabled` measured slower.
    `weights`: the arrays of the model's external initializers (codegen/external.py), which the session copied in
    and an artifact is built from (`weights_outside`: past 2 GB, they stay beside it); `path`: the model's file (a
    loaded bundle's, its data file beside it), opened by ORT from there;
    `source`: the model as ORT's session takes it, where the caller has it already (codegen.onnx.Lowered)."""

    def __init__(self, model: onnx.ModelProto, target: Target, n_inputs: int,
                 fusions: tuple[tuple[str, float, float], ...] = (), disabled: tuple[str, ...] | list[str] = (),
                 weights: dict | None = None, path=None, source=None):
        self.model, self.target, self.fusions = model, target, tuple(fusions)
        self.weights = weights or {}
        self.weights_outside = kept_outside(self.weights)
        self.disabled_optimizers = list(disabled)
        # a GPU target without onnxruntime-gpu or a GPU: built, exported, not run here (never silently on the CPU
        # provider). arm64: its ONNX model is portable and runs here on the CPU provider, the reference a board
        # run is compared with
        self.cannot_run = target.ort_unavailable() if target.gpu else None
        if path is not None:
            source = Path(path)
        elif source is None:
            source = session_source(model, self.weights)
        self.session = None if self.cannot_run else ort_session(
            source, target.providers or ("CPUExecutionProvider",), disabled=self.disabled_optimizers)
        # the exporter keeps every user input, in the flattened order graphopt feeds them
        weights = {w.name for w in model.graph.initializer}
        self.names = [i.name for i in model.graph.input if i.name not in weights]
        if len(self.names) != n_inputs:
            raise UnsupportedError(f"the ONNX model has {len(self.names)} inputs for the model's {n_inputs}")
        self.device = target.device

    @property
    def runs_here(self) -> bool:
        return self.session is not None

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.session is None:
            raise UnsupportedError(f"this module was built for {self.target}, which this machine cannot run "
                                   f"({self.cannot_run}); export(dir) writes the folder to run there")
        feeds = {name: _numpy(t) for name, t in zip(self.names, inputs)}
        outs = [torch.from_numpy(np.asarray(o)) for o in self.session.run(None, feeds)]
        return outs if self.device == "cpu" else [o.to(self.device) for o in outs]

    def artifact(self) -> onnx.ModelProto:
        """The ONNX model: self-contained, its weights copied in now, unless they stay outside it (past 2 GB)."""
        return inline(self.model, self.weights) if self.weights and not self.weights_outside else self.model

    def tables(self) -> list[dict]:
        if not self.fusions:
            return []
        slow = set(self.disabled_optimizers)
        return [{"title": "ONNX Runtime fusions: fused kernel vs the ops it replaces (µs, probe shapes on this machine)",
                 "columns": ["fusion", "fused µs", "unfused µs", "choice"],
                 "rows": [[n, f, u, "disabled (slower)" if n in slow else "kept"] for n, f, u in self.fusions],
                 "bars": ["fused µs", "unfused µs"], "unit": " µs"}]

    def describe(self) -> list[str]:
        counts = collections.Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in self.model.graph.node)
        ops = ", ".join(f"{op} {k}" for op, k in counts.most_common())
        providers = f"none here ({self.cannot_run})" if self.session is None else ", ".join(self.session.get_providers())
        return [f"ONNX graph: {sum(counts.values())} nodes ({ops})", f"ONNX Runtime providers: {providers}"] + [
                f"ORT's {name} disabled: its kernel measured {fused:.0f} µs vs {unfused:.0f} µs unfused on this machine"
                for name, fused, unfused in self.fusions if name in self.disabled_optimizers]


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


class OrtBackend:
    name = "ort"

    def check(self, target: Target, tune=None) -> None:
        """Every target builds; one this machine cannot run (cuda without a GPU) says so when called."""
        if tune is not None:
            raise InputError("tune= takes a graphopt.Tune and needs backend='tvm' or 'auto': ONNX Runtime's kernels "
                             "are not tuned")

    def cost_model(self, target: Target) -> CostModel:
        return CostModel(target, "ort")

    def build(self, graph: Graph, target: Target, inputs: BuildInputs) -> OrtExecutable:
        """The graph exported to ONNX, or, where a pass timed exactly this graph, the lowering it timed (an export
        is a second or more: MobileNetV2's conv epilogues were lowered three times)."""
        cost = inputs.cost if inputs.cost is not None and inputs.cost.backend == "ort" else self.cost_model(target)
        timed = cost.lowering(graph, inputs.args, inputs.kwargs, inputs.dynamic_shapes)
        if timed is not None:
            model, source, weights = timed.model, timed.source, timed.weights
        else:
            weights = {}
            model, source = to_onnx(graph, inputs.args, inputs.kwargs, inputs.dynamic_shapes, weights=weights)
        return OrtExecutable(model, target, len(graph.inputs), cost.fusion_timings(model),
                             [name for name, *_ in cost.slow_fusions(model)], weights=weights, source=source)
