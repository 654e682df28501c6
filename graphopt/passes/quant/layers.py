"""What quantization works on: the layers it can lower (2-D convs and linears with constant
weights), their names, the uniform plans, and the int8 encodings of weights and activations."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ...errors import InputError
from ...ir import Graph, conv_args, tensor_meta
from .observers import METHODS

aten = torch.ops.aten
CONV, LINEAR = aten.convolution.default, aten.linear.default
MODES = {"int8": "int8", "int8-dynamic": "int8-dynamic", "int4-weight": "int4"}


@dataclass
class QuantOptions:
    observer: str = "mse"                 # activation range: minmax | percentile | mse
    symmetric_activations: bool = False   # int8 around 0 instead of uint8 over [min, max]
    bias_correction: bool = True
    kernel_choice: bool = True            # per conv shape, encode weights for the faster ORT int8 kernel
    smooth: float | None = 0.7            # SmoothQuant α for static int8 linears (None: off)
    keep_float: tuple[str, ...] = ()      # layer names (node names or module paths) to leave in float
    weight_max: int | None = None         # largest |int8 weight| (63: ORT's reduce_range); None: the target's kernels say

    def __post_init__(self):
        if self.observer not in METHODS:
            raise InputError(f"observer={self.observer!r}: choose one of {', '.join(METHODS)}")


def layers(graph: Graph) -> list[fx.Node]:
    """The quantizable layers: 2-D convs and linears whose weights are constants."""
    return [n for n in graph.ops() if why_not_layer(graph, n) is None]


def why_not_layer(graph: Graph, n: fx.Node) -> str | None:
    if n.target not in (CONV, LINEAR):
        return "not a conv or linear"
    if not (isinstance(n.args[1], fx.Node) and graph.is_constant(n.args[1])):
        return "weight is not a constant"
    if tensor_meta(n.args[0]) is None or tensor_meta(n.args[0]).dtype != torch.float32:
        return "input is not float32"
    if n.target is CONV and (conv_args(n).transposed or tensor_meta(n.args[1]).dim() != 4):
        return "transposed or non-2-D convolution"
    return None


def layer_name(n: fx.Node) -> str:
    """The module path of a layer ('encoder.layer.0.attention.self.query'), else its node name."""
    stack = n.meta.get("nn_module_stack")
    return next(reversed(stack.values()))[0] if stack else n.name


def uniform_plan(graph: Graph, mode: str, keep_float=()) -> dict[str, str]:
    """Every layer in `mode` (static int8 for convs; linears as the mode says), except kept ones."""
    plan = {}
    for n in layers(graph):
        m = mode if n.target is LINEAR or mode == "int8" else "float"
        plan[n.name] = "float" if (n.name in keep_float or layer_name(n) in keep_float) else m
    return plan


def quantize_weight(w: torch.Tensor, qmax: int = 127) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel (axis 0), values in [-qmax, qmax]: (int8 weight, scales, zero points)."""
    scale = w.reshape(w.shape[0], -1).abs().amax(dim=1).clamp(min=1e-12) / qmax
    q = torch.clamp(torch.round(w / scale.reshape(-1, *[1] * (w.dim() - 1))), -qmax, qmax).to(torch.int8)
    return q, scale, torch.zeros(w.shape[0], dtype=torch.int8)


def activation_qparams(rng: tuple[float, float], symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = rng
    if symmetric:
        scale = max(abs(lo), abs(hi), 1e-8) / 127
        return torch.tensor(scale, dtype=torch.float32), torch.tensor(0, dtype=torch.int8)
    scale = max(hi - lo, 1e-8) / 255
    return torch.tensor(scale, dtype=torch.float32), torch.tensor(round(-lo / scale), dtype=torch.uint8)


def weight_max(options: QuantOptions, ctx) -> tuple[int, str | None]:
    """The int8 weight range to emit: the user's, else what the target's int8 kernels compute exactly."""
    if options.weight_max is not None:
        if not 1 <= options.weight_max <= 127:
            raise InputError(f"weight_max={options.weight_max}: give 1..127 (63 is ORT's reduce_range)")
        return options.weight_max, None
    return (127, None) if ctx.cost.unmeasurable else ctx.cost.int8_weight_max()
