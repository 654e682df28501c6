"""graphopt::bsr_linear — a linear whose weight is block-sparse with the same number of blocks per block row.

The weight [out, in] is cut into blocks of (block_h, block_w); block row r keeps k blocks at block columns
cols[r]. Stored packed: blocks [R, k·block_w, block_h] (block row r's kept blocks stacked along the input
axis, transposed), so each block row is one small dense GEMM over only the inputs it reads:

    xg = x viewed [N, in/block_w, block_w], gathered at cols → [N, R, k·block_w] → [R, N, k·block_w]
    y  = (xg @ blocks) → [R, N, block_h] → [N, R·block_h] (+ bias)

Neither ONNX Runtime nor TVM Relax has a block-sparse op (ORT's SparseToDenseMatMul is single-threaded
Eigen on COO/CSR; TVM's BSR kernels left with Relay), so this is written with ops both run well: Gather,
Transpose, a batched MatMul. The balanced layout (k per row) is what graphopt's block pruning makes; a
ragged pattern found in weights is padded to the largest row with zero blocks (`pack_bsr`)."""
from __future__ import annotations

import torch
from onnxscript import opset18 as op

from .registry import graphopt_op


def pack_bsr(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A dense [out, in] weight → (blocks [R, k·bw, bh], cols [R, k] int64, density of nonzero blocks).
    Rows with fewer nonzero blocks are padded with zero blocks (at columns not already used)."""
    bh, bw = block
    out_f, in_f = weight.shape
    rb, cb = out_f // bh, in_f // bw
    tiles = weight.reshape(rb, bh, cb, bw).permute(0, 2, 3, 1)            # [R, C, bw, bh]
    nonzero = tiles.reshape(rb, cb, -1).ne(0).any(-1)                      # [R, C]
    k = max(int(nonzero.sum(1).max()), 1)
    # nonzero blocks first (stable, by column), then zero ones to pad: the first k of each row
    order = torch.argsort((~nonzero).to(torch.int8) * cb + torch.arange(cb), dim=1)[:, :k]
    cols = order.sort(dim=1).values
    blocks = torch.gather(tiles, 1, cols[:, :, None, None].expand(rb, k, bw, bh)).reshape(rb, k * bw, bh)
    return blocks.contiguous(), cols.to(torch.int64), float(nonzero.float().mean())


def unpack_bsr(blocks: torch.Tensor, cols: torch.Tensor, in_features: int, block_w: int) -> torch.Tensor:
    """The dense [out, in] weight the packed form multiplies by."""
    rb, kbw, bh = blocks.shape
    k = kbw // block_w
    dense = blocks.new_zeros(rb, in_features // block_w, block_w, bh)
    dense.scatter_(1, cols[:, :, None, None].expand(rb, k, block_w, bh), blocks.reshape(rb, k, block_w, bh))
    return dense.permute(0, 3, 1, 2).reshape(rb * bh, in_features)


def _fake(x, blocks, cols, bias, in_features, block_w):
    return x.new_empty(*x.shape[:-1], blocks.shape[0] * blocks.shape[2])


def _onnx(x, blocks, cols, bias, in_features: int, block_w: int):
    shape = op.Shape(blocks)
    rb, kbw, bh = op.Slice(shape, [0], [1]), op.Slice(shape, [1], [2]), op.Slice(shape, [2], [3])
    xb = op.Reshape(x, op.Constant(value_ints=[-1, in_features // block_w, block_w]))   # [N, C, bw]
    xg = op.Gather(xb, cols, axis=1)                                                    # [N, R, k, bw]
    xg = op.Transpose(op.Reshape(xg, op.Concat(op.Constant(value_ints=[-1]), rb, kbw, axis=0)), perm=[1, 0, 2])
    y = op.Transpose(op.MatMul(xg, blocks), perm=[1, 0, 2])                              # [N, R, bh]
    lead = op.Slice(op.Shape(x), [0], [-1])
    y = op.Reshape(y, op.Concat(lead, op.Mul(rb, bh), axis=0))
    return y if bias is None else op.Add(y, bias)


def _relax(node, importer):
    from tvm import relax
    R = relax.op
    x, blocks, cols = (importer.env[a] for a in node.args[:3])
    bias = importer.env[node.args[3]] if node.args[3] is not None else None
    in_features, block_w = node.args[4], node.args[5]
    rb, kbw, bh = (int(d) for d in importer.shape_of(blocks))
    lead = list(importer.shape_of(x))[:-1]
    e = importer.block_builder.emit
    xb = e(R.reshape(x, (-1, in_features // block_w, block_w)))
    xg = e(R.take(xb, cols, axis=1))                                                     # [N, R, k, bw]
    xg = e(R.permute_dims(e(R.reshape(xg, (-1, rb, kbw))), [1, 0, 2]))
    y = e(R.permute_dims(e(R.matmul(xg, blocks)), [1, 0, 2]))
    y = e(R.reshape(y, (*lead, rb * bh)))
    return e(R.add(y, bias)) if bias is not None else y


@graphopt_op("bsr_linear", fake=_fake, onnx=_onnx, relax=_relax)
def bsr_linear(x: torch.Tensor, blocks: torch.Tensor, cols: torch.Tensor, bias: torch.Tensor | None,
               in_features: int, block_w: int) -> torch.Tensor:
    rb, kbw, bh = blocks.shape
    xb = x.reshape(-1, in_features // block_w, block_w)
    xg = xb[:, cols].reshape(-1, rb, kbw).transpose(0, 1)                                 # [R, N, k·bw]
    y = torch.bmm(xg, blocks).transpose(0, 1).reshape(*x.shape[:-1], rb * bh)
    return y if bias is None else y + bias
