"""CompiledModule: what compile() returns. Torch tensors in, the model's output structure out."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch.utils import _pytree as pytree

from .artifacts import write_atomically
from .backends import Executable
from .errors import InputError
from .ir import Graph, tensor_meta
from .passes import StepRecord
from .targets import Target


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int | None, ...]    # None where the dim is dynamic
    dtype: torch.dtype

    def __str__(self) -> str:
        dims = ", ".join("*" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {str(self.dtype).removeprefix('torch.')}[{dims}]"


def input_specs(graph: Graph) -> list[InputSpec]:
    specs = []
    for node in graph.inputs:
        val = tensor_meta(node)
        specs.append(InputSpec(node.name, tuple(d if isinstance(d, int) else None for d in val.shape), val.dtype))
    return specs


class CompiledModule:
    def __init__(self, graph: Graph, executable: Executable, target: Target, backend: str,
                 report: list[StepRecord], passes: list[tuple[str, str]] = (),
                 example: tuple[list[torch.Tensor], list[torch.Tensor]] = ((), ()), plans: dict | None = None):
        self.graph = graph                # the optimized IR (still runnable in PyTorch)
        self.executable = executable
        self.target = target
        self.backend = backend
        self.report = report              # one StepRecord per pass and for the backend
        self.passes = list(passes)        # (name, phase) of each pass that ran, in order
        self.plans = dict(plans or {})    # pass name → what a planning pass decided (quantize_auto, early_exit)
        # the joint plan (optimize=graphopt.Auto or a saved plan): JSON with cm.plan.save(path); None without one
        self.plan = self.plans.get("auto", self.plans.get("apply_plan"))
        # the example inputs (flat, copied) and the eager model's outputs on them: the bundle's reference data
        self.example_inputs, self.model_outputs = [t.detach().clone() for t in example[0]], list(example[1])
        self.inputs = input_specs(graph)
        # most models take positional tensors: then the call skips flattening (see __call__)
        self._positional = graph.in_spec == pytree.tree_flatten((tuple(range(len(self.inputs))), {}))[1]
        # and most return one tensor: then the call skips unflattening (a pytree call costs ~10 µs, a batch-1
        # early exit ~40 µs in all)
        self._single_output = graph.out_spec == pytree.tree_flatten(0)[1]
        # per input: dtype, rank and its static dims, checked inline on each call (the full check when one fails)
        self._expect = [(s.dtype, len(s.shape), tuple((i, d) for i, d in enumerate(s.shape) if d is not None))
                        for s in self.inputs]

    def __call__(self, *args, **kwargs):
        if self._positional and not kwargs and len(args) == len(self.inputs):
            flat = args   # the fast path: each value is still checked to be a tensor of the right type and shape
        else:
            flat, spec = pytree.tree_flatten((args, kwargs))
            if spec != self.graph.in_spec:
                raise InputError(f"expected inputs ({', '.join(map(str, self.inputs))}) structured as in the "
                                 f"example; got {len(flat)} value(s) structured as {spec}")
        for value, want, (dtype, rank, dims) in zip(flat, self.inputs, self._expect):
            if not (type(value) is torch.Tensor and value.is_cpu and value.dtype is dtype and value.dim() == rank
                    and all(value.shape[i] == d for i, d in dims)):
                self._check(value, want)      # says what is wrong, or accepts a tensor on the target's device
        outputs = self.executable.run(list(flat))
        return outputs[0] if self._single_output else pytree.tree_unflatten(outputs, self.graph.out_spec)

    def _check(self, value, want: InputSpec) -> None:
        if not isinstance(value, torch.Tensor):
            raise InputError(f"input {want.name}: expected a tensor, got {type(value).__name__}")
        if value.device.type not in ("cpu", self.target.device):   # host tensors, or already on the target's device
            raise InputError(f"input {want.name}: a tensor on device {value.device}; this module takes tensors on the "
                             f"host or on {self.target.device} (call .cpu() first" +
                             (")" if value.device.type != "meta" else "; a meta tensor has no data to run on)"))
        ok = value.dtype == want.dtype and value.dim() == len(want.shape) and all(
            w is None or w == d for w, d in zip(want.shape, value.shape))
        if not ok:
            got = f"{str(value.dtype).removeprefix('torch.')}[{', '.join(map(str, value.shape))}]"
            hint = "" if None in want.shape else " (compile with dynamic_shapes='batch' to accept other batch sizes)"
            raise InputError(f"input {want}: got {got}; dims marked * may vary, the others must match{hint}")

    @property
    def last_exits(self) -> torch.Tensor | None:
        """With early_exit=: the exit each sample of the last call took (the number of exits: it ran to the
        end), for monitoring. None otherwise."""
        return getattr(self.executable, "last_exits", None)

    @property
    def runs_here(self) -> bool:
        """Whether this machine can call it (an arm64 TVM library cannot, its ONNX model can; a cuda build cannot
        without a GPU)."""
        return getattr(self.executable, "runs_here", True)

    def export(self, directory: str | Path) -> Path:
        """Write the folder a user ships to `directory`: ONNX segment(s) and their .ort, the TVM library where TVM
        built it, the example inputs and this machine's outputs, run.py and manifest.json (versions, passes,
        signature, exits, checksums; no pickle). graphopt.load(directory) runs its ONNX without the model;
        `graphopt verify-artifact directory` runs it where it is meant to run (arm64: under emulation)."""
        from .package import export_bundle
        return export_bundle(self, directory)

    def export_onnx(self, path: str | Path) -> Path:
        """Write the optimized graph as a standalone ONNX file; a model past 2 GB of weights as `path` and its
        external data file `path.data` beside it (codegen/external.py)."""
        from .codegen.external import onnx_parts, save_onnx
        model, weights, outside = onnx_parts(self.executable)
        if not isinstance(model, onnx.ModelProto):
            raise InputError(f"backend {self.backend!r} does not produce ONNX; compile with backend='ort'")
        return save_onnx(model, weights, path, "export_onnx", outside)

    def export_library(self, path: str | Path) -> Path:
        """Write the TVM build as a shared library the TVM runtime loads alone (cross-compiled for arm64)."""
        export = getattr(self.executable, "export_library", None)
        if export is None:
            raise InputError(f"backend {self.backend!r} builds no library; compile with backend='tvm', or use "
                             "export_onnx")
        return write_atomically(path, "export_library", lambda tmp: export(tmp))

    def __repr__(self) -> str:
        return f"CompiledModule(target={self.target}, backend={self.backend}, inputs=[{', '.join(map(str, self.inputs))}])"
