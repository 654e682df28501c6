"""The one option protocol: every family's compile() argument (quantize=, sparsity=, layer_skip=,
early_exit=, tune=) is an Option.

An Option validates itself when it is made, says what it needs (calibration batches, a backend, a
float32 model), and yields its passes, each placed in the pipeline by its phase. compile() asks every
option the same questions, in the order check → capture → passes → build, and the passes report what
they decided (their plans) in their results, never on the user's object. The joint planner
(graphopt.Auto, optimize=) is an option too: its pass searches every lossy family's moves at once.""" 
from __future__ import annotations

import math
from typing import Any, ClassVar

from .errors import InputError


class Option:
    """A family's request. Subclasses set `keyword` and implement `passes`; the rest has defaults."""
    keyword: ClassVar[str]               # the compile() argument that takes it

    @property
    def needs_calibration(self) -> bool:
        return False

    @property
    def min_batches(self) -> int:
        """Calibration batches it needs at least (early exit fits heads on some and checks on the rest)."""
        return 1 if self.needs_calibration else 0

    @property
    def dynamic_batch(self) -> bool:
        """It builds segments that run on a varying number of samples (captured with a dynamic batch dim)."""
        return False

    def check(self, model, target, backend: str) -> None:
        """An error now, before any work, if the model, target or backend cannot take it."""

    def check_graph(self, graph) -> None:
        """An error right after capture, before any pass, if the captured graph cannot take it."""

    def check_data(self, model, calibration: list) -> None:
        """An error before capture if the calibration batches (checked against the example) cannot serve it."""

    def passes(self) -> list:
        """Fresh passes (graphopt.passes.Pass) to place by their phase; none for a backend's option (tune=)."""
        return []


def fraction(owner: str, name: str, value: Any, meaning: str) -> float:
    """`value` as a float strictly between 0 and 1, or an InputError naming the option, the argument and
    what the number means: the one place budgets and ratios are checked."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 < value < 1:
        raise InputError(f"{owner}({name}={value!r}): give a number strictly between 0 and 1, {meaning}")
    return float(value)


def check_calibration(options: list[Option], calibration: list) -> None:
    """The one calibration check: each option that needs batches names itself when they are missing."""
    for option in options:
        if option.needs_calibration and not calibration:
            raise InputError(f"{option.keyword}={option!r} needs calibration data: pass calibration=[batch, ...] "
                             "with a few representative inputs shaped like example_inputs"
                             + getattr(option, "without_calibration", ""))
        if len(calibration) < option.min_batches:
            raise InputError(f"{option.keyword}={option!r} needs at least {option.min_batches} calibration batches, "
                             f"got {len(calibration)}" + getattr(option, "why_batches", ""))
