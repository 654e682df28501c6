"""Layer skipping: residual blocks found on the IR (blocks.py), dropped within a quality budget (static.py,
the LayerSkip option), or exited after per sample with fitted heads and calibrated thresholds (early_exit.py,
the EarlyExit option), the graph then split into separately compiled segments (segments.py; run by
graphopt.runtime)."""
from . import blocks, early_exit, static  # noqa: F401  (registers the passes)
from .blocks import Block, exit_points, find_blocks
from .early_exit import ExitPlan, PlanExits
from .options import EarlyExit, LayerSkip
from .static import DropBlocks

__all__ = ["Block", "DropBlocks", "EarlyExit", "ExitPlan", "LayerSkip", "PlanExits", "exit_points", "find_blocks"]
