"""Pipelines: the default one per target, declared by phase, and where added passes go.

A phase is a stage of lowering (PHASES in base.py): canonicalize (remove what hides patterns),
rewrite (high-level, exact rewrites), lossy (quantize, prune, skip: change the numbers by design),
epilogue (fusions that must see the final ops) and cleanup. A pass the user asks for through an
option (quantize=, layer_skip=, sparsity=) goes to the end of its phase, so a new family slots in
without anyone finding passes by name."""
from __future__ import annotations

from typing import Sequence

from ..errors import InputError
from ..targets import Target
from .base import PHASES, Pass, by_name, family

DEFAULT_PIPELINES: dict[str, dict[str, tuple[str, ...]]] = {
    "cpu": {"canonicalize": ("remove_noops", "fold_constants", "fold_batchnorm"),
            "rewrite": ("fft_conv", "fuse_norms", "fuse_attention", "shrink_inert"),   # heads: after attention fusion
            "epilogue": ("fuse_epilogues",),
            "cleanup": ("fold_constants", "dce")},
    "cuda": {"canonicalize": ("remove_noops", "fold_constants", "fold_batchnorm"), "rewrite": ("shrink_inert",),
             "cleanup": ("dce",)},
    "arm64": {"canonicalize": ("remove_noops", "fold_constants", "fold_batchnorm"), "rewrite": ("shrink_inert",),
              "cleanup": ("dce",)},
}


# passes whose decisions are measured, added to a target's default pipeline when boards of its kind can measure them
# (Target.rpc): arm64 leaves them out where nothing can be timed for it
MEASURED_ON_BOARDS: dict[str, dict[str, tuple[str, ...]]] = {
    "arm64": {"rewrite": ("fft_conv",), "epilogue": ("fuse_epilogues",)},
}


def default_pipeline(target: Target) -> list[str]:
    phases = DEFAULT_PIPELINES[target.name]   # a table keyed by target, not a branch
    extra = MEASURED_ON_BOARDS.get(target.name, {}) if target.rpc is not None else {}
    return [name for phase in PHASES for name in extra.get(phase, ()) + phases.get(phase, ())]


def resolve(passes: str | Sequence[str | Pass], target: Target) -> list[Pass]:
    """'default' (the target's pipeline) or a list of names / Pass objects → Pass objects."""
    if isinstance(passes, str):
        if passes != "default":
            raise InputError(f"passes={passes!r}: give 'default' or a list of pass names or Pass objects")
        passes = default_pipeline(target)
    if isinstance(passes, Pass) or not isinstance(passes, Sequence):
        raise InputError(f"passes= takes 'default' or a list of pass names / Pass objects, got {type(passes).__name__}")
    return [p if isinstance(p, Pass) else by_name(p) if isinstance(p, str) else _bad(p) for p in passes]


def place(pipeline: list[Pass], extra: Pass) -> list[Pass]:
    """`pipeline` with `extra` at the end of its phase: after every pass of an earlier or the same phase
    (the first pass of a later phase is where it goes; a user's pipeline keeps its own order), but before
    any pass of a family it `precedes` (pruning goes before quantization: float weights are pruned)."""
    rank = PHASES.index(extra.phase)
    at = next((i for i, p in enumerate(pipeline) if PHASES.index(p.phase) > rank
               or family(type(p)) in extra.precedes), len(pipeline))
    return pipeline[:at] + [extra] + pipeline[at:]


def with_options(pipeline: list[Pass], options) -> list[Pass]:
    """The pipeline with every option's passes placed by phase (graphopt.options.Option.passes); a lossless
    pass the pipeline already runs (Sparsity()'s shrink_inert is in every default pipeline) is not added twice."""
    for option in options:
        for extra in option.passes():
            if not extra.lossy and any(p.name == extra.name for p in pipeline):
                continue
            pipeline = place(pipeline, extra)
    return pipeline


def _bad(p) -> Pass:
    raise InputError(f"passes= entries are pass names or graphopt.passes.Pass objects, got {type(p).__name__} {p!r}")
