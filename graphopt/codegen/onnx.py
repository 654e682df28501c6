"""IR → ONNX through torch.onnx's dynamo exporter, with graphopt ops translated by their own
onnxscript functions; the result passes onnx.checker before anyone runs it."""
from __future__ import annotations

import re
from typing import Any

import onnx
import torch

from ..capture import dynamic_export
from ..errors import UnsupportedError
from ..ir import Graph
from ..ops import onnx_opset, onnx_translation_table
from ..quiet import quiet


def to_onnx(graph: Graph, args: tuple, kwargs: dict | None = None, dynamic_shapes: Any = None) -> onnx.ModelProto:
    try:
        with quiet(stdout=True), dynamic_export(dynamic_shapes):
            program = torch.onnx.export(
                graph.module, args, kwargs=kwargs or None, dynamo=True, dynamic_shapes=dynamic_shapes,
                custom_translation_table=onnx_translation_table(), optimize=True, verbose=False,
                opset_version=onnx_opset({n.target for n in graph.module.graph.nodes}))
    except Exception as e:  # the exporter raises its own hierarchy; all mean "cannot lower"
        raise export_error(e, graph) from e
    model = program.model_proto
    onnx.checker.check_model(model)
    return model


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def export_error(e: Exception, graph: Graph) -> UnsupportedError:
    """One line from torch.onnx's failure: the node and op it stopped at, the innermost reason, and what to do,
    which depends on where the op came from (the model, or a graphopt pass). The exporter's own text has
    colour codes and generic next steps; its cause chain has the specifics."""
    chain, cause = [], e
    while cause is not None and len(chain) < 8:
        chain.append(ANSI.sub("", str(cause)))
        cause = cause.__cause__
    found = next((m.group(1) for text in chain for m in [re.search(r"translating node %(\w+)", text)] if m), None)
    node = next((n for n in graph.fx.nodes if n.name == found), None)
    reason = next((ln.strip() for ln in chain[-1].splitlines() if ln.strip()), type(e).__name__)[:300]
    if node is None:
        return UnsupportedError(f"ONNX code generation failed: {reason}. Compile with backend='tvm', or report "
                                "the model to graphopt.")
    op = str(node.target)
    if op.startswith("graphopt."):
        advice = (f"{op} is graphopt's own op, written by one of its passes (the report's notes say which): compile "
                  "with that pass left out of passes=, or with backend='tvm'")
    else:
        advice = f"{op} comes from the model and torch.onnx has no ONNX lowering for it: compile with " \
                 "backend='tvm', or replace that op in the model"
    return UnsupportedError(f"ONNX code generation failed at node %{node.name} ({op}): {reason.rstrip('.')}. {advice}.")
