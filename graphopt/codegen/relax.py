"""IR → TVM Relax through TVM's own torch frontend, with graphopt ops converted by their Relax part."""
from __future__ import annotations

from typing import Any

import torch

from ..capture import dynamic_export
from ..errors import UnsupportedError
from ..ir import Graph
from ..ops import relax_convert_map
from ..quiet import quiet


def to_relax(graph: Graph, args: tuple, kwargs: dict | None = None, dynamic_shapes: Any = None,
             target: str = "cpu"):
    """The optimized graph as a Relax IRModule (weights bound as constants), for `target` (a graphopt
    target's name: graphopt ops may lower to kernels written for it)."""
    from tvm.relax.frontend.torch import from_exported_program
    if isinstance(dynamic_shapes, (tuple, list)):   # exported at batch 2 where the batch is dynamic and 1:
        # from a batch-1 example TVM built a broadcast it then rejected (topi broadcast_to, a Whisper encoder)
        args = tuple(torch.cat([a, a]) if isinstance(spec, dict) and 0 in spec and a.shape[0] == 1 else a
                     for a, spec in zip(args, dynamic_shapes))
    with quiet(stdout=True), dynamic_export(dynamic_shapes):
        ep = torch.export.export(graph.module, args, kwargs or None, dynamic_shapes=dynamic_shapes, strict=False)
    values = {**dict(ep.named_parameters()), **dict(ep.named_buffers()), **ep.constants}
    constants = {s.arg.name: values[s.target] for s in ep.graph_signature.input_specs if s.target in values}
    try:
        return from_exported_program(ep, custom_convert_map=relax_convert_map(target, constants.get))
    except (AssertionError, KeyError, ValueError, NotImplementedError) as e:
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise UnsupportedError(f"TVM Relax import failed: {first[:300]}. Remove the pass that introduced the "
                               "op, or compile with backend='ort'.") from e
