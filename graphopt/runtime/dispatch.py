"""The host dispatcher: an executable made of segment executables, for per-sample early exit.

Segment k runs on the samples still going; its exit head's max softmax probability is compared with
the exit's threshold; confident samples get the head's output and leave, the rest (their hidden state
and the model inputs later segments read, picked by row index) go on to segment k + 1. Outputs
are written back to each sample's own row, so the batch comes back in order. Each segment is a static
graph compiled by the chosen backend with a dynamic batch dim (DyCL's split: control flow on the host,
straight-line code in the compiler)."""
from __future__ import annotations

import numpy as np
import torch

from ..backends import Executable
from .exit_graph import EXIT, OUTPUT


class EarlyExitExecutable:
    def __init__(self, segments: list[Executable], routes: list[list[int]], thresholds: list[float],
                 labels: list[str], backend: str, graphs=None, examples=None):
        self.segments = segments          # len(thresholds) + 1 executables
        self.routes = routes              # per segment: which model inputs it reads (after the hidden state)
        self.thresholds = thresholds      # per exit: leave when max softmax probability ≥ threshold
        self.labels = labels              # where each exit is, for people
        self.backend = backend
        self.graphs, self.examples = graphs, examples   # the segments' IR and example inputs (for export)
        self._exits: np.ndarray | None = None    # the exit each sample of the last call took
        self.single = None                # (ONNX model, session, [(input name, flat index)]): the exits as `If`
                                          # nodes, for one sample per call
        self.single_notes: list[str] = []

    @property
    def last_exits(self) -> torch.Tensor | None:
        return None if self._exits is None else torch.from_numpy(self._exits.reshape(-1))

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.single is not None and inputs[0].shape[0] == 1:
            # one sample per call: every µs of host work shows (the If graph itself runs in ~40 µs)
            _, session, order = self.single
            out, self._exits = session.run([OUTPUT, EXIT], {name: _np(inputs[i]) for name, i in order})
            return [torch.from_numpy(out)]
        return self.run_segments(inputs)

    def run_segments(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The host dispatcher: segment by segment on the samples still going."""
        # the host's work is done in numpy: torch's ops on these small arrays, right after an ONNX Runtime
        # call, waited on its still-spinning threads (10 ms per segment measured on 2 cores, against 0.2 ms)
        n = inputs[0].shape[0]
        last = len(self.thresholds)
        exits = np.full(n, last, dtype=np.int64)
        rows = None                       # the samples still going (None: all of them)
        hidden, out = None, None
        for k, (segment, route) in enumerate(zip(self.segments, self.routes)):
            feeds = [] if hidden is None else [hidden]
            feeds += [inputs[i] if rows is None else _take(inputs[i], rows) for i in route]
            result = segment.run(feeds)
            if k == last:
                if rows is None:          # nobody left early: the last segment's outputs are the batch's
                    self._exits = exits
                    return list(result)
                out[rows] = _np(result[0])
                break
            hidden, logits = result
            z = _np(logits).astype(np.float32, copy=False)
            e = np.exp(z - z.max(-1, keepdims=True))
            done = e.max(-1) / e.sum(-1) >= self.thresholds[k]
            if not done.any():
                continue
            if out is None:
                out = np.empty((n, *z.shape[1:]), dtype=z.dtype)
            here = np.arange(n) if rows is None else rows
            out[here[done]] = z[done]
            exits[here[done]] = k
            if done.all():
                break
            keep = np.flatnonzero(~done)
            rows, hidden = here[keep], _take(hidden, keep)
        self._exits = exits
        return [torch.from_numpy(out)]

    def artifact(self) -> list:
        return [s.artifact() for s in self.segments]

    def describe(self) -> list[str]:
        lines = [f"early exit: {len(self.segments)} segments run by a host dispatcher ({self.backend}); exits: " +
                 ", ".join(f"after {label} at confidence ≥ {t:.4f}" for label, t in zip(self.labels, self.thresholds))]
        for k, s in enumerate(self.segments):
            lines += [f"segment {k}: {line}" for line in s.describe()[:1]]
        return lines + self.single_notes


def _np(t: torch.Tensor) -> np.ndarray:
    return t.numpy() if t.is_cpu and not t.requires_grad else t.detach().cpu().numpy()


def _take(t: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """t's `rows`, into a tensor torch allocates (aligned: TVM refuses numpy's 16-byte-aligned arrays) by numpy
    (no torch op: see run)."""
    out = torch.empty((len(rows), *t.shape[1:]), dtype=t.dtype)
    np.take(_np(t), rows, axis=0, out=out.numpy())
    return out
