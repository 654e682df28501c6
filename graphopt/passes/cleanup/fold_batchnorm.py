"""BatchNorm folding: an inference BatchNorm after a conv or linear becomes part of its weights.

    y = gamma * (W x + b - mean) / sqrt(var + eps) + beta
      = (W * s) x + ((b - mean) * s + beta),   s = gamma / sqrt(var + eps)

Computed in float64 and stored as new weights; the user's tensors are never written."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ...ir import Graph, conv_args
from ..base import Pass, PassContext, PassResult, register

aten = torch.ops.aten
BATCH_NORM = aten._native_batch_norm_legit_no_training.default


def _why_not(graph: Graph, bn: fx.Node) -> str | None:
    """None when `bn` can be folded into its producer, else the reason it cannot."""
    x, *params = bn.args[:5]
    if not isinstance(x, fx.Node) or x.target not in (aten.convolution.default, aten.linear.default):
        return f"input is {getattr(x, 'name', x)}, not a convolution or linear"
    if len(x.users) != 1:
        return f"%{x.name} is also used by {len(x.users) - 1} other node(s)"
    if any(u.target is not operator.getitem or (u.args[1] != 0 and u.users) for u in bn.users):
        return "the batch statistics outputs are used"
    weights = [x.args[1], x.args[2] if len(x.args) > 2 else None, *params]
    if any(w is not None and not graph.is_constant(w) for w in weights):
        return "weights or statistics are not constants"
    if x.target is aten.convolution.default and conv_args(x).transposed and conv_args(x).groups != 1:
        return "transposed convolution with groups > 1"
    if x.target is aten.linear.default and x.meta["val"].dim() != 2:
        return "linear output is not 2-D, so BatchNorm does not act on its features"
    return None


@register
class FoldBatchNorm(Pass):
    name = "fold_batchnorm"
    phase = "canonicalize"
    summary = "fold inference BatchNorm into the weights of the preceding conv/linear"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        for bn in list(graph.fx.find_nodes(op="call_function", target=BATCH_NORM)):
            reason = _why_not(graph, bn)
            if reason:
                result.skipped(f"%{bn.name}: {reason}")
                continue
            producer = bn.args[0]
            self._fold(graph, bn, producer)
            result.did(f"folded %{bn.name} into %{producer.name} ({producer.target.name()})")
        return result

    def _fold(self, graph: Graph, bn: fx.Node, producer: fx.Node) -> None:
        gamma, beta, mean, var = (None if a is None else graph.constant(a).double() for a in bn.args[1:5])
        eps = bn.args[6]
        w_node, b_node = producer.args[1], producer.args[2] if len(producer.args) > 2 else None
        w = graph.constant(w_node)
        scale = torch.rsqrt(var + eps) * (gamma if gamma is not None else 1.0)
        bias = graph.constant(b_node).double() if b_node is not None else torch.zeros_like(mean)
        new_bias = (bias - mean) * scale + (beta if beta is not None else 0.0)
        transposed = producer.target is aten.convolution.default and conv_args(producer).transposed
        shape = [1, -1] if transposed else [-1]
        new_w = w.double() * scale.reshape(shape + [1] * (w.dim() - len(shape)))

        args = list(producer.args) + [None] * (3 - len(producer.args))  # linear may omit its bias
        args[1] = graph.add_constant(new_w.to(w.dtype), f"{w_node.target}_bn_folded", before=producer)
        args[2] = graph.add_constant(new_bias.to(w.dtype), f"{w_node.target.removesuffix('weight')}bias_bn_folded",
                                     before=producer)
        producer.args = tuple(args)
        for user in list(bn.users):
            if user.args[1] == 0:
                user.replace_all_uses_with(producer)
            graph.fx.erase_node(user)
        graph.fx.erase_node(bn)
