"""graphopt::fft_conv2d — a large-kernel depthwise 2-D convolution computed in the frequency domain.

    y[b, c] = (x[b, c] ⊛ h[c])[hs : hs + out_h, ws : ws + out_w]        x: [B, C, H, W] real

with ⊛ the circular convolution of period (Nh, Nw), x zero-padded to it; the rewrite picks a
period at which the kept window is the linear convolution. Large-kernel vision blocks (RepLKNet's
31×31, SLaK's 51×51) are depthwise, so this op is.

At these sizes (Nh, Nw of tens to a few hundred) the DFT along each axis is one plain matrix
multiply: no power-of-two sizes, no Monarch split (fft_conv1d's lowering needs that split for
lengths in the thousands). With Mw = Nw//2 + 1 (x is real, so half the W spectrum suffices):

    Z  = x @ [FWr | FWi]                [Nh, 2Mw]    rfft along W
    Q  = [FHr; FHi] @ Z                 [2Nh, 2Mw]   the four real blocks of FH·Z
    Ŷ  = Σ_blocks Q ⊙ K                 [2, Nh, Mw]  spectrum product; K (computed at compile time)
                                                     holds ĥ's ± parts per block, so X̂ = FH·Z is never formed
    E  = [[Gr, −Gi], [Gi, Gr]] @ Ŷ      [2·out_h, Mw] inverse DFT along H, output rows only (G = conj FH / Nh)
    y  = Σ_re,im E @ [Cr; Ci]           [out_h, out_w] c2r along W, output columns only

`spec` is K: [C, 2 (Ŷ re/im), 2 (FHr/FHi block), Nh, 2 (Zr/Zi block), Mw]."""
from __future__ import annotations

from functools import cache

import numpy as np
import torch

from .fft_conv import _onnx_ops, _relax_ops, onnx_dtype
from .registry import graphopt_op


def spectrum2d(h: torch.Tensor, nh: int, nw: int) -> torch.Tensor:
    """Kernels h [C, Kh, Kw] → the block spectrum K [C, 2, 2, Nh, 2, Mw] the lowering multiplies by."""
    f = torch.fft.rfft2(h.double(), s=(nh, nw))                             # [C, Nh, Mw]
    kr, ki = f.real, f.imag
    # Ŷr = Q00·kr − Q01·ki − Q10·ki − Q11·kr ;  Ŷi = Q00·ki + Q01·kr + Q10·kr − Q11·ki   (Qab = FH_a · Z_b)
    re = torch.stack([torch.stack([kr, -ki], 2), torch.stack([-ki, -kr], 2)], 1)   # [C, a, Nh, b, Mw]
    im = torch.stack([torch.stack([ki, kr], 2), torch.stack([kr, -ki], 2)], 1)
    return torch.stack([re, im], 1).float()


@cache
def _dft2_constants(nh: int, nw: int, hs: int, out_h: int, ws: int, out_w: int) -> dict[str, np.ndarray]:
    mw = nw // 2 + 1
    ang = lambda a, b, m: 2 * np.pi * np.outer(a, b) / m   # noqa: E731
    fw = ang(np.arange(nw), np.arange(mw), nw)                                # [Nw, Mw]
    fh = ang(np.arange(nh), np.arange(nh), nh)                                # [Nh, Nh]
    g = ang(np.arange(hs, hs + out_h), np.arange(nh), nh)                     # output rows × Nh
    gr, gi = np.cos(g) / nh, np.sin(g) / nh                                   # conj(FH) / Nh
    weight = np.where((np.arange(mw) == 0) | (2 * np.arange(mw) == nw), 1.0, 2.0) / nw   # c2r: both halves
    c = ang(np.arange(mw), np.arange(ws, ws + out_w), nw)                     # [Mw, out_w]
    f = lambda a: np.ascontiguousarray(a, dtype=np.float32)   # noqa: E731
    return {
        "w_fwd": f(np.concatenate([np.cos(fw), -np.sin(fw)], 1)),            # [Nw, 2Mw]
        "h_fwd": f(np.concatenate([np.cos(fh), -np.sin(fh)], 0)),            # [2Nh, Nh]
        "h_inv": f(np.block([[gr, -gi], [gi, gr]])),                          # [2·out_h, 2Nh]
        "w_inv": f(np.stack([weight[:, None] * np.cos(c), -weight[:, None] * np.sin(c)])),  # [2, Mw, out_w]
    }


def dft2_conv(ops, x, spec, nh: int, nw: int, hs: int, out_h: int, ws: int, out_w: int, dtype=torch.float32):
    """The lowering, written once over fft_conv1d's op vocabularies (torch, onnxscript, Relax)."""
    c = {k: ops.const(v) for k, v in _dft2_constants(nh, nw, hs, out_h, ws, out_w).items()}
    mw = nw // 2 + 1
    if dtype != torch.float32:
        x = ops.cast(x, torch.float32)
    z = ops.matmul(ops.pad_tail(x, (nh, nw), 4), c["w_fwd"])                  # [B, C, Nh, 2Mw]
    q = ops.reshape(ops.matmul(c["h_fwd"], z), (0, 0, 1, 2, nh, 2, mw))      # [B, C, 1, a, Nh, b, Mw]
    p = ops.reduce_sum(ops.mul(q, spec), (3, 5))                              # [B, C, 2, Nh, Mw]
    e = ops.matmul(c["h_inv"], ops.reshape(p, (0, 0, 2 * nh, mw)))            # [B, C, 2·out_h, Mw]
    y = ops.reduce_sum(ops.matmul(ops.reshape(e, (0, 0, 2, out_h, mw)), c["w_inv"]), (2,))
    return y if dtype == torch.float32 else ops.cast(y, dtype)


def _fake(x, spec, nh, nw, hs, out_h, ws, out_w):
    return x.new_empty((x.shape[0], x.shape[1], out_h, out_w))


def _onnx(x, spec, nh: int, nw: int, hs: int, out_h: int, ws: int, out_w: int):
    return dft2_conv(_onnx_ops(), x, spec, nh, nw, hs, out_h, ws, out_w, onnx_dtype(x))


def _relax(node, importer):
    x, spec = importer.env[node.args[0]], importer.env[node.args[1]]
    dtype = node.args[0].meta["val"].dtype
    return dft2_conv(_relax_ops(importer.block_builder, importer.shape_of), x, spec, *node.args[2:], dtype=dtype)


@graphopt_op("fft_conv2d", fake=_fake, onnx=_onnx, relax=_relax)
def fft_conv2d(x: torch.Tensor, spec: torch.Tensor, nh: int, nw: int, hs: int, out_h: int, ws: int,
               out_w: int) -> torch.Tensor:
    kr = spec[:, 0, 0, :, 0].double()                                       # the Q00 coefficients are ĥ itself
    ki = spec[:, 1, 0, :, 0].double()
    y = torch.fft.irfft2(torch.fft.rfft2(x.double(), s=(nh, nw)) * torch.complex(kr, ki), s=(nh, nw))
    return y[..., hs:hs + out_h, ws:ws + out_w].to(x.dtype).contiguous()

