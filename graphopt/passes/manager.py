"""PassManager: runs a pipeline, does the chores after each pass (dead code, tidy), times each pass,
keeps a StepRecord per step and the plans planning passes return, and calls its instruments after each
step, as TVM's PassInstruments: drift against eager, the per-pass dumps and report, verify
(graphopt/report/instruments.py). Without instruments it only runs the passes."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from ..ir import Graph, graph_text
from ..numerics import Drift
from .base import Pass, PassContext, PassResult


@dataclass
class StepRecord:
    index: int
    name: str
    rewrites: int
    time_s: float
    nodes_before: int
    nodes_after: int
    op_delta: dict[str, int]            # op → change in count
    notes: list[str] = field(default_factory=list)
    drift: Drift | None = None
    checked: Drift | None = None        # what verify checks: drift against eager, or after quantization
                                        # against the quantized graph (None: not checked)
    folder: str | None = None
    files: list[str] = field(default_factory=list)   # in `folder`, the first one is the graph text
    tables: list[dict] = field(default_factory=list) # per-item decisions (PassResult.table), drawn in the report

    def as_dict(self) -> dict:
        d = asdict(self)
        d["drift"] = self.drift.as_dict() if self.drift else None
        d["checked"] = self.checked.as_dict() if self.checked else None
        return d

    def over(self, tolerance: float) -> bool:
        """The checked drift exceeds `tolerance` (a red row in the report; an error under verify)."""
        return self.checked is not None and self.checked.rel > tolerance


@dataclass
class Step:
    """What an instrument sees after a step: its record, the graph after it and the text before and after."""
    record: StepRecord
    graph: Graph
    ctx: PassContext | None
    lossy: bool = False
    before_text: str = ""
    after_text: str = ""
    op_counts: dict[str, int] = field(default_factory=dict)
    outputs: object = None              # the backend step: what the built executable returned (None: not run)
    rounds: str | None = None           # the backend step: the lower precision it computes in, if any


class Instrument:
    """Called by the PassManager after each step; it may add to the record (drift, files) or raise."""

    def after_step(self, step: Step) -> None:
        pass


class PassManager:
    def __init__(self, passes: list[Pass], instruments: list[Instrument] = ()):
        self.passes = passes
        self.instruments = list(instruments)
        self.records: list[StepRecord] = []
        self.plans: dict[str, object] = {}  # pass name → the plan its result carried (PassResult.plan)

    def run(self, graph: Graph, ctx: PassContext) -> list[StepRecord]:
        text, counts = graph_text(graph), graph.op_counts()
        self._step(Step(self._record(0, "captured", graph, PassResult(), 0.0, counts), graph, ctx, False, text, text,
                        counts))
        for i, p in enumerate(self.passes, start=1):
            before_counts = graph.op_counts()
            ctx.progress.phase(p.name)
            t0, asked = time.perf_counter(), len(ctx.cost.ledger)
            with torch.no_grad():   # weights are Parameters: math on them would build (and keep) autograd graphs
                result = p.run(graph, ctx)
            verdicts = ctx.cost.summary(asked)   # what the pass had measured, and what came from the cache
            if verdicts:
                result.notes.append(verdicts)
            if result.changed:   # the chores every rewrite needs: drop what became dead, check, recompile
                graph.eliminate_dead_code()
                graph.tidy()
            elapsed = time.perf_counter() - t0
            if result.plan is not None:
                self.plans[p.name] = result.plan
            after_text = graph_text(graph)
            self._step(Step(self._record(i, p.name, graph, result, elapsed, before_counts), graph, ctx,
                            getattr(p, "lossy", False), text, after_text, graph.op_counts()))
            text = after_text
        return self.records

    def record_backend(self, name: str, outputs, build_s: float, graph: Graph, notes: list[str],
                       tables: list[dict] = (), rounds: str | None = None) -> StepRecord:
        """The last step: the built executable's outputs (None: it cannot run here) handed to the instruments,
        so a broken lowering is caught too; `rounds` names the lower precision the backend computes in."""
        n = sum(graph.op_counts().values())
        rec = StepRecord(len(self.records), name, 0, build_s, n, n, {}, list(notes), tables=list(tables))
        self._step(Step(rec, graph, None, outputs=outputs, rounds=rounds))
        return rec

    def _record(self, index, name, graph, result, elapsed, before_counts) -> StepRecord:
        counts = graph.op_counts()
        delta = {op: counts.get(op, 0) - before_counts.get(op, 0) for op in set(counts) | set(before_counts)}
        return StepRecord(index, name, result.rewrites, elapsed, sum(before_counts.values()), sum(counts.values()),
                          {k: v for k, v in sorted(delta.items()) if v}, result.notes, tables=result.tables)

    def _step(self, step: Step) -> None:
        self.records.append(step.record)
        for instrument in self.instruments:
            instrument.after_step(step)
