"""IR → ONNX through torch.onnx's dynamo exporter, with graphopt ops translated by their own
onnxscript functions; the result passes onnx.checker before anyone runs it."""
from __future__ import annotations

import re
from typing import Any, NamedTuple

import onnx
import torch

from ..capture import dynamic_export
from ..errors import UnsupportedError
from .external import WeightedModel, check_one_proto, checked_source, graph_bytes, ir_bytes, optimize, \
    split_weights
from ..ir import Graph
from ..ops import onnx_opset, onnx_translation_table
from ..quiet import quiet
from .lifted import lifted_program
from .registry import already_decomposed, reused


class Lowered(NamedTuple):
    """An ONNX model and what ORT's session takes for it (its checked bytes, or those and its external weights)."""
    model: onnx.ModelProto
    source: bytes | WeightedModel


def to_onnx(graph: Graph, args: tuple, kwargs: dict | None = None, dynamic_shapes: Any = None,
            weights: dict | None = None) -> Lowered:
    """The ONNX model of `graph`, checked. Where the caller gives a `weights` dict, its initializers of ≥
    external.TENSOR_BYTES are external data whose arrays (views of the graph's own tensors) go into it, for ONNX
    Runtime to copy in once (see codegen/external.py); without one, the model is one self-contained proto, and a
    model past protobuf's 2 GB raises a GraphoptError saying so."""
    if weights is None:
        check_one_proto(graph_bytes(graph))
    lifted = lifted_program(graph) if dynamic_shapes is None else None    # else torch.onnx traces the module
    exported = graph.module if lifted is None else lifted
    try:
        with quiet(stdout=True), dynamic_export(dynamic_shapes), graph.flat_outputs(), reused(), \
                already_decomposed():
            program = torch.onnx.export(
                exported, args, kwargs=kwargs or None, dynamo=True, dynamic_shapes=dynamic_shapes,
                custom_translation_table=onnx_translation_table(), optimize=False, verbose=False,
                opset_version=onnx_opset({n.target for n in graph.module.graph.nodes}))
            optimize(program.model)
    except Exception as e:  # the exporter raises its own hierarchy; all mean "cannot lower"
        raise export_error(e, graph) from e
    if weights is None:
        check_one_proto(ir_bytes(program.model))
    else:
        split_weights(program.model, weights)
    model = fold_int8_pads(program.model_proto)
    del program                     # its tensors: the weights dict keeps the ones still needed
    return Lowered(model, checked_source(model, weights))


def fold_int8_pads(model: onnx.ModelProto) -> onnx.ModelProto:
    """Pad(q, pads, zero point) → DequantizeLinear → Conv becomes DequantizeLinear(q) → Conv with the pads in its own
    (possibly asymmetric) `pads`: padding the int8 values with the zero point is padding the floats with 0, which
    Conv does itself. graphopt pads on the int8 values (a TF-"same" model's asymmetric pads cannot be in aten's
    symmetric conv padding), and ORT's PadFusion does not look through the DequantizeLinear: MobileNetV2 ran 17
    Pad kernels (0.45 of 7.8 ms) that ORT's own quantization tool, padding floats before it quantizes, does not."""
    g = model.graph
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    values = {i.name: i for i in g.initializer}
    values.update({n.output[0]: n.attribute[0].t for n in g.node if n.op_type == "Constant" and n.attribute
                   and n.attribute[0].name == "value"})
    dropped = set()
    for pad in [n for n in g.node if n.op_type == "Pad" and len(n.input) >= 3]:
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        after = consumers.get(pad.output[0], [])
        if mode != b"constant" or len(after) != 1 or after[0].op_type != "DequantizeLinear" or \
                pad.input[1] not in values or pad.input[2] != after[0].input[2] or (len(pad.input) > 3 and pad.input[3]):
            continue
        dq = after[0]
        convs = consumers.get(dq.output[0], [])
        if not convs or any(c.op_type != "Conv" or c.input[0] != dq.output[0] or
                            any(a.name == "auto_pad" and a.s not in (b"", b"NOTSET") for a in c.attribute) for c in convs):
            continue
        pads = onnx.numpy_helper.to_array(values[pad.input[1]]).tolist()
        rank = len(pads) // 2
        if any(pads[i] or pads[rank + i] for i in (0, 1)) or any(p < 0 for p in pads):
            continue                                              # pads batch or channels, or crops
        spatial = pads[2:rank] + pads[rank + 2:]
        for conv in convs:
            old = next((a for a in conv.attribute if a.name == "pads"), None)
            total = [a + b for a, b in zip(list(old.ints) if old else [0] * len(spatial), spatial)]
            if old is not None:
                conv.attribute.remove(old)
            conv.attribute.append(onnx.helper.make_attribute("pads", total))
        dq.input[0] = pad.input[0]
        dropped.add(pad.output[0])
        g.node.remove(pad)
    if dropped:        # the DequantizeLinear outputs lost their padded shapes: let ONNX infer them again
        stale = [v for v in g.value_info if v.name in dropped or any(v.name == d.output[0] for d in g.node
                                                                    if d.op_type == "DequantizeLinear")]
        for v in stale:
            g.value_info.remove(v)
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
