"""compile()'s quantize= option.

    Quantization("int8")           static int8 convs and linears (calibration batches set activation ranges)
    Quantization("int8-dynamic")   linears with int8 weights, activations quantized at run time
    Quantization("int4-weight")    linears with 4-bit block-wise weights
    Quantization("auto", budget=)  per layer float / int8 / int4: the fastest plan within the budget
`quantize="int8"` (a string) means Quantization("int8")."""
from __future__ import annotations

import torch

from ...errors import InputError, UnsupportedError
from ...options import Option, fraction
from ..base import available
from .layers import MODES

DEFAULT_BUDGET = 0.01
BUDGET_MEANS = "the allowed mean (1 − cosine) output error, e.g. 0.01"


class Quantization(Option):
    keyword = "quantize"

    def __init__(self, mode: str = "int8", budget: float | None = None):
        if mode != "auto" and mode not in MODES:
            raise InputError(f"quantize={mode!r}: choose one of {', '.join(MODES)} or 'auto'")
        if budget is not None and mode != "auto":
            raise InputError(f"Quantization({mode!r}, budget={budget!r}): a budget applies to mode 'auto'")
        self.mode = mode
        self.budget = None if mode != "auto" else \
            DEFAULT_BUDGET if budget is None else fraction("Quantization", "budget", budget, BUDGET_MEANS)

    def __repr__(self) -> str:
        return f"Quantization({self.mode!r}" + (f", budget={self.budget:g})" if self.budget is not None else ")")

    @property
    def needs_calibration(self) -> bool:
        return self.mode in ("int8", "auto")

    without_calibration = ", or use quantize='int8-dynamic'"

    def check(self, model: torch.nn.Module, target, backend: str) -> None:
        dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
        if dtypes - {torch.float32}:
            raise UnsupportedError(f"quantize={self.mode!r} lowers float32 models; this one has "
                                   f"{', '.join(sorted(map(str, dtypes)))} weights: call model.float() first")

    def passes(self) -> list:
        """In the lossy phase: after the fusions that read float patterns (attention, norms), before the
        epilogue fusion (which leaves QDQ convs alone)."""
        made = available()   # by name: the passes import this module's defaults
        return [made["quantize_auto"](self.budget) if self.mode == "auto" else made["quantize"](self.mode)]


def quantization(quantize, accuracy_budget) -> Quantization | None:
    """compile()'s quantize= and accuracy_budget= as one option (a string names the mode)."""
    if isinstance(quantize, Quantization):
        if accuracy_budget is not None:
            raise InputError("accuracy_budget= applies to quantize='auto' given as a string; give "
                             "Quantization('auto', budget=...) its budget instead")
        return quantize
    if accuracy_budget is not None and quantize != "auto":
        raise InputError("accuracy_budget= applies to quantize='auto'")
    if accuracy_budget is not None:
        fraction("compile", "accuracy_budget", accuracy_budget, BUDGET_MEANS)
    if quantize is None:
        return None
    if not isinstance(quantize, str):
        raise InputError(f"quantize= takes a mode name or a graphopt.Quantization(...), got {type(quantize).__name__}")
    return Quantization(quantize, accuracy_budget)
