"""compile()'s layer_skip= and early_exit= options: checked before any work, placed in the pipeline."""
from __future__ import annotations

from ...errors import InputError, UnsupportedError
from ...ir import Graph
from ..base import Pass
from ..pipelines import place
from .blocks import LOOKED_FOR, exit_points, find_blocks
from .early_exit import EarlyExit, check_exitable
from .static import LayerSkip


def with_skipping(pipeline: list[Pass], layer_skip, early_exit, calibration: list) -> list[Pass]:
    """The pipeline with the skipping passes at the end of the lossy phase (static dropping first), or an
    InputError for options of the wrong type or missing calibration data."""
    for arg, value, cls in (("layer_skip", layer_skip, LayerSkip), ("early_exit", early_exit, EarlyExit)):
        if value is None:
            continue
        if not isinstance(value, cls):
            raise InputError(f"{arg}= takes a graphopt.{cls.__name__}(budget=...), got {type(value).__name__}")
        if not calibration:
            raise InputError(f"{arg}= needs calibration data: pass calibration=[batch, ...], a few representative "
                             "batches shaped like example_inputs (the budget is spent and checked on them)")
        if value in pipeline:
            raise InputError(f"{arg}: this {cls.__name__} object is already in passes=; give it once")
        pipeline = place(pipeline, value)
    if early_exit is not None and len(calibration) < 2:
        raise InputError("early_exit= needs at least 2 calibration batches: heads are fitted on the first part and "
                         "thresholds set on the held-out rest")
    return pipeline


def check_skippable(graph: Graph, layer_skip, early_exit) -> None:
    """Right after capture, before any pass: UnsupportedError for a model skipping cannot apply to."""
    if layer_skip is None and early_exit is None:
        return
    blocks = find_blocks(graph)
    if not blocks:
        which = "layer_skip" if layer_skip is not None else "early_exit"
        raise UnsupportedError(f"{which}: the model has no skippable block; looked for {LOOKED_FOR}")
    if early_exit is not None:
        check_exitable(graph, blocks)
        if not exit_points(graph, blocks):
            raise UnsupportedError("early_exit: no cut between blocks separates the graph (values other than the "
                                   "block output cross every one), so it cannot be split into segments")
