"""Sparsity lowering: sparsity found in the weights and removed (shrink.ShrinkInert), dependency groups of
channels / heads / FFN units (groups.py) shrunk physically, post-training pruning with reconstruction under
a ratio or an accuracy budget (prune.Sparsify), block-sparse linears lowered to graphopt::bsr_linear where the
cost model measures them faster (ops/sparse.py). Options: options.Sparsity."""
from . import prune, shrink  # noqa: F401  (registers the passes)
from .detect import LayerSparsity, inert_units, layer_sparsity
from .groups import Group, find_groups
from .options import Sparsity

__all__ = ["Group", "LayerSparsity", "Sparsity", "find_groups", "inert_units", "layer_sparsity"]
