"""graphopt's own operators (torch.library custom ops in the `graphopt::` namespace)."""
from .registry import (GraphoptOp, contrib_op, graphopt_op, onnx_opset, onnx_translation_table, registered,
                       relax_convert_map)
from . import attention, epilogue, fft_conv, fft_conv2d, quant  # noqa: E402,F401  (registration)
from . import moe, sparse  # noqa: E402,F401  (registration)

__all__ = ["GraphoptOp", "contrib_op", "graphopt_op", "onnx_opset", "onnx_translation_table", "registered",
           "relax_convert_map"]
