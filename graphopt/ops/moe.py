"""graphopt::moe_experts — a mixture-of-experts layer's experts: each token through the k experts its router
chose, their outputs summed with the router's weights.

Reference: the routed form, one (token, choice) pair at a time through that expert's weights (the semantics, as
transformers' batched_mm writes it). ONNX Runtime and Relax: the dense form — every expert on every token as two
batched GEMMs, combined with the routing weights spread over a [tokens, experts] matrix (zero where an expert was not
chosen). It does E/k times the routed form's multiply-adds, in whole GEMMs with no data-dependent shapes; the routed
form's gather of one weight matrix per token moves far more memory on a CPU, and a sorted grouped GEMM needs
data-dependent shapes (ONNX Runtime's com.microsoft.MoE runs only fused gate/up weights with its own routing on the
CPU; see README)."""
from __future__ import annotations

import torch
from onnxscript import opset18 as op

from .epilogue import ACTIVATIONS, _onnx_act, _relax_act
from .registry import graphopt_op


def _fake(x, index, weights, up, down, up_bias, down_bias, act, gated):
    return torch.empty_like(x)


def _onnx(x, index, weights, up, down, up_bias, down_bias, act: str, gated: bool):
    h = op.MatMul(op.Unsqueeze(x, [0]), op.Transpose(up, perm=[0, 2, 1]))             # [E, T, U]
    if up_bias is not None:
        h = op.Add(h, op.Unsqueeze(up_bias, [1]))
    if gated:
        gate, lin = op.Split(h, axis=-1, num_outputs=2)
        h = op.Mul(_onnx_act(gate, act), lin)
    else:
        h = _onnx_act(h, act)
    y = op.MatMul(h, op.Transpose(down, perm=[0, 2, 1]))                                # [E, T, H]
    if down_bias is not None:
        y = op.Add(y, op.Unsqueeze(down_bias, [1]))
    experts = op.Range(op.Constant(value_int=0), op.Gather(op.Shape(up), 0), op.Constant(value_int=1))
    chosen = op.CastLike(op.Equal(op.Unsqueeze(index, [-1]), experts), weights)        # [T, k, E]
    routing = op.ReduceSum(op.Mul(chosen, op.Unsqueeze(weights, [-1])), [1], keepdims=0)   # [T, E]
    per_expert = op.Unsqueeze(op.Transpose(op.CastLike(routing, y), perm=[1, 0]), [-1])     # [E, T, 1]
    return op.ReduceSum(op.Mul(y, per_expert), [0], keepdims=0)


def _relax(node, importer):
    from tvm import relax
    R = relax.op
    x, index, weights, up, down, up_bias, down_bias = (importer.env[a] if a is not None else None
                                                       for a in node.args[:7])
    act, gated = node.args[7], node.args[8]
    bb = importer.block_builder
    experts = int(node.args[3].meta["val"].shape[0])
    h = bb.emit(R.matmul(R.expand_dims(x, 0), R.permute_dims(up, [0, 2, 1])))          # [E, T, U]
    if up_bias is not None:
        h = bb.emit(R.add(h, R.expand_dims(up_bias, 1)))
    if gated:
        halves = bb.emit(R.split(h, 2, axis=-1))
        h = bb.emit(R.multiply(_relax_act(bb, bb.emit(relax.TupleGetItem(halves, 0)), act),
                               bb.emit(relax.TupleGetItem(halves, 1))))
    else:
        h = _relax_act(bb, h, act)
    y = bb.emit(R.matmul(h, R.permute_dims(down, [0, 2, 1])))                            # [E, T, H]
    if down_bias is not None:
        y = bb.emit(R.add(y, R.expand_dims(down_bias, 1)))
    ids = relax.const(torch.arange(experts).numpy().astype(str(node.args[1].meta["val"].dtype)[len("torch."):]))
    chosen = R.astype(R.equal(R.expand_dims(index, -1), ids), weights.ty.dtype)            # [T, k, E]
    routing = bb.emit(R.sum(R.multiply(chosen, R.expand_dims(weights, -1)), axis=[1]))      # [T, E]
    per_expert = R.expand_dims(R.permute_dims(R.astype(routing, y.ty.dtype), [1, 0]), -1)  # [E, T, 1]
    return bb.emit(R.sum(R.multiply(y, per_expert), axis=[0]))


@graphopt_op("moe_experts", fake=_fake, onnx=_onnx, relax=_relax)
def moe_experts(x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                up_bias: torch.Tensor | None, down_bias: torch.Tensor | None, act: str, gated: bool) -> torch.Tensor:
    """x [tokens, hidden]; index, weights [tokens, k] (the router's choices); up [experts, U, hidden] (U = 2 ×
    intermediate when `gated`: gate rows first, then up rows), down [experts, hidden, intermediate]; biases per
    expert or None; act names an activation of ops/epilogue.py (applied to the gate half when `gated`)."""
    tokens, k = index.shape
    token = torch.arange(tokens, device=x.device).repeat_interleave(k)
    expert = index.reshape(-1)
    h = torch.bmm(up[expert], x[token].unsqueeze(-1)).squeeze(-1)                         # [T·k, U]
    if up_bias is not None:
        h = h + up_bias[expert]
    fn = ACTIVATIONS[act][0]
    if gated:
        gate, lin = h.chunk(2, dim=-1)
        h = fn(gate) * lin
    else:
        h = fn(h)
    y = torch.bmm(down[expert], h.unsqueeze(-1)).squeeze(-1)                             # [T·k, hidden]
    if down_bias is not None:
        y = y + down_bias[expert]
    return (y * weights.reshape(-1, 1).to(y.dtype)).reshape(tokens, k, -1).sum(1).to(x.dtype)
