"""graphopt::fft_conv1d — a long 1-D convolution computed in the frequency domain.

    y = (x ⊛ h)[start : start + out_len]       x: [B, C_in, L] real, h: [G, C_out/G, C_in/G, K]

where ⊛ is circular convolution of period N = N1·N2 (x zero-padded to N): the linear convolution
whenever N ≥ L + K − 1, which the conv rewrite guarantees; the rfft·irfft rewrite keeps the
model's own period.

Lowering (ONNX and Relax): the Monarch / four-step FFT of FlashFFTConv, which turns the FFT into
matrix multiplies so the GEMM kernels do the work. With N = N1·N2, n = N2·n1 + n2, k = k1 + N1·k2:
    X̂[k1, k2] = Σ_n2 F2[n2, k2] · T[k1, n2] · Σ_n1 F1[k1, n1] · x[n1, n2]      (T = ω_N^(k1·n2))
so the forward transform is  F1 @ X  →  ⊙ T  →  @ F2  on the [N1, N2] view of x, and the inverse
runs the same steps conjugated and backwards, landing directly in natural order (no transposes, no
bit reversal). Complex values travel as [re, im] pairs on an axis of their own; each complex
product is one broadcast multiply with a constant holding the ± real and imaginary parts, summed
over the pair axis, and each complex matmul one real matmul with a block matrix.

x and y are real, so only the spectrum's first half is computed (k2 ≤ N2/2, which covers every
k ≤ N/2): y = Re IDFT(w·Ŷ) with w = 2 on 0 < k < N/2, 1 at k = 0 and N/2, 0 above. The kernel's
half spectrum, times w, is computed at compile time (the kernel does not depend on the input):
`spec` is [G, C_out/G, C_in/G, 2 (Ŷ re/im), 2 (X̂ re/im), N1, N2/2 + 1]."""
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


def _half_index(n1: int, n2: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Natural frequency k = k1 + N1·k2 of each half-spectrum cell [N1, N2/2 + 1], and its weight w."""
    k = torch.arange(n1)[:, None] + n1 * torch.arange(n2 // 2 + 1)[None]
    n = n1 * n2
    w = torch.where(k < n // 2, 2.0, 0.0).double()
    w[k == 0], w[k == n // 2] = 1.0, 1.0
    return k, w


def spectrum(h: torch.Tensor, n1: int, n2: int) -> torch.Tensor:
    """Kernels h [G, Co/G, Ci/G, K] → the weighted half spectrum, in the layout the lowering multiplies by."""
    k, w = _half_index(n1, n2)
    f = torch.fft.fft(h.double(), n=n1 * n2)[..., k] * w                # [..., N1, M]
    kr, ki = f.real, f.imag
    # Ŷr = X̂r·kr − X̂i·ki ;  Ŷi = X̂r·ki + X̂i·kr
    return torch.stack([torch.stack([kr, -ki], -3), torch.stack([ki, kr], -3)], -4).float()


def _natural(spec: torch.Tensor, n1: int, n2: int) -> torch.Tensor:
    """The layout above → the weighted spectrum in natural order [..., N] (zero above N/2)."""
    k, _ = _half_index(n1, n2)
    half = torch.complex(spec[..., 0, 0, :, :].double(), spec[..., 1, 0, :, :].double())   # [..., N1, M]
    full = half.new_zeros(*half.shape[:-2], n1 * n2)
    full[..., k.flatten()] = half.flatten(-2)
    return full


@cache
def _dft_constants(n1: int, n2: int) -> dict[str, np.ndarray]:
    """The fixed matrices of the four-step FFT (the 1/N of the inverse folded into its last step).
    Pair axes (re/im) sit in front of the [N1, ·] block, so each complex sum adds contiguous halves."""
    n, m = n1 * n2, n2 // 2 + 1
    ang = lambda a, b, size: 2 * np.pi * np.outer(np.arange(a), np.arange(b)) / size   # noqa: E731
    f1, f2, tw = ang(n1, n1, n1), ang(n2, m, n2), ang(n1, n2, n)
    tr, ti = np.cos(tw), -np.sin(tw)                                           # T = ω_N^(k1·n2)
    c2, s2 = np.cos(f2), np.sin(f2)                                            # F2 = c2 − i·s2
    f = lambda a: np.ascontiguousarray(a, dtype=np.float32)   # noqa: E731
    pairs = lambda rr, ri, ir, ii: np.stack([np.stack([rr, ri]), np.stack([ir, ii])])   # noqa: E731  [out, in, ...]
    return {
        "f1": f(np.concatenate([np.cos(f1), -np.sin(f1)])),                     # [2N1, N1]: rows (re/im, k1)
        "tw": f(pairs(tr, -ti, ti, tr)),                                         # B = A·T      [2, 2, N1, N2]
        "f2": f(pairs(c2, s2, -s2, c2)),                                         # X̂ = B @ F2   [2, 2, N2, M]
        "f2_inv": f(pairs(c2.T, -s2.T, s2.T, c2.T)),                             # D = P @ F2ᴴ  [2, 2, M, N2]
        "tw_inv": f(pairs(tr, ti, -ti, tr)),                                     # E = D·conj T
        "f1_inv": f(np.concatenate([np.cos(f1), -np.sin(f1)], 1) / n),          # Re(conj(F1) @ E) / N
    }


def monarch_conv(ops, x, spec, n1: int, n2: int, groups: int, start: int, out_len: int, dtype=torch.float32):
    """The lowering, written once over a small op vocabulary (`ops`: torch, onnxscript or Relax); in
    fp32 whatever `dtype` x has (bf16 inputs are cast in and the result cast back)."""
    c = {k: ops.const(v) for k, v in _dft_constants(n1, n2).items()}
    n = n1 * n2
    if dtype != torch.float32:
        x = ops.cast(x, torch.float32)
    x = ops.reshape(ops.pad_tail(x, (n,), 3), (0, groups, 1, -1, n1, n2))       # [B, G, 1, Ci/G, N1, N2]
    a = ops.reshape(ops.matmul(c["f1"], x), (0, 0, 0, 0, 1, 2, n1, n2))       # F1 @ X  [.., 1, re/im, N1, N2]
    b = ops.unsqueeze(ops.reduce_sum(ops.mul(a, c["tw"]), (5,)), 4)           # ⊙ T     [.., 1, re/im, N1, N2]
    xf = ops.reduce_sum(ops.matmul(b, c["f2"]), (5,))                         # @ F2    [B, G, 1, Ci/G, re/im, N1, M]
    xf = ops.unsqueeze(xf, 4)
    p = ops.reduce_sum(ops.mul(xf, spec), (3, 5))                             # Σ_ci X̂·ĥ  [B, G, Co/G, re/im, N1, M]
    d = ops.reduce_sum(ops.matmul(ops.unsqueeze(p, 3), c["f2_inv"]), (4,))    # @ F2ᴴ   [B, G, Co/G, re/im, N1, N2]
    e = ops.reduce_sum(ops.mul(ops.unsqueeze(d, 3), c["tw_inv"]), (4,))       # ⊙ T̄     [B, G, Co/G, re/im, N1, N2]
    y = ops.matmul(c["f1_inv"], ops.reshape(e, (0, -1, 2 * n1, n2)))          # [B, Co, N1, N2]
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
    unsqueeze = staticmethod(lambda t, axis: t.unsqueeze(axis))
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
        unsqueeze = staticmethod(lambda t, axis: op.Unsqueeze(t, op.Constant(value_ints=[axis])))
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
        unsqueeze = staticmethod(lambda t, axis: emit(R.expand_dims(t, axis)))
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


def _fake(x, spec, n1, n2, groups, start, out_len):
    return x.new_empty(_out_shape(x, spec, out_len))


def onnx_dtype(x) -> torch.dtype:
    """The torch dtype of a value being traced into ONNX (the lowerings compute in fp32)."""
    return {v: k for k, v in _ONNX_DTYPE.items()}.get(int(x.dtype), torch.float32)


def _onnx(x, spec, n1: int, n2: int, groups: int, start: int, out_len: int):
    return monarch_conv(_onnx_ops(), x, spec, n1, n2, groups, start, out_len, onnx_dtype(x))


def _relax(node, importer):
    x, spec = importer.env[node.args[0]], importer.env[node.args[1]]
    return monarch_conv(_relax_ops(importer.block_builder, importer.shape_of), x, spec, *node.args[2:],
                        dtype=node.args[0].meta["val"].dtype)


@graphopt_op("fft_conv1d", fake=_fake, onnx=_onnx, relax=_relax)
def fft_conv1d(x: torch.Tensor, spec: torch.Tensor, n1: int, n2: int, groups: int, start: int,
               out_len: int) -> torch.Tensor:
    n = n1 * n2
    h = _natural(spec, n1, n2)                                          # [G, Co/G, Ci/G, N], weighted half
    xf = torch.fft.fft(x.double(), n=n)                                 # [B, Ci, N]
    xf = xf.reshape(x.shape[0], groups, 1, -1, n)                       # [B, G, 1, Ci/G, N]
    y = torch.fft.ifft((xf * h).sum(3), n=n).real                       # [B, G, Co/G, N]: Re IDFT(w·Ŷ)
    return y.reshape(x.shape[0], -1, n)[..., start:start + out_len].to(x.dtype).contiguous()
