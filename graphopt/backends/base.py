"""The backend protocol: check a target early, build an executable from the optimized IR."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..ir import Graph
from ..targets import Target


@dataclass
class BuildInputs:
    """What a backend needs besides the graph: the example inputs and their dynamic dims."""
    args: tuple
    kwargs: dict = field(default_factory=dict)
    dynamic_shapes: Any = None
    tune: Any = None          # backends.tvm_tune.Tune, for the TVM backend
    precision: str = "fp32"   # "fp16": TVM computes in half precision (Relax ToMixedPrecision, fp32 accumulation)
    cost: Any = None          # the compile's cost model (cost.CostModel): the backend's own measured choices


class Executable(Protocol):
    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Flat tensors in (the model's inputs, pytree order), flat tensors out."""

    def artifact(self) -> Any:
        """The built artifact (an onnx.ModelProto for ORT)."""

    def describe(self) -> list[str]:
        """A few lines for the report: what was built."""


class Backend(Protocol):
    name: str

    def check(self, target: Target, tune=None) -> None:
        """Raise a GraphoptError now if this backend cannot build (or tune, given `tune`) for `target` here."""

    def cost_model(self, target: Target):
        """The cost model that times decisions as this backend will run the model (cost.CostModel)."""

    def build(self, graph: Graph, target: Target, inputs: BuildInputs) -> Executable: ...
