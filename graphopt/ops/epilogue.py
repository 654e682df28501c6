"""graphopt::conv_act and graphopt::linear_act — a conv/linear with its bias, residual add and
activation applied in the same kernel, so the output makes one trip through memory.

Padding is ONNX-style [top, left, bottom, right], so a zero pad before the conv (TF "same"
padding) folds in even when asymmetric. ONNX Runtime lowering: conv_act → com.microsoft.FusedConv (activation and residual `Z` in the
kernel) where FusedConv has the activation, else Conv + activation ops (`unfused_onnx` rewrites an exported model's
FusedConvs into those ops: the other form of the conv-epilogue decision); linear_act → MatMul +
BiasGelu / FastGelu (gelu erf / tanh) or MatMul + Add + activation."""
from __future__ import annotations

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnxscript import opset18 as op

from .registry import MICROSOFT, contrib_op, graphopt_op

# name → (reference, ORT FusedConv activation, its activation_params)
ACTIVATIONS = {
    "relu": (F.relu, "Relu", []),
    "relu6": (F.relu6, "Clip", [0.0, 6.0]),
    "sigmoid": (torch.sigmoid, "Sigmoid", []),
    "tanh": (torch.tanh, "Tanh", []),
    "hardsigmoid": (F.hardsigmoid, "HardSigmoid", [1.0 / 6, 0.5]),
    "silu": (F.silu, None, []),
    "hardswish": (F.hardswish, None, []),
    "gelu": (F.gelu, None, []),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), None, []),
}


def _onnx_act(y, act: str):
    if act == "relu":
        return op.Relu(y)
    if act == "relu6":
        return op.Clip(y, op.CastLike(0.0, y), op.CastLike(6.0, y))
    if act == "sigmoid":
        return op.Sigmoid(y)
    if act == "tanh":
        return op.Tanh(y)
    if act == "hardsigmoid":
        return op.HardSigmoid(y, alpha=1.0 / 6, beta=0.5)
    if act == "silu":
        return op.Mul(y, op.Sigmoid(y))
    if act == "hardswish":
        return op.HardSwish(y)
    if act == "gelu":
        return contrib_op("Gelu")(y)
    if act == "gelu_tanh":
        return contrib_op("FastGelu")(y)
    raise ValueError(f"graphopt has no ONNX lowering for activation {act!r}")


def _relax_act(bb, y, act: str):
    from tvm import relax
    op, nn = relax.op, relax.op.nn
    dtype = y.ty.dtype

    def hard_sigmoid(v):  # clip(v + 3, 0, 6) / 6, as TVM's own torch frontend writes it
        return op.divide(op.clip(op.add(v, relax.const(3, dtype)), 0, 6), relax.const(6, dtype))
    fns = {"relu": nn.relu, "sigmoid": op.sigmoid, "tanh": op.tanh, "silu": nn.silu, "gelu": nn.gelu,
           "gelu_tanh": nn.gelu_tanh, "relu6": lambda v: op.clip(v, 0, 6), "hardsigmoid": hard_sigmoid,
           "hardswish": lambda v: op.multiply(v, hard_sigmoid(v))}
    return bb.emit(fns[act](y))


# --- conv_act ------------------------------------------------------------------------------------
def _conv(x, w, b, stride, padding, dilation, groups):
    """conv2d with ONNX-style padding [top, left, bottom, right] (asymmetric allowed)."""
    top, left, bottom, right = padding
    if (top, left) != (bottom, right):
        return F.conv2d(F.pad(x, (left, right, top, bottom)), w, b, stride, 0, dilation, groups)
    return F.conv2d(x, w, b, stride, (top, left), dilation, groups)


def _conv_fake(x, w, b, z, stride, padding, dilation, groups, act):
    return _conv(x, w, b, stride, padding, dilation, groups)


def _conv_onnx(x, w, b, z, stride: list[int], padding: list[int], dilation: list[int], groups: int, act: str):
    fused_act, params = ACTIVATIONS[act][1:]
    pads = list(padding)
    if fused_act is not None:
        extra = {"activation_params": params} if params else {}   # an empty list would be typed INTS
        return contrib_op("FusedConv")(x, w, b, z, activation=fused_act, strides=stride, pads=pads,
                                        dilations=dilation, group=groups, **extra)
    y = op.Conv(x, w, b, strides=stride, pads=pads, dilations=dilation, group=groups)
    return _onnx_act(y if z is None else op.Add(y, z), act)


def unfused_onnx(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """conv_act's other ONNX Runtime lowering, as a rewrite of an exported model: each FusedConv written as the ops it
    fuses, Conv [→ Add(Z)] → activation, for ORT to fuse its own way (its own FusedConv, or its NCHWc convs with the
    activation inside); None where `model` has no FusedConv. It is what the same graph without conv_act lowers to,
    a zero pad folded into conv_act kept in the Conv's own pads: both forms of the conv-epilogue decision from one
    export."""
    if not any(n.op_type == "FusedConv" and n.domain == MICROSOFT for n in model.graph.node):
        return None
    out = onnx.ModelProto()
    out.CopyFrom(model)                  # its weights are external references (the caller's arrays), not bytes
    g, nodes = out.graph, []
    for n in g.node:
        if n.op_type != "FusedConv" or n.domain != MICROSOFT:
            nodes.append(n)
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        act = attrs.pop("activation").decode()
        params = list(attrs.pop("activation_params", []))
        x, w, b, z = (list(n.input) + ["", "", ""])[:4]
        y, name = n.output[0], n.name or n.output[0]
        conv = f"{name}_conv"
        nodes.append(onnx.helper.make_node("Conv", [x, w] + ([b] if b else []), [conv], name=conv, **attrs))
        if z:
            nodes.append(onnx.helper.make_node("Add", [conv, z], [f"{name}_z"], name=f"{name}_z"))
            conv = f"{name}_z"
        if act == "Clip":
            bounds = [f"{name}_min", f"{name}_max"]
            g.initializer.extend(onnx.numpy_helper.from_array(np.array(v, np.float32), k)
                                 for k, v in zip(bounds, params))
            nodes.append(onnx.helper.make_node("Clip", [conv] + bounds, [y], name=name))
        else:
            extra = {"HardSigmoid": dict(zip(("alpha", "beta"), params)), "LeakyRelu": dict(zip(("alpha",), params))}
            nodes.append(onnx.helper.make_node(act, [conv], [y], name=name, **extra.get(act, {})))
    del g.node[:]
    g.node.extend(nodes)
    return out


def _conv_relax(node, importer):
    from tvm import relax
    x, w, b, z = (importer.env[a] if a is not None else None for a in node.args[:4])
    stride, padding, dilation, groups, act = node.args[4:9]
    bb = importer.block_builder
    y = bb.emit(relax.op.nn.conv2d(x, w, strides=stride, padding=padding, dilation=dilation, groups=groups))
    # relax padding is (top, left, bottom, right), the same order as graphopt's
    if b is not None:
        y = bb.emit(relax.op.add(y, relax.op.reshape(b, (1, -1, 1, 1))))
    if z is not None:
        y = bb.emit(relax.op.add(y, z))
    return _relax_act(bb, y, act)


@graphopt_op("conv_act", fake=_conv_fake, onnx=_conv_onnx, relax=_conv_relax)
def conv_act(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, z: torch.Tensor | None, stride: list[int],
             padding: list[int], dilation: list[int], groups: int, act: str) -> torch.Tensor:
    y = _conv(x, w, b, stride, padding, dilation, groups)
    return ACTIVATIONS[act][0](y if z is None else y + z)


# --- linear_act ----------------------------------------------------------------------------------
def _linear_fake(x, w, b, act):
    return x.new_empty(*x.shape[:-1], w.shape[0])


def _linear_onnx(x, w, b, act: str):
    y = op.MatMul(x, op.Transpose(w, perm=[1, 0]))
    if b is not None and act in ("gelu", "gelu_tanh"):
        return contrib_op("BiasGelu" if act == "gelu" else "FastGelu")(y, b)
    return _onnx_act(y if b is None else op.Add(y, b), act)


def _linear_relax(node, importer):
    from tvm import relax
    x, w, b = (importer.env[a] if a is not None else None for a in node.args[:3])
    bb = importer.block_builder
    y = bb.emit(relax.op.linear(x, w, b))
    return _relax_act(bb, y, node.args[3])


@graphopt_op("linear_act", fake=_linear_fake, onnx=_linear_onnx, relax=_linear_relax)
def linear_act(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, act: str) -> torch.Tensor:
    return ACTIVATIONS[act][0](F.linear(x, w, b))
