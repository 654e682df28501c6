"""compile()'s layer_skip= and early_exit= options.

    LayerSkip(budget=0.01, metric="cosine", replace=True)
                                              drop the residual blocks that save most time within the budget, or
                                              replace them by least-squares maps where that costs less quality per ms
    EarlyExit(budget=0.01, metric="top1")     let each sample leave after a block when an exit head is confident:
                                              the graph compiled as segments run by a host dispatcher
Both spend their budget on the calibration batches (mean 1 − cosine to the full model, top-1
disagreement, or for LayerSkip the user's metric callable; graphopt/quality.py)."""
from __future__ import annotations

from ...errors import InputError, UnsupportedError
from ...ir import Graph
from ...options import Option
from ... import quality
from .blocks import LOOKED_FOR, exit_points, find_blocks
from .early_exit import PlanExits, check_exitable
from .static import DropBlocks


class _Skipping(Option):
    takes_callables = True    # a per-sample metric only (early exit scores each sample): names

    def __init__(self, budget: float = 0.01, metric: quality.Metric = "cosine"):
        quality.check(type(self).__name__, budget, metric, self.takes_callables)
        self.budget, self.metric = float(budget), metric

    def __repr__(self) -> str:
        return f"{type(self).__name__}(budget={self.budget:g}, metric={quality.name(self.metric)!r})"

    @property
    def needs_calibration(self) -> bool:
        return True

    def check_graph(self, graph: Graph) -> None:
        """Right after capture, before any pass: UnsupportedError for a model skipping cannot apply to."""
        self._blocks(graph)

    def _blocks(self, graph: Graph) -> list:
        blocks = find_blocks(graph)
        if not blocks:
            raise UnsupportedError(f"{self.keyword}: the model has no skippable block; looked for {LOOKED_FOR}")
        return blocks


class LayerSkip(_Skipping):
    keyword = "layer_skip"

    def __init__(self, budget: float = 0.01, metric: quality.Metric = "cosine", replace: bool = True):
        super().__init__(budget, metric)
        if not isinstance(replace, bool):
            raise InputError(f"LayerSkip(replace={replace!r}): give True (a block may be replaced by a map fitted on "
                             "the calibration data, where that costs less quality per ms) or False (removal only)")
        self.replace = replace

    def __repr__(self) -> str:
        return f"LayerSkip(budget={self.budget:g}, metric={quality.name(self.metric)!r}, replace={self.replace})"

    def passes(self) -> list:
        return [DropBlocks(self.budget, self.metric, self.replace)]


class EarlyExit(_Skipping):
    keyword = "early_exit"
    takes_callables = False
    why_batches = ": heads are fitted on the first part and thresholds set on the held-out rest"

    @property
    def min_batches(self) -> int:
        return 2

    @property
    def dynamic_batch(self) -> bool:   # segments run on the samples still going
        return True

    def check_graph(self, graph: Graph) -> None:
        blocks = self._blocks(graph)
        check_exitable(graph, blocks)
        if not exit_points(graph, blocks):
            raise UnsupportedError("early_exit: no cut between blocks separates the graph (values other than the "
                                   "block output cross every one), so it cannot be split into segments")

    def passes(self) -> list:
        return [PlanExits(self.budget, self.metric)]
