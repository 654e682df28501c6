"""graphopt's own operators (torch.library custom ops in the `graphopt::` namespace)."""
from .registry import GraphoptOp, graphopt_op, onnx_translation_table, registered

__all__ = ["GraphoptOp", "graphopt_op", "onnx_translation_table", "registered"]
