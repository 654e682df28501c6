"""Cleanup: remove what hides patterns or does nothing (no-ops, constant subgraphs, BatchNorm, dead code)."""
from . import dce, fold_batchnorm, fold_constants, remove_noops  # noqa: F401
