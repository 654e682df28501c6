"""Fusion: several ops become one kernel (attention, normalizations, conv/linear epilogues)."""
from . import fuse_attention, fuse_epilogues, fuse_norms  # noqa: F401
