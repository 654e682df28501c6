"""IR → ONNX through torch.onnx's dynamo exporter, with graphopt ops translated by their own
onnxscript functions; the result passes onnx.checker before anyone runs it."""
from __future__ import annotations

import re
from typing import Any

import onnx
import torch

from ..errors import UnsupportedError
from ..ir import Graph
from ..ops import onnx_opset, onnx_translation_table
from ..quiet import quiet


def to_onnx(graph: Graph, args: tuple, kwargs: dict | None = None, dynamic_shapes: Any = None) -> onnx.ModelProto:
    try:
        with quiet(stdout=True):
            program = torch.onnx.export(
                graph.module, args, kwargs=kwargs or None, dynamo=True, dynamic_shapes=dynamic_shapes,
                custom_translation_table=onnx_translation_table(), optimize=True, verbose=False,
                opset_version=onnx_opset({n.target for n in graph.module.graph.nodes}))
    except Exception as e:  # the exporter raises its own hierarchy; all mean "cannot lower"
        ops = sorted(set(re.findall(r"(?:aten|graphopt|prims)[.:]+\w+(?:\.\w+)?", str(e))))
        which = f" (op{'s' if len(ops) > 1 else ''}: {', '.join(ops[:5])})" if ops else ""
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise UnsupportedError(f"ONNX code generation failed{which}: {first[:300]}. Remove the pass that "
                               "introduced the op, or compile with backend='tvm'.") from e
    model = program.model_proto
    onnx.checker.check_model(model)
    return model
