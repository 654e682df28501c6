"""The pass contract: a small object with a `name` and `run(graph, ctx) -> PassResult`.

Passes rewrite the IR in place and never print; what they did (and, for candidates they left
alone, why) goes into the PassResult, which the PassManager writes to the dumps."""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import torch.fx as fx

from ..cost import CostModel
from ..errors import InputError
from ..ir import Graph
from ..progress import Progress
from ..targets import Target

Batch = tuple[tuple, dict]   # one calibration batch: (args, kwargs) shaped like the example inputs
PHASES = ("canonicalize", "rewrite", "lossy", "epilogue", "cleanup")   # the order a pipeline runs them in


@dataclass
class PassContext:
    """What a pass may read besides the graph. `cost` makes every measured decision, on the target."""
    target: Target
    example_args: tuple
    example_kwargs: dict = field(default_factory=dict)
    calibration: list[Batch] = field(default_factory=list)
    cost: CostModel | None = None
    progress: Progress = field(default_factory=Progress)   # ctx.progress.step("...") says what a long pass does now

    def __post_init__(self):   # a pass run on its own (tests, tools): decisions timed on ONNX Runtime
        if self.cost is None:
            self.cost = CostModel(self.target)


@dataclass
class PassResult:
    rewrites: int = 0                                 # how many places the pass changed
    notes: list[str] = field(default_factory=list)    # one line per rewrite, and per candidate skipped: why
    stats: dict[str, int] = field(default_factory=dict)
    tables: list[dict] = field(default_factory=list)  # per-item decisions, drawn in the report (see `table`)
    plan: Any = None                                  # what a planning pass decided (cm.plans[pass name])

    def table(self, title: str, columns: list[str], rows: list[list], bars: tuple[str, ...] = (),
              unit: str = "", scatter: dict | None = None) -> None:
        """A decision per item (layer, conv, block, exit) for the report to draw: one row each, the numeric
        `bars` columns drawn as bars side by side (each scaled to its own largest value), or the rows drawn as
        points: `scatter` = {"x": column, "y": column, "kind": column naming each point's series, "limit": a
        horizontal line (the budget), "chosen": the row marked}."""
        self.tables.append({"title": title, "columns": list(columns), "rows": [list(r) for r in rows],
                            "bars": list(bars), "unit": unit} | ({"scatter": scatter} if scatter else {}))

    @property
    def changed(self) -> bool:
        return self.rewrites > 0

    def did(self, note: str) -> None:
        self.rewrites += 1
        self.notes.append(note)

    def skipped(self, note: str) -> None:
        self.notes.append("not rewritten: " + note)


class Pass(abc.ABC):
    """Rewrites the graph in place; the manager removes what became dead and tidies after it."""
    name: ClassVar[str]
    summary: ClassVar[str]   # one line for `graphopt passes`
    phase: ClassVar[str]     # one of PHASES: where the pass goes when added to a pipeline
    lossy: ClassVar[bool] = False   # changes the numbers by design (quantization): verify checks later steps only
    needs_calibration: ClassVar[bool] = False   # compile() refuses it without calibration data
    precedes: ClassVar[tuple[str, ...]] = ()    # families it goes before when placed in its phase

    @abc.abstractmethod
    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Rewrite `graph` in place and report what changed."""

    @staticmethod
    def nodes(graph: Graph, *ops) -> Iterator[fx.Node]:
        """The calls of any of `ops`, in graph order, safe to rewrite while iterating: the order is taken
        first, and a node an earlier rewrite of the loop erased is not yielded."""
        for node in list(graph.ops()):
            if not node._erased and (not ops or node.target in ops):
                yield node

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


_REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by its name; its family is its subpackage."""
    if cls.name in _REGISTRY:
        raise ValueError(f"pass name {cls.name!r} registered twice")
    if getattr(cls, "phase", None) not in PHASES:
        raise ValueError(f"pass {cls.name!r} declares phase {getattr(cls, 'phase', None)!r}; one of {PHASES}")
    _REGISTRY[cls.name] = cls
    return cls


def family(cls: type[Pass]) -> str:
    """The pass family: the subpackage of graphopt.passes that defines it (cleanup, fusion, quant, ...)."""
    parts = cls.__module__.split(".")
    return parts[2] if len(parts) > 3 and parts[:2] == ["graphopt", "passes"] else "user"


def available() -> dict[str, type[Pass]]:
    """name → class of every registered pass."""
    return dict(sorted(_REGISTRY.items()))


def by_name(name: str) -> Pass:
    if name not in _REGISTRY:
        raise InputError(f"unknown pass {name!r}; known passes: {', '.join(sorted(_REGISTRY))} (see `graphopt passes`)")
    return _REGISTRY[name]()
