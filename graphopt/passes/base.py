"""The pass contract: a small object with a `name` and `run(graph, ctx) -> PassResult`.

Passes rewrite the IR in place and never print; what they did (and, for candidates they left
alone, why) goes into the PassResult, which the PassManager writes to the dumps."""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

from ..errors import InputError
from ..ir import Graph
from ..targets import Target


@dataclass
class PassContext:
    target: Target
    example_args: tuple
    example_kwargs: dict = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)   # later passes: calibration data, budgets...


@dataclass
class PassResult:
    rewrites: int = 0                                 # how many places the pass changed
    notes: list[str] = field(default_factory=list)    # one line per rewrite, and per candidate skipped: why
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return self.rewrites > 0

    def did(self, note: str) -> None:
        self.rewrites += 1
        self.notes.append(note)

    def skipped(self, note: str) -> None:
        self.notes.append("not rewritten: " + note)


class Pass(abc.ABC):
    name: ClassVar[str]
    summary: ClassVar[str]   # one line for `graphopt passes`
    lossy: ClassVar[bool] = False   # changes the numbers by design (quantization): verify checks later steps only
    needs_calibration: ClassVar[bool] = False   # compile() refuses it without calibration data

    @abc.abstractmethod
    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Rewrite `graph` in place and report what changed."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


_REGISTRY: dict[str, type[Pass]] = {}

DEFAULT_PIPELINES: dict[str, tuple[str, ...]] = {
    "cpu": ("remove_noops", "fold_constants", "fold_batchnorm", "fft_conv", "fuse_norms", "fuse_attention",
            "fuse_epilogues", "fold_constants", "dce"),
    "cuda": ("remove_noops", "fold_constants", "fold_batchnorm", "dce"),
    "arm64": ("remove_noops", "fold_constants", "fold_batchnorm", "dce"),
}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by its name."""
    if cls.name in _REGISTRY:
        raise ValueError(f"pass name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> dict[str, str]:
    """name → one-line summary of every registered pass."""
    return {name: cls.summary for name, cls in sorted(_REGISTRY.items())}


def resolve(passes: str | Sequence[str | Pass], target: Target) -> list[Pass]:
    """'default' (the target's pipeline) or a list of names / Pass objects → Pass objects."""
    if isinstance(passes, str):
        if passes != "default":
            raise InputError(f"passes={passes!r}: give 'default' or a list of pass names or Pass objects")
        passes = DEFAULT_PIPELINES[target.name]
    out = []
    for p in passes:
        if isinstance(p, Pass):
            out.append(p)
        elif isinstance(p, str) and p in _REGISTRY:
            out.append(_REGISTRY[p]())
        else:
            raise InputError(f"unknown pass {p!r}; known passes: {', '.join(sorted(_REGISTRY))} "
                             "(see `graphopt passes`)")
    return out
