"""Quantized operators: the affine (scale, zero point) arithmetic of integer inference.

    quantize(x, s, z)          = clamp(round(x / s) + z, qmin, qmax)     (dtype of z: uint8/int8)
    dequantize(q, s, z, axis)  = (q - z) * s                              (per tensor, or per `axis`)
    dynamic_linear(x, w, s, b) = x quantized to uint8 on its own min/max at run time, times int8 w
    int4_linear(x, w, s, z, b) = x @ 4-bit block-wise dequantized w  (weight-only)

quantize/dequantize lower to ONNX QuantizeLinear/DequantizeLinear: placed around a conv, matmul or add,
ONNX Runtime fuses the group into its integer kernels (QLinearConv, QGemm, QLinearAdd...). The
other two lower to ORT's DynamicQuantizeLinear + MatMulIntegerToFloat and MatMulNBits. On TVM all four become Relax's
quantize/dequantize or the integer arithmetic written out (slower than ORT: TVM has no tuned int8
kernels without tensorization)."""
from __future__ import annotations

import numpy as np
import torch
from onnxscript import opset18 as op

from .registry import contrib_op, graphopt_op

INT4_BLOCK = 32


# --- quantize / dequantize -------------------------------------------------------------------------
def _qrange(dtype: torch.dtype) -> tuple[int, int]:
    info = torch.iinfo(dtype)
    return info.min, info.max


def _quantize_fake(x, scale, zero_point):
    return x.new_empty(x.shape, dtype=zero_point.dtype)


def _quantize_relax(node, importer):
    from tvm import relax
    x, scale, zp = (importer.env[a] for a in node.args)
    return importer.block_builder.emit(relax.op.quantize(x, scale, zp, axis=-1,
                                                         out_dtype=str(node.args[2].meta["val"].dtype)[6:]))


@graphopt_op("quantize", fake=_quantize_fake, onnx=lambda x, scale, zero_point: op.QuantizeLinear(x, scale, zero_point),
             relax=_quantize_relax)
def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    qmin, qmax = _qrange(zero_point.dtype)
    return torch.clamp(torch.round(x / scale) + zero_point.to(x.dtype), qmin, qmax).to(zero_point.dtype)


def _per_axis(t: torch.Tensor, q: torch.Tensor, axis: int) -> torch.Tensor:
    """A per-channel scale/zero point shaped to broadcast along `axis` of q."""
    if t.dim() == 0:
        return t
    shape = [1] * q.dim()
    shape[axis] = -1
    return t.reshape(shape)


def _dequantize_fake(q, scale, zero_point, axis):
    return q.new_empty(q.shape, dtype=scale.dtype)


def _dequantize_onnx(q, scale, zero_point, axis: int):
    return op.DequantizeLinear(q, scale, zero_point, axis=axis)


def _dequantize_relax(node, importer):
    from tvm import relax
    q, scale, zp = (importer.env[a] for a in node.args[:3])
    return importer.block_builder.emit(relax.op.dequantize(q, scale, zp, axis=node.args[3], out_dtype="float32"))


@graphopt_op("dequantize", fake=_dequantize_fake, onnx=_dequantize_onnx, relax=_dequantize_relax)
def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    return (q.to(scale.dtype) - _per_axis(zero_point, q, axis).to(scale.dtype)) * _per_axis(scale, q, axis)


# --- dynamic_linear: int8 weights, activations quantized at run time ---------------------------------
def dynamic_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ONNX DynamicQuantizeLinear's uint8 parameters: the range [min(x, 0), max(x, 0)] over 0..255."""
    lo, hi = torch.clamp(x.min(), max=0), torch.clamp(x.max(), min=0)
    scale = torch.where(hi > lo, (hi - lo) / 255, torch.ones_like(hi))
    return scale, torch.clamp(torch.round(-lo / scale), 0, 255)


def _dynamic_linear_fake(x, w_t, w_scale, bias):
    return x.new_empty(*x.shape[:-1], w_t.shape[1])


def _dynamic_linear_onnx(x, w_t, w_scale, bias):
    """ORT's unfused form, as its own quantization tool writes it: the exporter's CSE leaves one
    DynamicQuantizeLinear for the linears reading one tensor (attention's Q, K, V: quantized once, as the tool does),
    and ORT fuses each one read by a single linear into DynamicQuantizeMatMul."""
    q, x_scale, x_zero_point = op.DynamicQuantizeLinear(x)
    zero = op.CastLike(op.Constant(value_int=0), w_t)
    return contrib_op("MatMulIntegerToFloat")(q, w_t, x_scale, w_scale, x_zero_point,
                                              op.Expand(zero, op.Shape(w_scale)), bias)


def _dynamic_linear_relax(node, importer):
    from tvm import relax
    R = relax.op
    x, w_t, w_scale = (importer.env[a] for a in node.args[:3])
    bias = importer.env[node.args[3]] if node.args[3] is not None else None
    bb = importer.block_builder
    f32 = lambda v: relax.const(v, "float32")
    lo = bb.emit(R.minimum(R.min(x), f32(0.0)))
    hi = bb.emit(R.maximum(R.max(x), f32(0.0)))
    scale = bb.emit(R.maximum(R.divide(R.subtract(hi, lo), f32(255.0)), f32(1e-30)))
    zp = bb.emit(R.clip(R.round(R.divide(R.negative(lo), scale)), 0, 255))
    q = bb.emit(R.clip(R.add(R.round(R.divide(x, scale)), zp), 0, 255))
    acc = bb.emit(R.matmul(R.astype(R.subtract(q, zp), "int32"), R.astype(w_t, "int32"), out_dtype="int32"))
    y = bb.emit(R.multiply(R.astype(acc, "float32"), R.multiply(scale, w_scale)))
    return bb.emit(R.add(y, bias)) if bias is not None else y


@graphopt_op("dynamic_linear", fake=_dynamic_linear_fake, onnx=_dynamic_linear_onnx, relax=_dynamic_linear_relax)
def dynamic_linear(x: torch.Tensor, w_t: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """w_t: int8 [in, out] (symmetric, per output column w_scale); x: float [..., in]."""
    scale, zp = dynamic_qparams(x)
    q = torch.clamp(torch.round(x / scale) + zp, 0, 255)
    acc = torch.matmul((q - zp).double(), w_t.double())   # exact integer accumulation
    y = (acc * (scale.double() * w_scale.double())).to(x.dtype)
    return y if bias is None else y + bias


# --- int4_linear: 4-bit block-wise weight-only (ORT MatMulNBits) --------------------------------------
def pack_int4(weight: torch.Tensor, block_size: int = INT4_BLOCK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A float linear weight [out, in] → MatMulNBits' (packed [out, blocks, block/2] uint8, scales
    [out·blocks], zero points [out·⌈blocks/2⌉] uint8), asymmetric per block, packed by ONNX Runtime."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits
    n, k = weight.shape
    blocks = -(-k // block_size)
    w = np.ascontiguousarray(weight.detach().float().numpy().T)           # MatMul layout [in, out]
    packed = np.zeros((n, blocks, block_size // 2), dtype=np.uint8)
    zero_points = np.zeros((n, (blocks + 1) // 2), dtype=np.uint8)
    scales = np.zeros((n, blocks), dtype=np.float32)
    quantize_matmul_4bits(packed, w, scales, zero_points, block_size, n, k, False)
    return torch.from_numpy(packed), torch.from_numpy(scales.reshape(-1)), torch.from_numpy(zero_points.reshape(-1))


def unpack_int4(packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, k: int) -> torch.Tensor:
    """The float weight [out, in] that MatMulNBits multiplies by."""
    n, blocks, half = packed.shape
    nibbles = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(n, blocks, 2 * half).float()
    zp = torch.stack([zero_points & 0x0F, zero_points >> 4], dim=-1).reshape(n, -1)[:, :blocks].float()
    w = (nibbles - zp[..., None]) * scales.reshape(n, blocks, 1)
    return w.reshape(n, -1)[:, :k]


def _int4_linear_fake(x, packed, scales, zero_points, bias, in_features, block_size):
    return x.new_empty(*x.shape[:-1], packed.shape[0])


def _int4_linear_onnx(x, packed, scales, zero_points, bias, in_features: int, block_size: int):
    # accuracy_level 4: A is quantized to int8 per block inside the kernel, so VNNI/AMX do the work
    return contrib_op("MatMulNBits")(x, packed, scales, zero_points, None, bias, K=in_features,
                                     N=packed.shape[0], bits=4, block_size=block_size, accuracy_level=4)


def _int4_linear_relax(node, importer):
    """The 4-bit weight is unpacked in Relax (weights are parameters there, not constants)."""
    from tvm import relax
    R = relax.op
    x, packed, scales, zero_points = (importer.env[a] for a in node.args[:4])
    bias = importer.env[node.args[4]] if node.args[4] is not None else None
    k = node.args[5]
    n, blocks, half = (int(d) for d in importer.shape_of(packed))
    bb = importer.block_builder

    e = bb.emit

    def nibbles(t, shape):   # uint8 → its low and high 4 bits, interleaved along the last axis
        t = e(R.astype(t, "int32"))
        pair = [e(R.expand_dims(e(R.bitwise_and(t, relax.const(15, "int32"))), -1)),
                e(R.expand_dims(e(R.right_shift(t, relax.const(4, "int32"))), -1))]
        return e(R.astype(e(R.reshape(e(R.concat(pair, axis=-1)), shape)), "float32"))
    q = nibbles(packed, (n, blocks, 2 * half))
    zp = e(R.strided_slice(nibbles(e(R.reshape(zero_points, (n, -1))), (n, -1)), axes=[1], begin=[0], end=[blocks]))
    w = e(R.multiply(e(R.subtract(q, e(R.expand_dims(zp, -1)))), e(R.reshape(scales, (n, blocks, 1)))))
    w = e(R.strided_slice(e(R.reshape(w, (n, blocks * 2 * half))), axes=[1], begin=[0], end=[k]))
    y = e(R.matmul(x, e(R.permute_dims(w, [1, 0]))))
    return bb.emit(R.add(y, bias)) if bias is not None else y


@graphopt_op("int4_linear", fake=_int4_linear_fake, onnx=_int4_linear_onnx, relax=_int4_linear_relax)
def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
                bias: torch.Tensor | None, in_features: int, block_size: int) -> torch.Tensor:
    w = unpack_int4(packed, scales, zero_points, in_features)
    return torch.nn.functional.linear(x, w.to(x.dtype), bias)
