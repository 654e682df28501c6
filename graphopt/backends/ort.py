"""ONNX Runtime backend: one InferenceSession per compiled model, providers from the target."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import torch

from ..codegen import to_onnx
from ..errors import UnsupportedError
from ..ir import Graph
from ..targets import Target
from .base import BuildInputs
from .ort_fusion_choice import slow_fusions, slow_int8_fusions

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


class OrtExecutable:
    def __init__(self, model: onnx.ModelProto, providers: list[str], n_inputs: int, device: str):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.model = model
        self.slow = slow_fusions_for(model) if providers[0] == "CPUExecutionProvider" else ()
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=providers,
                                            disabled_optimizers=[name for name, *_ in self.slow])
        # the exporter keeps every user input, in the flattened order graphopt feeds them
        self.names = [i.name for i in self.session.get_inputs()]
        if len(self.names) != n_inputs:
            raise UnsupportedError(f"the ONNX model has {len(self.names)} inputs for the model's {n_inputs}")
        self.device = device

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        feeds = {name: _numpy(t) for name, t in zip(self.names, inputs)}
        outs = [torch.from_numpy(np.asarray(o)) for o in self.session.run(None, feeds)]
        return outs if self.device == "cpu" else [o.to(self.device) for o in outs]

    def artifact(self) -> onnx.ModelProto:
        return self.model

    def describe(self) -> list[str]:
        counts = collections.Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in self.model.graph.node)
        ops = ", ".join(f"{op} {k}" for op, k in counts.most_common())
        return [f"ONNX graph: {sum(counts.values())} nodes ({ops})",
                f"ONNX Runtime providers: {', '.join(self.session.get_providers())}"] + [
                f"ORT's {name} disabled: its kernel measured {fused:.0f} µs vs {unfused:.0f} µs unfused on this machine"
                for name, fused, unfused in self.slow]


def slow_fusions_for(model: onnx.ModelProto) -> tuple[tuple[str, float, float], ...]:
    """The ORT fusions to disable for this model on the CPU (measured slower here; see ort_fusion_choice)."""
    return slow_fusions() + (slow_int8_fusions() if _has_int8_matmul(model) else ())


def _has_int8_matmul(model: onnx.ModelProto) -> bool:
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return any(n.op_type == "MatMul" and dequantized & set(n.input) for n in model.graph.node)


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


class OrtBackend:
    name = "ort"

    def check(self, target: Target) -> None:
        if target.name == "arm64":
            raise UnsupportedError("target 'arm64' is not yet supported by the ONNX Runtime backend (it runs on "
                                   "this host only); use backend='tvm' to cross-compile for arm64")
        if target.name == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise UnsupportedError("target 'cuda' needs onnxruntime-gpu (this onnxruntime has only "
                                       f"{', '.join(ort.get_available_providers())}); pip install onnxruntime-gpu")
            if not torch.cuda.is_available():
                raise UnsupportedError("target 'cuda' needs a CUDA GPU, and torch sees none on this machine")

    def build(self, graph: Graph, target: Target, inputs: BuildInputs) -> OrtExecutable:
        model = to_onnx(graph, inputs.args, inputs.kwargs, inputs.dynamic_shapes)
        return OrtExecutable(model, PROVIDERS[target.name], len(graph.inputs), target.device)
