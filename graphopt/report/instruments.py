"""The PassManager's instruments (as TVM's PassInstruments), run after each step in this order:

  MeasureDrift  the graph run on the example inputs, its outputs against eager (after a lossy pass, later
                steps are checked against that pass's outputs); the backend's outputs likewise
  WriteDumps    NN-<pass>/ with graph.txt, diff.txt, a picture with the nodes it created highlighted and
                stats.json, then report.json, report.html and report.md indexing every step so far
  Verify        a VerificationError at the first step whose checked drift exceeds the tolerance, naming it
                (after the dumps, so the report shows the failing step)
  CheckBuild    on by default (compile(check=False) turns it off): the built module's outputs on the example
                inputs against eager's — non-finite where eager is finite, or (all passes lossless) further than
                1e-2 of the output scale — is a VerificationError naming the backend and the output"""
from __future__ import annotations

import difflib
import json
from pathlib import Path

import torch

from ..errors import VerificationError
from ..ir import WHOLE_LIMIT, graph_dot, region_dot, write_picture
from ..numerics import drift, flat_tensors
from ..passes.manager import Instrument, Step
from .html import write_report


class MeasureDrift(Instrument):
    def __init__(self, reference: list[torch.Tensor]):
        self.reference = reference     # eager outputs on the example inputs, flattened
        self.baseline = reference      # what verify compares with: eager, or the last lossy pass's outputs

    @property
    def against(self) -> str:
        return "eager" if self.baseline is self.reference else "the quantized graph"

    def after_step(self, step: Step) -> None:
        rec = step.record
        if step.ctx is None:           # the backend step
            self._backend(step)
            return
        outputs = step.graph.run(*step.ctx.example_args, **step.ctx.example_kwargs)
        rec.drift = drift(outputs, self.reference)
        if step.lossy:   # quantization changes the numbers by design: later steps are verified against it
            self.baseline = [o.detach().clone() for o in flat_tensors(outputs)]
            rec.notes.append(f"lossy by design (drift {rec.drift.rel:.3g} is not verified); later steps "
                             "are verified against this step's outputs")
        else:
            rec.checked = rec.drift if self.baseline is self.reference else drift(outputs, self.baseline)

    def _backend(self, step: Step) -> None:
        rec = step.record
        if step.outputs is None:
            rec.notes.append("not verified: built for a target this machine cannot run")
            return
        rec.drift = drift(step.outputs, self.reference)
        if step.rounds is not None:
            rec.notes.append(f"not verified: the backend computes in {step.rounds}, lossy by design")
        elif self.baseline is self.reference:
            rec.checked = rec.drift
        else:   # ORT's integer kernels round accumulators where the IR rounds floats: ties flip a step
            rec.notes.append(f"not verified: after quantization the backend's integer kernels differ from the "
                             f"IR's float simulation by rounding (drift against it "
                             f"{drift(step.outputs, self.baseline).rel:.3g})")


class WriteDumps(Instrument):
    def __init__(self, dump_dir: Path, tolerance: float):
        self.dump_dir, self.tolerance, self.records = Path(dump_dir), tolerance, []

    def after_step(self, step: Step) -> None:
        rec = step.record
        self.records.append(rec)
        folder = self.dump_dir / f"{rec.index:02d}-{rec.name}"
        if step.ctx is not None:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "graph.txt").write_text(step.after_text)
            rec.files.append("graph.txt")
            if rec.index:
                diff = difflib.unified_diff(step.before_text.splitlines(True), step.after_text.splitlines(True),
                                            "before", "after", n=1)
                (folder / "diff.txt").write_text("".join(diff) or "(no change)\n")
                rec.files.append("diff.txt")
            rec.files += _pictures(step, folder)
            rec.folder = folder.name
            rec.files.append("stats.json")
            (folder / "stats.json").write_text(json.dumps({**rec.as_dict(), "op_counts": step.op_counts}, indent=1))
        elif rec.drift is not None:    # the backend step: its outputs against eager
            folder.mkdir(parents=True, exist_ok=True)
            rec.folder, rec.files = folder.name, ["stats.json"]
            (folder / "stats.json").write_text(json.dumps(rec.as_dict(), indent=1))
        write_report(self.dump_dir, self.records, self.tolerance)


class Verify(Instrument):
    def __init__(self, tolerance: float, drift: MeasureDrift, dump_dir: Path | None = None):
        self.tolerance, self.drift, self.dump_dir = tolerance, drift, dump_dir

    def after_step(self, step: Step) -> None:
        rec = step.record
        if rec.over(self.tolerance):
            where = f"; see {self.dump_dir / rec.folder}" if self.dump_dir is not None and rec.folder else ""
            raise VerificationError(
                f"step {rec.index} '{rec.name}' moved the outputs away from {self.drift.against}: relative error "
                f"{rec.checked.rel:.3g} (max abs {rec.checked.max_abs:.3g}, output {rec.checked.output}) exceeds "
                f"tolerance {self.tolerance:g}{where}")


class CheckBuild(Instrument):
    """No silently wrong build: a lowering defect (Falcon's logits were NaN on TVM, and compile returned) is caught
    for the price of one call of the built module, whose outputs the manager already has."""
    TOLERANCE = 1e-2   # of the output scale: far above any lossless backend's rounding (≤ 1e-5 measured)

    def __init__(self, reference: list[torch.Tensor]):
        self.reference, self.lossy = reference, False

    def after_step(self, step: Step) -> None:
        self.lossy |= step.lossy or step.rounds is not None
        if step.ctx is not None or step.outputs is None:   # a pass, or a build this machine cannot run
            return
        backend = step.record.name.removeprefix("backend-")
        outputs = flat_tensors(step.outputs)
        for i, (out, ref) in enumerate(zip(outputs, self.reference)):
            if out.is_floating_point() and out.shape == ref.shape:
                wrong = ~torch.isfinite(out) & torch.isfinite(ref)
                if wrong.any():
                    kind = "NaN" if torch.isnan(out[wrong]).any() else "infinity"
                    raise VerificationError(
                        f"the {backend} build returns {kind} in output {i} ({int(wrong.sum())} of {out.numel()} "
                        f"values) where eager PyTorch is finite on the example inputs: a defect in the {backend} "
                        f"lowering. Compile with another backend, or pass check=False to get the module anyway")
        d = drift(outputs, self.reference)
        if not self.lossy and not _random(step.graph) and not d.rel <= self.TOLERANCE:
            raise VerificationError(
                f"the {backend} build's output {d.output} is {d.rel:.3g} of the output scale away from eager PyTorch "
                f"(max abs {d.max_abs:.3g}) on the example inputs, and every pass was lossless: a defect in the "
                f"{backend} lowering. Compile with another backend, or pass check=False to get the module anyway")


def _random(graph) -> bool:
    """Whether the graph draws random numbers (a dropout left on in eval, SDPA with dropout_p > 0): eager itself
    differs from call to call there, so only non-finite outputs are judged."""
    sdpa = torch.ops.aten.scaled_dot_product_attention.default
    for n in graph.ops():
        t = n.target
        if isinstance(t, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in t.tags:
            p = n.args[4] if len(n.args) > 4 else n.kwargs.get("dropout_p", 0.0)
            if t is not sdpa or p:
                return True
    return False


def default_instruments(dump_dir: Path | None, verify: bool, tolerance: float,
                        reference: list[torch.Tensor] | None, check: bool = True) -> list[Instrument]:
    """compile()'s instruments: drift when dumps or verify are asked for, then the dumps, then verify, then the
    default check of the build (which needs only the eager `reference`)."""
    if reference is None:
        return []
    measure = MeasureDrift(reference) if dump_dir is not None or verify else None
    return ([measure] if measure else []) + ([WriteDumps(dump_dir, tolerance)] if dump_dir is not None else []) + \
        ([Verify(tolerance, measure, dump_dir)] if verify else []) + ([CheckBuild(reference)] if check else [])


def _pictures(step: Step, folder: Path) -> list[str]:
    """The whole graph, changed nodes highlighted; a large graph as the changed region before and after."""
    index, name, graph = step.record.index, step.record.name, step.graph
    before, after = _node_lines(step.before_text), _node_lines(step.after_text)
    touched = {n for n, _ in set(after.items()) - set(before.items())}
    if len(graph.fx.nodes) <= WHOLE_LIMIT:
        return [write_picture(graph_dot(graph, touched, f"after {name}" if index else name), folder).name]
    if index and not touched and step.before_text == step.after_text:
        return []
    files = [write_picture(region_dot(step.after_text, touched, f"after {name}" if index else name), folder).name]
    if index:
        changed = {n for n, _ in set(before.items()) - set(after.items())}
        files.append(write_picture(region_dot(step.before_text, changed, f"before {name}"), folder, "before").name)
    return files


def _node_lines(text: str) -> dict[str, str]:
    """node name → its line in the graph text: a node whose line changed was created or rewritten."""
    return {ln.split(" = ", 1)[0].strip().lstrip("%"): ln for ln in text.splitlines() if ln.startswith("  %")}
