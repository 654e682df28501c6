"""graphopt::fft_conv1d — a long 1-D convolution computed in the frequency domain.

    y = (x ⊛ h)[start : start + out_len]       x: [B, C_in, L] real, h: [G, C_out/G, C_in/G, K]

where ⊛ is circular convolution of period N = N1·N2 (x zero-padded to N): the linear convolution
whenever N ≥ L + K − 1, which the conv rewrite guarantees; the rfft·irfft rewrite keeps the
model's own period.

The kernel arrives as its spectrum, computed at compile time (the kernel does not depend on the
input), laid out for the matmul FFT below: `spec` is [G, C_out/G, C_in/G, 2, N1, N2] (real/imag).

Lowering (ONNX and Relax): the Monarch / four-step FFT of FlashFFTConv, which turns the FFT into
matrix multiplies so the GEMM kernels do the work. With N = N1·N2, n = N2·n1 + n2, k = k1 + N1·k2:
    X̂[k1, k2] = Σ_n2 F2[n2, k2] · T[k1, n2] · Σ_n1 F1[k1, n1] · x[n1, n2]      (T = ω_N^(k1·n2))
so the forward transform is  F1 @ X  →  ⊙ T  →  @ F2  on the [N1, N2] view of x, and the inverse
runs the same steps conjugated and backwards, landing directly in natural order: no transposes,
no bit reversal. Complex products are real matmuls on stacked [re; im] blocks."""
from __future__ import annotations

import math
from functools import cache

import numpy as np
import torch

from .registry import graphopt_op


# --- the spectrum layout ---------------------------------------------------------------------------
def fft_size(length: int) -> tuple[int, int, int]:
    """(N, N1, N2): the power of two N ≥ length, split N = N1·N2 with N1 ≥ N2 as balanced as possible."""
    n = 1 << max(2, math.ceil(math.log2(length)))
    n2 = 1 << (int(math.log2(n)) // 2)
    return n, n // n2, n2


def spectrum(h: torch.Tensor, n1: int, n2: int) -> torch.Tensor:
    """Kernel h [..., K] → its length-N1·N2 spectrum in Monarch layout [..., 2, N1, N2] (float32)."""
    full = torch.fft.fft(h.double(), n=n1 * n2)                       # natural order, index k = k1 + N1·k2
    grid = full.reshape(*full.shape[:-1], n2, n1).transpose(-1, -2)   # [..., k1, k2]
    return torch.stack([grid.real, grid.imag], dim=-3).float()


def _natural(spec: torch.Tensor) -> torch.Tensor:
    """Monarch layout [..., 2, N1, N2] → complex natural-order spectrum [..., N]."""
    z = torch.complex(spec[..., 0, :, :].double(), spec[..., 1, :, :].double())
    return z.transpose(-1, -2).reshape(*z.shape[:-2], -1)


@cache
def _dft_constants(n1: int, n2: int) -> dict[str, np.ndarray]:
    """The fixed matrices of the four-step FFT (the 1/N of the inverse folded into its last step)."""
    n = n1 * n2
    w = lambda a, b, m: np.exp(-2j * np.pi * np.outer(np.arange(a), np.arange(b)) / m)   # noqa: E731
    f1, f2, tw = w(n1, n1, n1), w(n2, n2, n2), w(n1, n2, n)
    f = lambda a: a.astype(np.float32)   # noqa: E731
    return {
        "f1_stack": f(np.concatenate([f1.real, f1.imag])),                          # [2N1, N1]: → [Ar; Ai]
        "f2_block": f(np.block([[f2.real, f2.imag], [-f2.imag, f2.real]])),         # [Br|Bi] @ → [Cr|Ci]
        "f2c_block": f(np.block([[f2.real, -f2.imag], [f2.imag, f2.real]])),        # same with conj(F2)
        "f1c_row": f(np.concatenate([f1.real, f1.imag], axis=1) / n),               # Re(conj(F1) @ E) / N
        "tw_re": f(tw.real), "tw_im": f(tw.imag),
    }


def monarch_conv(ops, x, spec, n1: int, n2: int, groups: int, start: int, out_len: int, depthwise: bool,
                 dtype=torch.float32):
    """The lowering, written once over a small op vocabulary (`ops`: torch, onnxscript or Relax); in
    fp32 whatever `dtype` x has (bf16 inputs are cast in and the result cast back)."""
    c = {k: ops.const(v) for k, v in _dft_constants(n1, n2).items()}
    n = n1 * n2
    if dtype != torch.float32:
        x = ops.cast(x, torch.float32)
    x = ops.reshape(ops.pad_tail(x, (n,), 3), (0, 0, n1, n2))                # [B, Cin, N1, N2]
    a = ops.matmul(c["f1_stack"], x)                                          # [B, Cin, 2N1, N2]
    ar, ai = ops.slice(a, -2, 0, n1), ops.slice(a, -2, n1, 2 * n1)
    br = ops.sub(ops.mul(ar, c["tw_re"]), ops.mul(ai, c["tw_im"]))
    bi = ops.add(ops.mul(ar, c["tw_im"]), ops.mul(ai, c["tw_re"]))
    cc = ops.matmul(ops.cat([br, bi], -1), c["f2_block"])                    # [B, Cin, N1, 2N2]
    cr, ci = ops.slice(cc, -1, 0, n2), ops.slice(cc, -1, n2, 2 * n2)
    kr, ki = ops.slice(spec, -3, 0, 1), ops.slice(spec, -3, 1, 2)             # [G, Co/G, Ci/G, 1, N1, N2]
    if depthwise:                                                             # one kernel per channel
        kr, ki = ops.reshape(kr, (-1, n1, n2)), ops.reshape(ki, (-1, n1, n2))
        pr = ops.sub(ops.mul(cr, kr), ops.mul(ci, ki))
        pi = ops.add(ops.mul(cr, ki), ops.mul(ci, kr))
    else:                                                                     # mix channels per frequency
        cr, ci = (ops.reshape(t, (0, groups, 1, -1, n1, n2)) for t in (cr, ci))    # [B, G, 1, Ci/G, N1, N2]
        kr, ki = ops.squeeze_dim3(kr), ops.squeeze_dim3(ki)                        # [G, Co/G, Ci/G, N1, N2]
        pr = ops.sum_dim3(ops.sub(ops.mul(cr, kr), ops.mul(ci, ki)))              # [B, G, Co/G, N1, N2]
        pi = ops.sum_dim3(ops.add(ops.mul(cr, ki), ops.mul(ci, kr)))
        pr, pi = ops.reshape(pr, (0, -1, n1, n2)), ops.reshape(pi, (0, -1, n1, n2))
    d = ops.matmul(ops.cat([pr, pi], -1), c["f2c_block"])                    # [B, Cout, N1, 2N2]
    dr, di = ops.slice(d, -1, 0, n2), ops.slice(d, -1, n2, 2 * n2)
    er = ops.add(ops.mul(dr, c["tw_re"]), ops.mul(di, c["tw_im"]))
    ei = ops.sub(ops.mul(di, c["tw_re"]), ops.mul(dr, c["tw_im"]))
    y = ops.matmul(c["f1c_row"], ops.cat([er, ei], -2))                      # [B, Cout, N1, N2]
    y = ops.slice(ops.reshape(y, (0, 0, n)), -1, start, start + out_len)
    return y if dtype == torch.float32 else ops.cast(y, dtype)


# --- the three op vocabularies --------------------------------------------------------------------
class TorchOps:
    """For checking the lowering's algebra in PyTorch."""
    const = staticmethod(lambda v: torch.from_numpy(v))
    matmul, mul, add, sub = torch.matmul, torch.mul, torch.add, torch.sub
    cat = staticmethod(lambda ts, axis: torch.cat(ts, axis))
    slice = staticmethod(lambda t, axis, a, b: t.narrow(axis, a, b - a))
    squeeze_dim3 = staticmethod(lambda t: t.squeeze(3))
    sum_dim3 = staticmethod(lambda t: t.sum(3))
    reduce_sum = staticmethod(lambda t, axes: t.sum(axes))
    cast = staticmethod(lambda t, dtype: t.to(dtype))

    @staticmethod
    def pad_tail(t, sizes, rank):
        pads = [p for i, n in enumerate(reversed(sizes)) for p in (0, n - t.shape[-1 - i])]
        return torch.nn.functional.pad(t, pads)

    @staticmethod
    def reshape(t, shape):
        return t.reshape([t.shape[i] if d == 0 else d for i, d in enumerate(shape)])


def _onnx_ops():
    import onnx_ir as ir
    from onnxscript import opset18 as op

    class OnnxOps:
        const = staticmethod(lambda v: op.Constant(value=ir.tensor(v)))
        matmul, mul, add, sub = op.MatMul, op.Mul, op.Add, op.Sub
        cat = staticmethod(lambda ts, axis: op.Concat(*ts, axis=axis))
        squeeze_dim3 = staticmethod(lambda t: op.Squeeze(t, op.Constant(value_ints=[3])))
        sum_dim3 = staticmethod(lambda t: op.ReduceSum(t, op.Constant(value_ints=[3]), keepdims=0))
        reduce_sum = staticmethod(lambda t, axes: op.ReduceSum(t, op.Constant(value_ints=list(axes)), keepdims=0))
        cast = staticmethod(lambda t, dtype: op.Cast(t, to=_ONNX_DTYPE[dtype]))

        @staticmethod
        def slice(t, axis, a, b):
            ints = lambda v: op.Constant(value_ints=[v])   # noqa: E731
            return op.Slice(t, ints(a), ints(b), ints(axis))

        @staticmethod
        def reshape(t, shape):
            return op.Reshape(t, op.Constant(value_ints=list(shape)))

        @staticmethod
        def pad_tail(t, sizes, rank):
            """Zero-pad the last len(sizes) dims at their ends up to `sizes`."""
            grow = op.Sub(op.Constant(value_ints=list(sizes)), op.Shape(t, start=-len(sizes)))
            return op.Pad(t, op.Concat(op.Constant(value_ints=[0] * (2 * rank - len(sizes))), grow, axis=0))
    return OnnxOps


_ONNX_DTYPE = {torch.float32: 1, torch.float16: 10, torch.bfloat16: 16}


def _relax_ops(bb, shape_of):
    from tvm import relax
    R = relax.op
    emit = bb.emit

    class RelaxOps:
        const = staticmethod(lambda v: relax.const(v))
        matmul = staticmethod(lambda a, b: emit(R.matmul(a, b)))
        mul = staticmethod(lambda a, b: emit(R.multiply(a, b)))
        add = staticmethod(lambda a, b: emit(R.add(a, b)))
        sub = staticmethod(lambda a, b: emit(R.subtract(a, b)))
        cat = staticmethod(lambda ts, axis: emit(R.concat(ts, axis)))
        squeeze_dim3 = staticmethod(lambda t: emit(R.squeeze(t, [3])))
        sum_dim3 = staticmethod(lambda t: emit(R.sum(t, axis=[3])))
        reduce_sum = staticmethod(lambda t, axes: emit(R.sum(t, axis=list(axes))))
        cast = staticmethod(lambda t, dtype: emit(R.astype(t, str(dtype).removeprefix("torch."))))

        @staticmethod
        def slice(t, axis, a, b):
            return emit(R.strided_slice(t, axes=[axis], begin=[a], end=[b]))

        @staticmethod
        def reshape(t, shape):
            dims = shape_of(t)
            return emit(R.reshape(t, [dims[i] if d == 0 else d for i, d in enumerate(shape)]))

        @staticmethod
        def pad_tail(t, sizes, rank):
            dims = [int(d) for d in shape_of(t)]
            grow = [0] * (rank - len(sizes)) + [n - d for n, d in zip(sizes, dims[-len(sizes):])]
            return emit(R.nn.pad(t, [p for g in grow for p in (0, g)]))
    return RelaxOps


# --- the op ---------------------------------------------------------------------------------------
def _out_shape(x, spec, out_len):
    return (x.shape[0], spec.shape[0] * spec.shape[1], out_len)


def _fake(x, spec, n1, n2, groups, start, out_len, depthwise):
    return x.new_empty(_out_shape(x, spec, out_len))


def onnx_dtype(x) -> torch.dtype:
    """The torch dtype of a value being traced into ONNX (the lowerings compute in fp32)."""
    return {v: k for k, v in _ONNX_DTYPE.items()}.get(int(x.dtype), torch.float32)


def _onnx(x, spec, n1: int, n2: int, groups: int, start: int, out_len: int, depthwise: bool):
    return monarch_conv(_onnx_ops(), x, spec, n1, n2, groups, start, out_len, depthwise, onnx_dtype(x))


def _relax(node, importer):
    x, spec = importer.env[node.args[0]], importer.env[node.args[1]]
    return monarch_conv(_relax_ops(importer.block_builder, importer.shape_of), x, spec, *node.args[2:],
                        dtype=node.args[0].meta["val"].dtype)


@graphopt_op("fft_conv1d", fake=_fake, onnx=_onnx, relax=_relax)
def fft_conv1d(x: torch.Tensor, spec: torch.Tensor, n1: int, n2: int, groups: int, start: int, out_len: int,
               depthwise: bool) -> torch.Tensor:
    n = n1 * n2
    h = _natural(spec)                                                  # [G, Co/G, Ci/G, N]
    xf = torch.fft.fft(x.double(), n=n)                                 # [B, Ci, N]
    xf = xf.reshape(x.shape[0], groups, 1, -1, n)                       # [B, G, 1, Ci/G, N]
    y = torch.fft.ifft((xf * h).sum(3), n=n).real                       # [B, G, Co/G, N]
    return y.reshape(x.shape[0], -1, n)[..., start:start + out_len].to(x.dtype).contiguous()
