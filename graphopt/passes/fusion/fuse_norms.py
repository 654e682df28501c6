"""Normalization fusion: LayerNorm and RMSNorm written out by hand become aten.layer_norm /
aten.rms_norm, one op each for every backend to lower with its own kernel.

    LayerNorm  d = x − mean(x);  d · rsqrt(mean(d²) + eps)  [· w [+ b]]
    RMSNorm    x · rsqrt(mean(x²) + eps)                     [· w]
(rsqrt may be written 1/sqrt or a division by sqrt; the mean is over the last dim, keepdim.)

Residual add + norm is deliberately left as two ops for ONNX Runtime: its fused
SkipLayerNormalization kernel measures several times slower than Add + LayerNormalization on
this project's CPU (see backends/ort_fusion_choice.py)."""
from __future__ import annotations

import torch
import torch.fx as fx

from ...ir import Graph, is_call, tensor_meta
from ..base import Pass, PassContext, PassResult, register

aten = torch.ops.aten



def _last_dim_mean(node) -> fx.Node | None:
    """z when node = mean(z, [-1], keepdim=True)."""
    if not is_call(node, aten.mean.dim):
        return None
    dims, keep = node.args[1], (node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
    rank = tensor_meta(node).dim()
    return node.args[0] if keep and [d % rank for d in dims] == [rank - 1] else None


def _square_of(node) -> fx.Node | None:
    if is_call(node, aten.pow.Tensor_Scalar) and node.args[1] == 2:
        return node.args[0]
    if is_call(node, aten.mul.Tensor) and node.args[0] is node.args[1]:
        return node.args[0]
    return None


def _normalizer(node) -> tuple[fx.Node, fx.Node, float] | None:
    """(x, z, eps) when node = x · rsqrt(mean(z²) + eps) in one of its spellings."""
    if is_call(node, aten.mul.Tensor):
        for x, r in (node.args, node.args[::-1]):
            if is_call(r, aten.rsqrt.default):
                inv = r.args[0]
            elif is_call(r, aten.reciprocal.default) and is_call(r.args[0], aten.sqrt.default):
                inv = r.args[0].args[0]
            else:
                continue
            found = _var_eps(inv)
            if found and isinstance(x, fx.Node):
                return (x, *found)
    if is_call(node, aten.div.Tensor) and is_call(node.args[1], aten.sqrt.default):
        found = _var_eps(node.args[1].args[0])
        if found:
            return (node.args[0], *found)
    return None


def _var_eps(node) -> tuple[fx.Node, float] | None:
    if not is_call(node, aten.add.Tensor, aten.add.Scalar) or not isinstance(node.args[1], (int, float)):
        return None
    z = _square_of(_last_dim_mean(node.args[0]))
    return (z, float(node.args[1])) if z is not None else None


def _affine(graph: Graph, node: fx.Node, n: int, with_bias: bool):
    """Fold a following per-feature scale (and shift) into the norm: (end node, weight, bias)."""
    weight = bias = None
    if len(node.users) == 1:
        (user,) = node.users
        if is_call(user, aten.mul.Tensor):
            other = user.args[1] if user.args[0] is node else user.args[0]
            if isinstance(other, fx.Node) and graph.is_constant(other) and tuple(tensor_meta(other).shape) == (n,):
                node, weight = user, other
    if with_bias and weight is not None and len(node.users) == 1:
        (user,) = node.users
        if is_call(user, aten.add.Tensor) and user.args[0] is node and isinstance(user.args[1], fx.Node) \
                and graph.is_constant(user.args[1]) and tuple(tensor_meta(user.args[1]).shape) == (n,):
            node, bias = user, user.args[1]
    return node, weight, bias


@register
class FuseNorms(Pass):
    name = "fuse_norms"
    phase = "rewrite"
    summary = "turn LayerNorm/RMSNorm written out as mean/var/rsqrt into aten.layer_norm / aten.rms_norm"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        for node in self.nodes(graph, aten.mul.Tensor, aten.div.Tensor):
            found = _normalizer(node)
            if found is None:
                continue
            x, z, eps = found
            if tensor_meta(x) is None or tensor_meta(x).dtype not in (torch.float32, torch.float16, torch.bfloat16):
                continue
            n = tensor_meta(x).shape[-1]
            if is_call(x, aten.sub.Tensor) and x is z and _last_dim_mean(x.args[1]) is x.args[0]:
                kind, source = "layer_norm", x.args[0]
            elif z is x:
                kind, source = "rms_norm", x
            else:
                result.skipped(f"%{node.name}: normalizes by a statistic of another tensor")
                continue
            if not isinstance(n, int):
                result.skipped(f"%{node.name}: normalized size is dynamic")
                continue
            end, weight, bias = _affine(graph, node, n, with_bias=kind == "layer_norm")
            args = (source, [n], weight, bias, eps) if kind == "layer_norm" else (source, [n], weight, eps)
            end.replace_all_uses_with(graph.call(getattr(aten, kind).default, args, before=end))
            affine = "with scale and shift" if bias is not None else "with scale" if weight is not None else "no affine"
            result.did(f"%{end.name}: written-out {kind} over %{source.name} (eps {eps:g}, {affine}) → aten.{kind}")
        return result
