"""graphopt::conv_act and graphopt::linear_act — a conv/linear with its bias, residual add and
activation applied in the same kernel, so the output makes one trip through memory.

Padding is ONNX-style [top, left, bottom, right], so a zero pad before the conv (TF "same"
padding) folds in even when asymmetric. ONNX Runtime lowering: conv_act → com.microsoft.FusedConv (activation and residual `Z` in the
kernel) where FusedConv has the activation, else Conv + activation ops; linear_act → MatMul +
BiasGelu / FastGelu (gelu erf / tanh) or MatMul + Add + activation."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from onnxscript import opset18 as op

from .registry import contrib_op, graphopt_op

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
