"""graphopt::fft_conv1d — a long 1-D convolution computed in the frequency domain.

    y = (x ⊛ h)[start : start + out_len]       x: [B, C_in, L] real, h: [G, C_out/G, C_in/G, K]

where ⊛ is circular convolution of period N (x zero-padded to N): the linear convolution whenever
N ≥ L + K − 1, which the conv rewrite guarantees; the rfft·irfft rewrite keeps the model's period.

Lowering (ONNX and Relax): the Monarch FFT of FlashFFTConv, which turns the FFT into matrix
multiplies so the GEMM kernels do the work. With N = N1·S (S = N/N1), n = S·n1 + m, k = k1 + N1·k':
    X̂[k1 + N1·k'] = DFT_S over m of ( ω_N^(k1·m) · Σ_n1 ω_N1^(k1·n1) · x[n1, m] )
that is: a DFT of size N1 as a matmul along the first digit, a twiddle, then a DFT of size S on
the rest, split the same way again. With N = N1·N2·…·Nk the k stages are matmuls along digit
j of the [N1, …, Nk] view (left-multiplied, so no transposes), with twiddles between them; the
spectrum comes out digit-reversed (k = k1 + N1·k2 + N1·N2·k3 …), which is the layout the kernel's
spectrum is stored in, and the inverse runs the stages conjugated and backwards, landing in natural
order. More levels cut the multiply-adds per point from ~4·(N1 + N2) to ~4·ΣNj, at one more
twiddle pass each, which on this CPU pays only past N = 65536 (see MAX_FACTOR_BITS).

Complex values travel as [re, im] pairs on an axis of their own, in front of the data; each
complex product or matmul is one broadcast op with a constant holding the ± real and imaginary
parts, summed over the input pair axis (ORT adds two contiguous halves).

x and y are real, so only the spectrum's first half is computed (k_last ≤ N_last/2 covers every
k ≤ N/2): y = Re IDFT(w·Ŷ) with w = 2 on 0 < k < N/2, 1 at k = 0 and N/2, 0 above. The kernel's
half spectrum, times w, is computed at compile time (the kernel does not depend on the input):
`spec` is [G, C_out/G, C_in/G, 2 (Ŷ re/im), 2 (X̂ re/im), H] with H = N/N_last · (N_last/2 + 1)."""
from __future__ import annotations

import math
from functools import cache

import numpy as np
import torch
from onnx import helper, numpy_helper

from .registry import graphopt_op

# Each DFT matrix is at most 256×256; longer transforms take a third level. Measured in ORT here
# (depthwise, 64 channels): every extra level costs more in memory passes than its saved multiply-adds
# until the matrices pass 256 — N = 8192: (128, 64) 5.8 ms, (32, 16, 16) 8.1, (16, 8, 8, 8) 17.0;
# N = 32768: (256, 128) 39 ms, (32, 32, 32) 42–48; N = 131072: (512, 256) 274 ms, (64, 32, 64) 213–231.
MAX_FACTOR_BITS = 8


# --- the spectrum layout ---------------------------------------------------------------------------
def fft_size(length: int, max_bits: int = MAX_FACTOR_BITS) -> tuple[int, tuple[int, ...]]:
    """(N, factors): the power of two N ≥ length, split into the fewest factors of at most 2^max_bits,
    as equal as possible, the larger ones first and last (the real first stage and the half last
    stage cost half as much per point as a middle one)."""
    bits = max(2, math.ceil(math.log2(length)))
    levels = max(2, math.ceil(bits / max_bits))
    parts = [bits // levels] * levels
    for i in [0, levels - 1, *range(1, levels - 1)][: bits % levels]:
        parts[i] += 1
    return 1 << bits, tuple(1 << b for b in parts)


def _half_index(ns: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Natural frequency k = k1 + N1·k2 + … of each half-spectrum cell (flattened, last digit ≤ N_last/2),
    and its weight w."""
    k = torch.zeros(1, dtype=torch.long)
    stride = 1
    for j, nj in enumerate(ns):
        digits = torch.arange(nj if j < len(ns) - 1 else nj // 2 + 1)
        k = (k[:, None] + stride * digits[None]).flatten()
        stride *= nj
    n = stride
    w = torch.where(k < n // 2, 2.0, 0.0).double()
    w[k == 0], w[k == n // 2] = 1.0, 1.0
    return k, w


def spectrum(h: torch.Tensor, ns) -> torch.Tensor:
    """Kernels h [G, Co/G, Ci/G, K] → the weighted half spectrum, in the layout the lowering multiplies by."""
    k, w = _half_index(tuple(ns))
    f = torch.fft.fft(h.double(), n=math.prod(ns))[..., k] * w          # [..., H]
    kr, ki = f.real, f.imag
    # Ŷr = X̂r·kr − X̂i·ki ;  Ŷi = X̂r·ki + X̂i·kr
    return torch.stack([torch.stack([kr, -ki], -2), torch.stack([ki, kr], -2)], -3).float()


def full_spectrum(spec: torch.Tensor, ns: tuple[int, ...]) -> torch.Tensor:
    """A depthwise conv's layout above → each kernel's full N-point spectrum [C, N] (Hermitian: the half
    spectrum unweighted, its conjugate mirrored above N/2)."""
    half = _natural(spec, ns)[:, 0, 0, : math.prod(ns) // 2 + 1].clone()
    half[:, 1:-1] /= 2
    return torch.cat([half, half[:, 1:-1].flip(-1).conj()], -1)


def _natural(spec: torch.Tensor, ns: tuple[int, ...]) -> torch.Tensor:
    """The layout above → the weighted spectrum in natural order [..., N] (zero above N/2)."""
    k, _ = _half_index(ns)
    full = torch.zeros(*spec.shape[:-3], math.prod(ns), dtype=torch.complex128)
    full[..., k] = torch.complex(spec[..., 0, 0, :].double(), spec[..., 1, 0, :].double())
    return full


@cache
def _dft_constants(ns: tuple[int, ...]) -> dict[str, list[np.ndarray]]:
    """The fixed matrices and twiddles of each stage (the 1/N of the inverse folded into its last step)."""
    n, last, m = math.prod(ns), ns[-1], ns[-1] // 2 + 1
    ang = lambda a, b, size: 2 * np.pi * np.outer(np.arange(a), np.arange(b)) / size   # noqa: E731
    f = lambda a: np.ascontiguousarray(a, dtype=np.float32)   # noqa: E731
    pairs = lambda rr, ri, ir, ii: f(np.stack([np.stack([rr, ri]), np.stack([ir, ii])]))   # noqa: E731  [out, in, …]
    c = {"twiddle": [], "twiddle_inv": [], "middle": [], "middle_inv": []}
    for j in range(len(ns) - 1):                                # T_j = ω_S^(k_j·m), S = N_j·…·N_k
        rest = math.prod(ns[j + 1:])
        t = ang(ns[j], rest, ns[j] * rest).reshape(1, -1)
        c["twiddle"].append(pairs(np.cos(t), np.sin(t), -np.sin(t), np.cos(t)))
        c["twiddle_inv"].append(pairs(np.cos(t), -np.sin(t), np.sin(t), np.cos(t)))
    for nj in ns[1:-1]:                                         # complex DFTs of the middle digits (left matmul)
        a = ang(nj, nj, nj)[None]
        c["middle"].append(pairs(np.cos(a), np.sin(a), -np.sin(a), np.cos(a)))
        c["middle_inv"].append(pairs(np.cos(a), -np.sin(a), np.sin(a), np.cos(a)))
    a1, al = ang(ns[0], ns[0], ns[0]), ang(last, m, last)
    c["first"] = f(np.concatenate([np.cos(a1), -np.sin(a1)]))                     # [2N1, N1]: rows (re/im, k1)
    c["last"] = pairs(np.cos(al), np.sin(al), -np.sin(al), np.cos(al))             # [2, 2, N_k, M] (right matmul)
    c["last_inv"] = pairs(np.cos(al.T), -np.sin(al.T), np.sin(al.T), np.cos(al.T))  # [2, 2, M, N_k]
    c["first_inv"] = f(np.concatenate([np.cos(a1), -np.sin(a1)], 1) / n)          # Re(conj(F1) @ E) / N
    return c


def monarch_conv(ops, x, spec, ns, groups: int, start: int, out_len: int, dtype=torch.float32):
    """The lowering, written once over a small op vocabulary (`ops`: torch, onnxscript or Relax); in
    fp32 whatever `dtype` x has (bf16 inputs are cast in and the result cast back).
    Tensors are [B, G, Co/G or 1, Ci/G or 1, re/im, data…]; `pair` views one as [.., 1, re/im, …] so that
    a broadcast op against a [out re/im, in re/im, …] constant, summed over axis 5, is a complex op."""
    ns = tuple(ns)
    const = _dft_constants(ns)
    c = {k: [ops.const(a) for a in v] if isinstance(v, list) else ops.const(v) for k, v in const.items()}
    n, k, m = math.prod(ns), len(ns), ns[-1] // 2 + 1
    half = n // ns[-1] * m
    lead = (0, 0, 0, 0)

    def pair(t, *view):                   # [.., 1, re/im, *view]: a complex value, ready to meet a constant
        return ops.reshape(t, (*lead, 1, 2, *view))

    def twiddle(t, tw, j):                # ⊙ T_j on the view [.., P_j, N_j·S_j+1]
        return ops.reduce_sum(ops.mul(pair(t, math.prod(ns[:j]), -1), tw), (5,))

    def middle(t, f, j):                  # DFT along digit j: left matmul on the view [.., P_j, N_j, S_j+1]
        return ops.reduce_sum(ops.matmul(f, pair(t, math.prod(ns[:j]), ns[j], -1)), (5,))

    if dtype != torch.float32:
        x = ops.cast(x, torch.float32)
    t = ops.reshape(ops.pad_tail(x, (n,), 3), (0, groups, 1, -1, ns[0], n // ns[0]))   # [B, G, 1, Ci/G, N1, S1]
    t = ops.matmul(c["first"], t)                                                    # real → complex, digit 1
    for j in range(1, k):
        t = twiddle(t, c["twiddle"][j - 1], j - 1)
        t = middle(t, c["middle"][j - 1], j) if j < k - 1 else \
            ops.reduce_sum(ops.matmul(pair(t, n // ns[-1], ns[-1]), c["last"]), (5,))   # half spectrum
    p = ops.reduce_sum(ops.mul(pair(t, half), spec), (3, 5))                         # Σ_ci X̂·ĥ: [B, G, Co/G, 2, H]
    t = ops.reshape(p, (0, 0, 0, 1, 2, half))
    t = ops.reduce_sum(ops.matmul(pair(t, n // ns[-1], m), c["last_inv"]), (5,))
    for j in range(k - 2, -1, -1):
        if j < k - 2:
            t = middle(t, c["middle_inv"][j], j + 1)
        t = twiddle(t, c["twiddle_inv"][j], j)
    y = ops.matmul(c["first_inv"], ops.reshape(t, (*lead, 2 * ns[0], n // ns[0])))   # [B, G, Co/G, 1, N1, S1]
    y = ops.slice(ops.reshape(y, (0, -1, n)), -1, start, start + out_len)
    return y if dtype == torch.float32 else ops.cast(y, dtype)


# --- the three op vocabularies --------------------------------------------------------------------
class TorchOps:
    """For checking the lowering's algebra in PyTorch."""
    const = staticmethod(lambda v: torch.from_numpy(v))
    matmul, mul = torch.matmul, torch.mul
    slice = staticmethod(lambda t, axis, a, b: t.narrow(axis, a, b - a))
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
        matmul, mul = op.MatMul, op.Mul
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


class ProtoOps:
    """The ONNX vocabulary as plain onnx.helper nodes and initializers: a lowering as a standalone model, for a probe
    that times it without an exporter (a torch.onnx export of one cost 0.6 s here, the first in a process 3 s)."""

    def __init__(self):
        self.nodes, self.initializers = [], []

    def _node(self, op_type, inputs, **attrs):
        out = f"v{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, v):
        name = f"c{len(self.initializers)}"
        self.initializers.append(numpy_helper.from_array(np.asarray(v), name))
        return name

    def _ints(self, v):
        return self.const(np.array(list(v), np.int64))

    def matmul(self, a, b):
        return self._node("MatMul", (a, b))

    def mul(self, a, b):
        return self._node("Mul", (a, b))

    def reduce_sum(self, t, axes):
        return self._node("ReduceSum", (t, self._ints(axes)), keepdims=0)

    def cast(self, t, dtype):
        return self._node("Cast", (t,), to=_ONNX_DTYPE[dtype])

    def slice(self, t, axis, a, b):
        return self._node("Slice", (t, self._ints([a]), self._ints([b]), self._ints([axis])))

    def reshape(self, t, shape):
        return self._node("Reshape", (t, self._ints(shape)))

    def pad_tail(self, t, sizes, rank):
        grow = self._node("Sub", (self._ints(sizes), self._node("Shape", (t,), start=-len(sizes))))
        return self._node("Pad", (t, self._node("Concat", (self._ints([0] * (2 * rank - len(sizes))), grow), axis=0)))


def _relax_ops(bb, shape_of):
    from tvm import relax
    R = relax.op
    emit = bb.emit

    class RelaxOps:
        const = staticmethod(lambda v: relax.const(v))
        matmul = staticmethod(lambda a, b: emit(R.matmul(a, b)))
        mul = staticmethod(lambda a, b: emit(R.multiply(a, b)))
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


def _fake(x, spec, ns, groups, start, out_len):
    return x.new_empty(_out_shape(x, spec, out_len))


def onnx_dtype(x) -> torch.dtype:
    """The torch dtype of a value being traced into ONNX (the lowerings compute in fp32)."""
    return {v: k for k, v in _ONNX_DTYPE.items()}.get(int(x.dtype), torch.float32)


def _onnx(x, spec, ns: list[int], groups: int, start: int, out_len: int):
    return monarch_conv(_onnx_ops(), x, spec, ns, groups, start, out_len, onnx_dtype(x))


def fused_kernel_applies(spec_shape, ns, target) -> bool:
    """Whether TVM runs this fft_conv1d as graphopt's fused TIR kernel (graphopt/ops/fft_kernel.py): depthwise
    convs (spec [C, 1, 1, …]) of period N ≥ 64 on LLVM CPU targets (`target`: a graphopt Target). The rest take
    the Monarch matmul form."""
    return not target.gpu and tuple(spec_shape[1:3]) == (1, 1) and math.prod(ns) >= 64


def _relax(node, importer, target, constant=lambda name: None):
    """The fused TIR kernel where fused_kernel_applies and the spectrum is a constant, else the Monarch form."""
    x, spec = importer.env[node.args[0]], importer.env[node.args[1]]
    ns, groups, start, out_len = node.args[2:]
    dtype = node.args[0].meta["val"].dtype
    spec_value = constant(node.args[1].name)
    if spec_value is None or not fused_kernel_applies(spec_value.shape, ns, target):
        return monarch_conv(_relax_ops(importer.block_builder, importer.shape_of), x, spec, ns, groups, start,
                            out_len, dtype=dtype)
    return _fused_relax(importer.block_builder, importer.shape_of(x), x, spec_value, tuple(ns), start, out_len, dtype)


def _fused_relax(bb, shape, x, spec: torch.Tensor, ns: tuple[int, ...], start: int, out_len: int, dtype: torch.dtype):
    from tvm import relax, tirx
    from . import fft_kernel
    R = relax.op
    batch, channels, length = shape
    channels, length, n = int(channels), int(length), math.prod(ns)
    h = full_spectrum(spec, ns)                                                    # [C, N]
    even = channels + channels % 2                                                 # channels travel in pairs
    if even != channels:
        h = torch.cat([h, torch.zeros_like(h[:1])])
        x = bb.emit(R.nn.pad(x, [0, 0, 0, 1, 0, 0]))
    if dtype != torch.float32:
        x = bb.emit(R.astype(x, "float32"))
    static_batch = int(batch) if isinstance(batch, tirx.IntImm) else None
    name = f"fft_conv1d_dw_{even}x{length}_n{n}_{start}_{out_len}" + ("" if static_batch else "_b")
    func = fft_kernel.prim_func(static_batch, even, length, n, start, out_len, name)
    tw, _ = fft_kernel.twiddles(n)
    y = bb.emit(relax.call_tir(bb.add_func(func, name), [x, relax.const(fft_kernel.pair_spectra(h.numpy())),
                                                         relax.const(tw)],
                               relax.TensorType((batch, even, out_len), "float32")))
    if even != channels:
        y = bb.emit(R.strided_slice(y, axes=[1], begin=[0], end=[channels]))
    return y if dtype == torch.float32 else bb.emit(R.astype(y, str(dtype).removeprefix("torch.")))


@graphopt_op("fft_conv1d", fake=_fake, onnx=_onnx, relax=_relax)
def fft_conv1d(x: torch.Tensor, spec: torch.Tensor, ns: list[int], groups: int, start: int,
               out_len: int) -> torch.Tensor:
    n = math.prod(ns)
    h = _natural(spec, tuple(ns))                                          # [G, Co/G, Ci/G, N], weighted half
    xf = torch.fft.fft(x.double(), n=n)                                 # [B, Ci, N]
    xf = xf.reshape(x.shape[0], groups, 1, -1, n)                       # [B, G, 1, Ci/G, N]
    y = torch.fft.ifft((xf * h).sum(3), n=n).real                       # [B, G, Co/G, N]: Re IDFT(w·Ŷ)
    return y.reshape(x.shape[0], -1, n)[..., start:start + out_len].to(x.dtype).contiguous()
