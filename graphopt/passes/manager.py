"""PassManager: runs a pipeline, does the chores after each pass (dead code, tidy), times and
measures each pass, and writes the dumps.

With `dump_dir`, each pass gets `NN-<pass>/` holding graph.txt, diff.txt, a picture with the
nodes it created highlighted, and stats.json (op counts, time, rewrites, notes, drift against
eager). The run ends with report.html and report.md indexing every step."""
from __future__ import annotations

import difflib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import VerificationError
from ..ir import WHOLE_LIMIT, Graph, graph_dot, graph_text, region_dot, write_picture
from .base import Pass, PassContext, PassResult
from .drift import Drift, drift, flat_tensors
from .report import write_report


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


class PassManager:
    def __init__(self, passes: list[Pass], dump_dir: str | Path | None = None, verify: bool = False,
                 tolerance: float = 1e-4, reference: list[torch.Tensor] | None = None):
        self.passes = passes
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.verify = verify
        self.tolerance = tolerance
        self.reference = reference      # eager outputs on the example inputs, flattened
        self.baseline = reference       # what verify compares with: eager, or the last lossy pass's outputs
        self.records: list[StepRecord] = []
        self.plans: dict[str, object] = {}  # pass name → the plan its result carried (PassResult.plan)

    @property
    def measuring(self) -> bool:
        """Drift is measured when compile() computed the eager reference (for dumps or verify)."""
        return self.reference is not None

    def run(self, graph: Graph, ctx: PassContext) -> list[StepRecord]:
        text = graph_text(graph)
        self._record(0, "captured", graph, ctx, PassResult(), 0.0, text, text, set(), graph.op_counts())
        for i, p in enumerate(self.passes, start=1):
            before_counts = graph.op_counts()
            t0 = time.perf_counter()
            with torch.no_grad():   # weights are Parameters: math on them would build (and keep) autograd graphs
                result = p.run(graph, ctx)
            if result.plan is not None:
                self.plans[p.name] = result.plan
            if result.changed:   # the chores every rewrite needs: drop what became dead, check, recompile
                graph.eliminate_dead_code()
                graph.tidy()
            elapsed = time.perf_counter() - t0
            after_text = graph_text(graph)
            touched = set(_node_lines(after_text).items()) - set(_node_lines(text).items())
            self._record(i, p.name, graph, ctx, result, elapsed, text, after_text, {n for n, _ in touched},
                         before_counts, p.lossy)
            text = after_text
        return self.records

    def record_backend(self, name: str, outputs, build_s: float, graph: Graph, notes: list[str],
                       tables: list[dict] = (), rounds: str | None = None) -> StepRecord:
        """The last step: the backend's outputs against eager, so a broken lowering is caught too; `rounds` names
        the lower precision the backend computes in, whose drift is reported, not checked; no `outputs`: the build
        cannot run on this machine."""
        n = sum(graph.op_counts().values())
        rec = StepRecord(len(self.records), name, 0, build_s, n, n, {}, notes, tables=list(tables))
        check = None
        if self.measuring and outputs is None:
            rec.notes.append("not verified: built for a target this machine cannot run")
        elif self.measuring:
            rec.drift = drift(outputs, self.reference)
            if rounds is not None:
                rec.notes.append(f"not verified: the backend computes in {rounds}, lossy by design")
            elif self.baseline is self.reference:
                check = rec.drift
            else:   # ORT's integer kernels round accumulators where the IR rounds floats: ties flip a step
                rec.notes.append(f"not verified: after quantization the backend's integer kernels differ from the "
                                 f"IR's float simulation by rounding (drift against it "
                                 f"{drift(outputs, self.baseline).rel:.3g})")
        rec.checked = check
        self._finish(rec, None)
        return rec

    # --- internals ---------------------------------------------------------------------------
    def _record(self, index, name, graph, ctx, result, elapsed, before_text, after_text, touched, before_counts,
                lossy=False):
        counts = graph.op_counts()
        delta = {op: counts.get(op, 0) - before_counts.get(op, 0) for op in set(counts) | set(before_counts)}
        rec = StepRecord(index, name, result.rewrites, elapsed, sum(before_counts.values()), sum(counts.values()),
                         {k: v for k, v in sorted(delta.items()) if v}, result.notes, tables=result.tables)
        check = None
        if self.measuring:
            outputs = graph.run(*ctx.example_args, **ctx.example_kwargs)
            rec.drift = drift(outputs, self.reference)
            if lossy:   # quantization changes the numbers by design: later steps are verified against it
                self.baseline = [o.detach().clone() for o in flat_tensors(outputs)]
                rec.notes.append(f"lossy by design (drift {rec.drift.rel:.3g} is not verified); later steps "
                                 "are verified against this step's outputs")
            else:
                check = rec.drift if self.baseline is self.reference else drift(outputs, self.baseline)
            rec.checked = check
        folder = None
        if self.dump_dir is not None:
            folder = self.dump_dir / f"{index:02d}-{name}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "graph.txt").write_text(after_text)
            rec.files.append("graph.txt")
            if index:
                diff = difflib.unified_diff(before_text.splitlines(True), after_text.splitlines(True),
                                            "before", "after", n=1)
                (folder / "diff.txt").write_text("".join(diff) or "(no change)\n")
                rec.files.append("diff.txt")
            rec.files += self._pictures(graph, folder, index, name, before_text, after_text, touched)
            rec.folder = folder.name
            rec.files.append("stats.json")
            (folder / "stats.json").write_text(json.dumps({**rec.as_dict(), "op_counts": counts}, indent=1))
        self._finish(rec, folder)

    @staticmethod
    def _pictures(graph, folder, index, name, before_text, after_text, touched) -> list[str]:
        """The whole graph, changed nodes highlighted; a large graph as the changed region before and after."""
        if len(graph.fx.nodes) <= WHOLE_LIMIT:
            return [write_picture(graph_dot(graph, touched, f"after {name}" if index else name), folder).name]
        if index and not touched and before_text == after_text:
            return []
        files = [write_picture(region_dot(after_text, touched, f"after {name}" if index else name), folder).name]
        if index:
            changed = {n for n, _ in set(_node_lines(before_text).items()) - set(_node_lines(after_text).items())}
            files.append(write_picture(region_dot(before_text, changed, f"before {name}"), folder, "before").name)
        return files

    def _finish(self, rec: StepRecord, folder: Path | None) -> None:
        self.records.append(rec)
        if self.dump_dir is not None:
            if folder is None and rec.drift is not None:
                folder = self.dump_dir / f"{rec.index:02d}-{rec.name}"
                folder.mkdir(parents=True, exist_ok=True)
                rec.folder, rec.files = folder.name, ["stats.json"]
                (folder / "stats.json").write_text(json.dumps(rec.as_dict(), indent=1))
            write_report(self.dump_dir, self.records, self.tolerance)
        if self.verify and rec.over(self.tolerance):
            where = f"; see {self.dump_dir / rec.folder}" if self.dump_dir is not None and rec.folder else ""
            against = "eager" if self.baseline is self.reference else "the quantized graph"
            raise VerificationError(
                f"step {rec.index} '{rec.name}' moved the outputs away from {against}: relative error "
                f"{rec.checked.rel:.3g} (max abs {rec.checked.max_abs:.3g}, output {rec.checked.output}) exceeds "
                f"tolerance {self.tolerance:g}{where}")


def _node_lines(text: str) -> dict[str, str]:
    """node name → its line in the graph text: a node whose line changed was created or rewritten."""
    return {ln.split(" = ", 1)[0].strip().lstrip("%"): ln for ln in text.splitlines() if ln.startswith("  %")}
