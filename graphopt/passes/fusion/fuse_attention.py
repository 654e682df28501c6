"""Attention fusion: scaled-dot-product attention with its multi-head reshape/transpose folded in
becomes one graphopt::attention (ONNX's Attention, opset 23, on the ORT backend).

Two rules, run in order:
  1. written-out attention  softmax(q·kᵀ · scale [+ mask]) · v  →  aten.scaled_dot_product_attention
  2. SDPA whose q/k/v are head splits  permute(reshape(X, [B,S,H,D]), [0,2,1,3])  and whose output
     is merged back the same way  →  graphopt::attention(Xq, Xk, Xv, bias) on [B, S, H·D].
Inputs that are not head splits (rotary embeddings applied in [B,H,S,D]) are flattened back with
a transpose; a constant mask that is exactly the causal mask becomes the kernel's causal flag;
every candidate left alone is reported with the reason."""
from __future__ import annotations

import torch
import torch.fx as fx

from ...ir import Graph, is_call, sdpa_args, tensor_meta
from ...ops import attention as attention_op
from ..base import Pass, PassContext, PassResult, register

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default



def _static(*dims) -> bool:
    return all(isinstance(d, int) for d in dims)


# --- rule 1: written-out attention → SDPA ------------------------------------------------------
def _transposed_last_two(node) -> fx.Node | None:
    """k when node is kᵀ over the last two dims (transpose or permute)."""
    if is_call(node, aten.transpose.int):
        rank = tensor_meta(node).dim()
        if sorted(d % rank for d in node.args[1:3]) == [rank - 2, rank - 1]:
            return node.args[0]
    if is_call(node, aten.permute.default):
        perm = list(node.args[1])
        if perm == list(range(len(perm) - 2)) + [len(perm) - 1, len(perm) - 2]:
            return node.args[0]
    return None


def match_written_out(out: fx.Node) -> tuple[dict, str | None]:
    """For `out = matmul(softmax(...), v)`: the SDPA arguments, or the reason there is no match."""
    if not is_call(out, aten.matmul.default, aten.bmm.default):
        return {}, "not a matmul"
    probs, v = out.args
    if not is_call(probs, aten._softmax.default, aten.softmax.int) or probs.args[1] not in (-1, tensor_meta(probs).dim() - 1):
        return {}, "first operand is not a softmax over the last dim"
    x, mask, scale = probs.args[0], None, 1.0
    if is_call(x, aten.add.Tensor) and isinstance(x.args[1], fx.Node) and len(x.users) == 1:
        x, mask = x.args
    if is_call(x, aten.mul.Tensor, aten.div.Tensor) and isinstance(x.args[1], (int, float)) and len(x.users) == 1:
        scale = x.args[1] if x.target is aten.mul.Tensor else 1.0 / x.args[1]
        x = x.args[0]
    if not is_call(x, aten.matmul.default, aten.bmm.default) or len(x.users) != 1:
        return {}, "softmax input is not q·kᵀ (optionally scaled and masked)"
    q, kt = x.args
    k = _transposed_last_two(kt)
    if k is None:
        return {}, "second operand of q·kᵀ is not a transpose of the last two dims"
    if tensor_meta(q).dim() != 4:
        return {}, f"q has rank {tensor_meta(q).dim()}, expected [batch, heads, seq, head_dim]"
    return {"q": q, "k": k, "v": v, "mask": mask, "scale": float(scale)}, None


# --- rule 2: SDPA + head split/merge → graphopt::attention -------------------------------------
def _head_split_source(node: fx.Node) -> fx.Node | None:
    """X when node = permute(reshape(X, [B, S, H, D]), [0, 2, 1, 3]) and X is [B, S, H·D]."""
    if not is_call(node, aten.permute.default) or list(node.args[1]) != [0, 2, 1, 3]:
        return None
    split = node.args[0]
    if not is_call(split, aten.reshape.default):
        return None
    x, xv, sv = split.args[0], tensor_meta(split.args[0]), tensor_meta(split)
    if xv is None or xv.dim() != 3 or sv.dim() != 4 or [str(d) for d in xv.shape[:2]] != [str(d) for d in sv.shape[:2]]:
        return None
    return x


def _head_merge_target(out: fx.Node) -> fx.Node | None:
    """R when out's only consumer is permute(out, [0, 2, 1, 3]) → (copy →) R = reshape to [B, S, H·D]."""
    if len(out.users) != 1:
        return None
    (perm,) = out.users
    if not is_call(perm, aten.permute.default) or list(perm.args[1]) != [0, 2, 1, 3] or len(perm.users) != 1:
        return None
    (merge,) = perm.users
    if is_call(merge, aten.clone.default) and len(merge.users) == 1:   # .contiguous() before the reshape
        (merge,) = merge.users
    if not is_call(merge, aten.reshape.default) or tensor_meta(merge).dim() != 3:
        return None
    return merge


def why_not_fusable(node: fx.Node) -> str | None:
    a = sdpa_args(node)
    q, k, v = (tensor_meta(getattr(a, n)) for n in ("query", "key", "value"))
    if any(t is None or t.dim() != 4 for t in (q, k, v)):
        return "q, k, v are not 4-D [batch, heads, seq, head_dim]"
    if a.dropout_p:
        return f"dropout_p={a.dropout_p} (inference graphs should have none)"
    if a.enable_gqa or str(k.shape[1]) != str(q.shape[1]) or str(v.shape[1]) != str(q.shape[1]):
        return f"grouped-query attention ({k.shape[1]} k/v heads for {q.shape[1]} query heads)"
    if not _static(q.shape[1], q.shape[3], v.shape[3]):
        return "head count or head size is dynamic"
    if a.is_causal and str(q.shape[2]) != str(k.shape[2]):
        return "causal attention with different query and key lengths"
    mask = a.attn_mask
    if mask is not None:
        m = tensor_meta(mask)
        if m.dtype not in (torch.bool, q.dtype):
            return f"mask dtype {m.dtype} is neither bool nor the query's {q.dtype}"
        shape = [1] * (4 - m.dim()) + list(m.shape)
        want = [q.shape[0], q.shape[1], q.shape[2], k.shape[2]]
        for i, (d, w) in enumerate(zip(shape, want)):
            if str(d) != str(w) and d != 1:
                return f"mask dim {i} is {d}, expected 1 or {w}"
            if i >= 2 and d == 1 and not _static(w):
                return "mask must be expanded over a dynamic sequence length"
    return None


def _to_bsh(graph: Graph, t: fx.Node, before: fx.Node) -> fx.Node:
    """[B, H, S, D] → [B, S, H·D]: the head split's source when t is one, else a transpose + flatten."""
    src = _head_split_source(t)
    if src is not None:
        return src
    p = graph.call(aten.permute.default, (t, [0, 2, 1, 3]), before=before)
    return graph.call(aten.flatten.using_ints, (p, 2, 3), before=before)


def constant_mask_kind(graph: Graph, mask: fx.Node | None) -> str | None:
    """"none" for a constant bool mask that masks nothing, "causal" for one that is exactly the
    lower-triangular causal mask (every batch and head); else None."""
    if mask is None or not graph.is_constant(mask) or tensor_meta(mask).dtype != torch.bool:
        return None
    m = graph.constant(mask)
    if bool(m.all()):
        return "none"
    s, t = m.shape[-2:]
    if s == t and torch.equal(m, torch.ones(s, t, dtype=torch.bool).tril().expand_as(m)):
        return "causal"
    return None


def _bias(graph: Graph, mask: fx.Node | None, q: torch.Tensor, k: torch.Tensor, before: fx.Node) -> fx.Node | None:
    """SDPA's mask as an additive float bias of shape [B|1, H|1, S, T]; None when it masks nothing
    beyond causality (see constant_mask_kind)."""
    if mask is None or constant_mask_kind(graph, mask):
        return None
    m = tensor_meta(mask)
    shape = [1] * (4 - m.dim()) + list(m.shape)
    shape[2:] = [q.shape[2], k.shape[2]]
    node = mask
    if m.dtype == torch.bool:
        zeros = graph.call(aten.zeros_like.default, (node,), {"dtype": q.dtype}, before=before)
        node = graph.call(aten.where.ScalarOther, (node, zeros, float("-inf")), before=before)
    if list(tensor_meta(node).shape) != shape:
        node = graph.call(aten.reshape.default, (node, [1] * (4 - m.dim()) + list(m.shape)), before=before)
        node = graph.call(aten.expand.default, (node, shape), before=before)
    return node


@register
class FuseAttention(Pass):
    name = "fuse_attention"
    phase = "rewrite"
    summary = "fuse q·kᵀ→scale→mask→softmax→·v and SDPA with head split/merge into graphopt::attention"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        for node in self.nodes(graph, aten._softmax.default, aten.softmax.int):          # rule 1
            consumers = [u for u in node.users if is_call(u, aten.matmul.default, aten.bmm.default)]
            if len(consumers) != 1 or len(node.users) != 1:
                result.skipped(f"%{node.name}: softmax is not consumed by exactly one matmul")
                continue
            found, reason = match_written_out(consumers[0])
            if reason:
                result.skipped(f"%{node.name}: written-out attention not recognised: {reason}")
                continue
            self._to_sdpa(graph, consumers[0], found)
            result.did(f"%{consumers[0].name}: written-out attention (softmax %{node.name}) → SDPA")
        for node in self.nodes(graph, SDPA):   # rule 2
            reason = why_not_fusable(node)
            if reason:
                result.skipped(f"%{node.name}: {reason}")
                continue
            result.did(self._fuse(graph, node))
        return result

    @staticmethod
    def _to_sdpa(graph: Graph, out: fx.Node, m: dict) -> None:
        sdpa = graph.call(SDPA, (m["q"], m["k"], m["v"], m["mask"]), {"scale": m["scale"]}, before=out)
        out.replace_all_uses_with(sdpa)

    @staticmethod
    def _fuse(graph: Graph, node: fx.Node) -> str:
        a = sdpa_args(node)
        q, k, v = (tensor_meta(getattr(a, n)) for n in ("query", "key", "value"))
        heads, head_dim = q.shape[1], q.shape[3]
        scale = a.scale if a.scale is not None else attention_op.default_scale(head_dim)
        inputs = [_to_bsh(graph, getattr(a, n), node) for n in ("query", "key", "value")]
        folded = sum(_head_split_source(getattr(a, n)) is not None for n in ("query", "key", "value"))
        causal = bool(a.is_causal) or constant_mask_kind(graph, a.attn_mask) == "causal"
        bias = _bias(graph, a.attn_mask, q, k, node)
        merge = _head_merge_target(node)
        fused = graph.call(torch.ops.graphopt.attention.default, (*inputs, bias, heads, float(scale), causal),
                           before=node)
        if merge is not None:
            merge.replace_all_uses_with(fused)
        else:
            heads_split = graph.call(aten.unflatten.int, (fused, 2, [heads, v.shape[3]]), before=node)
            node.replace_all_uses_with(graph.call(aten.permute.default, (heads_split, [0, 2, 1, 3]), before=node))
        mask_note = (f"mask as additive bias %{bias.name}" if bias is not None else
                     "constant causal mask → causal kernel" if causal and not a.is_causal else "no mask")
        return (f"%{node.name} → graphopt.attention ({heads} heads × {head_dim}, {folded}/3 head splits folded, "
                f"{'merge folded' if merge is not None else 'merge kept'}, {mask_note}"
                f"{', causal' if causal else ''})")
