"""Layer skipping: residual blocks found on the IR (blocks.py), dropped within a quality budget (static.py,
LayerSkip), or exited after per sample with fitted heads and calibrated thresholds (early_exit.py, EarlyExit),
the graph then split into separately compiled segments (segments.py; run by graphopt.runtime)."""
from . import blocks, early_exit, static  # noqa: F401  (registers the passes)
from .blocks import Block, exit_points, find_blocks
from .early_exit import EarlyExit, ExitPlan
from .options import check_skippable, with_skipping
from .static import LayerSkip

__all__ = ["Block", "EarlyExit", "ExitPlan", "LayerSkip", "check_skippable", "exit_points", "find_blocks", "with_skipping"]
