"""IR → TVM Relax through TVM's own torch frontend, with graphopt ops converted by their Relax part."""
from __future__ import annotations

from typing import Any

import torch

from ..errors import UnsupportedError
from ..ir import Graph
from ..ops import relax_convert_map
from ..quiet import quiet


def to_relax(graph: Graph, args: tuple, kwargs: dict | None = None, dynamic_shapes: Any = None):
    """The optimized graph as a Relax IRModule (weights bound as constants)."""
    from tvm.relax.frontend.torch import from_exported_program
    with quiet(stdout=True):
        ep = torch.export.export(graph.module, args, kwargs or None, dynamic_shapes=dynamic_shapes, strict=False)
    try:
        return from_exported_program(ep, custom_convert_map=relax_convert_map())
    except (AssertionError, KeyError, ValueError, NotImplementedError) as e:
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise UnsupportedError(f"TVM Relax import failed: {first[:300]}. Remove the pass that introduced the "
                               "op, or compile with backend='ort'.") from e
