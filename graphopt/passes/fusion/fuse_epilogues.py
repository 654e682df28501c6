"""Epilogue fusion: a conv or linear absorbs what follows it, so its output is written once.

    relu/relu6/sigmoid/tanh/hardsigmoid/silu/hardswish/gelu( conv2d(x, w, b) [+ residual] ) → graphopt::conv_act
    gelu(erf|tanh)/relu/silu/…( linear(x, w, b) )                                  → graphopt::linear_act

Legality is checked on the networkx view (ir/legality.py): every intermediate value must have the
chain as its only consumer, so no work is duplicated for another user and no cycle can form."""
from __future__ import annotations

import torch
import torch.fx as fx

from ...cost.clock import Decided
from ...errors import InputError
from ...ir import Graph, copy_graph, conv_args, fusion_blocker, is_call, linear_args, same_shape, tensor_meta, zero_pad_into
from ...ops.epilogue import ACTIVATIONS, unfused_onnx
from ..base import Pass, PassContext, PassResult, register

aten = torch.ops.aten
FUSED_MUST_WIN = 0.97     # fused conv epilogues are kept only at under 97% of the unfused model's time


def activation_of(node: fx.Node) -> str | None:
    """graphopt's activation name for an activation node (see ops/epilogue.py), else None."""
    t, a = node.target, node.args
    if t is aten.relu.default:
        return "relu"
    if t in (aten.hardtanh.default, aten.clamp.default) and list(a[1:3]) == [0, 6]:
        return "relu6"
    if t is aten.gelu.default:
        return "gelu_tanh" if node.kwargs.get("approximate", a[1] if len(a) > 1 else "none") == "tanh" else "gelu"
    return {aten.sigmoid.default: "sigmoid", aten.tanh.default: "tanh", aten.hardsigmoid.default: "hardsigmoid",
            aten.silu.default: "silu", aten.hardswish.default: "hardswish"}.get(t)


def _pair(v) -> list[int]:
    return list(v) * 2 if len(v) == 1 else list(v)


def _residual(node: fx.Node, producer: fx.Node) -> fx.Node | None:
    """z when node = producer + z (either order, alpha 1) with z of the producer's shape and dtype."""
    if node.target is not aten.add.Tensor or node.kwargs.get("alpha", 1) != 1:
        return None
    z = node.args[1] if node.args[0] is producer else node.args[0]
    if not isinstance(z, fx.Node) or z is producer or tensor_meta(z) is None:
        return None
    return z if same_shape(z, producer) and tensor_meta(z).dtype == tensor_meta(producer).dtype else None


@register
class FuseEpilogues(Pass):
    name = "fuse_epilogues"
    phase = "epilogue"
    summary = "fuse conv2d + bias + residual add + activation and linear + bias + activation into one op"

    def __init__(self, convs: str = "measure"):
        if convs not in ("measure", "always", "never"):
            raise InputError(f"FuseEpilogues(convs={convs!r}): 'measure', 'always' or 'never'")
        self.convs = convs   # conv epilogues: ONNX Runtime's own NCHWc path can beat FusedConv (target-dependent)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        convs, why = self.convs, None
        if convs == "measure":
            convs, why = self._measure(graph, ctx)
        result = self._fuse(graph, convs == "always")
        if why:
            result.notes.insert(0, why)
        return result

    def _measure(self, graph: Graph, ctx: PassContext) -> tuple[str, str | None]:
        """Fuse conv epilogues only where the whole model measures faster so on the target: on an AVX2 EPYC
        MobileNetV2 ran 64 ms fused against 57 ms with ORT's own NCHWc convs (an older ORT); on a Sapphire Rapids,
        at parity.
        ORT's own convs are the default, so fusing must win by more than the timing noise (FUSED_MUST_WIN). Nothing
        is timed where both forms lower alike (no FusedConv activation) or the backend compiles them alike (ORT 1.32
        makes FusedConv and Conv + Clip the same NCHWc convs): timing them could only measure noise."""
        if not graph.fx.find_nodes(op="call_function", target=aten.convolution.default):
            return "never", None              # no conv at all: nothing to decide, nothing to copy
        trials = {}
        for mode in ("always", "never"):
            trial = copy_graph(graph, share_weights=True)     # fusing rewires nodes, never a weight
            if not self._fuse(trial, mode == "always").stats.get("conv_fusions") and mode == "always":
                return "never", None          # no conv epilogue to fuse: nothing to decide
            trial.eliminate_dead_code()
            trial.tidy()
            trials[mode] = trial
        if ctx.cost.unmeasurable:
            return "always", f"conv epilogues fused without measuring ({ctx.cost.unmeasurable})"
        if ctx.cost.backend == "ort" and not any(ACTIVATIONS[n.args[8]][1] for n in trials["always"].fx.find_nodes(
                op="call_function", target=torch.ops.graphopt.conv_act.default)):
            return "always", ("conv epilogues fused without measuring: ONNX Runtime's FusedConv has none of their "
                              "activations, so both forms lower to Conv and the activation's ops")
        derived = {"never": unfused_onnx}            # one export: the unfused form is a rewrite of the fused one's
        if ctx.cost.compiled_alike(trials, ctx.example_args, ctx.example_kwargs, derived):
            return "never", (f"conv epilogues left to the backend: {ctx.cost.on} compiles them to the same kernels "
                             "as graphopt.conv_act's (its own fusions), so there was nothing to time")
        fused_wins = Decided("always", "never", FUSED_MUST_WIN)
        ms = ctx.cost.graphs_ms(trials, ctx.example_args, ctx.example_kwargs, stop=fused_wins, derived=derived)
        keep = "always" if fused_wins.keeps_first(ms) else "never"
        return keep, (f"conv epilogues {'fused' if keep == 'always' else 'left to the backend'}: the model measured "
                      f"{ms['always']:.5g} ms with graphopt.conv_act, {ms['never']:.5g} ms without, with {ctx.cost.on}")

    def _fuse(self, graph: Graph, convs: bool) -> PassResult:
        result = PassResult()
        view = None
        for node in self.nodes(graph, aten.convolution.default, aten.linear.default):
            if node.target is aten.convolution.default and not convs:
                continue
            reason = self._why_not_conv(node) if node.target is aten.convolution.default else None
            chain, z = [node], None
            if reason is None and node.target is aten.convolution.default:
                add = next((u for u in node.users if _residual(u, node) is not None), None)
                if add is not None:
                    chain, z = [node, add], _residual(add, node)
            act_node = next((u for u in chain[-1].users if activation_of(u)), None) if reason is None else None
            if act_node is None:
                if reason or z is not None:
                    result.skipped(f"%{node.name}: {reason or 'residual add without an activation'}")
                continue
            chain.append(act_node)
            view = view or graph.to_networkx()         # rebuilt after each rewrite (names change)
            blocker = fusion_blocker(view, [n.name for n in chain])
            if blocker:
                result.skipped(f"%{node.name}: {blocker}")
                continue
            act = activation_of(act_node)
            if node.target is aten.convolution.default:
                x, w, b, stride, padding, dilation, _, _, groups = conv_args(node)
                folded = zero_pad_into(node)
                (top, bottom), (left, right) = folded.pads if folded else [(p, p) for p in _pair(padding)]
                op_args = (folded.source if folded else x, w, b, z, _pair(stride), [top, left, bottom, right],
                           _pair(dilation), groups, act)
                self._replace(graph, chain, torch.ops.graphopt.conv_act.default, op_args)
                result.stats["conv_fusions"] = result.stats.get("conv_fusions", 0) + 1
                merged = ([folded.pad] if folded else []) + chain[1:]
                what = f"{'residual %' + z.name + ' + ' if z is not None else ''}{act} → graphopt.conv_act"
            else:
                self._replace(graph, chain, torch.ops.graphopt.linear_act.default, (*linear_args(node), act))
                merged, what = chain[1:], f"{act} → graphopt.linear_act"
            view = None
            result.did(f"%{node.name} + {what} (merged {', '.join('%' + n.name for n in merged)})")
        return result

    @staticmethod
    def _why_not_conv(node: fx.Node) -> str | None:
        _, w, _, stride, padding, dilation, transposed, _, groups = conv_args(node)
        if transposed:
            return "transposed convolution"
        if is_call(node.args[0], torch.ops.graphopt.dequantize.default):
            return "quantized: ONNX Runtime fuses it with its Q/DQ into QLinearConv"
        if tensor_meta(w).dim() != 4:
            return f"{tensor_meta(w).dim() - 2}-D convolution (conv_act covers 2-D)"
        if groups > 1:   # ORT runs a plain grouped Conv in its NCHWc kernels, which FusedConv forgoes
            return ("grouped/depthwise: ONNX Runtime's own NCHWc conv beats FusedConv on these (measured: "
                    "RepLKNet-style stage 21.7 vs 23.9 ms, MobileNetV2 3.67 vs 3.74 ms)")
        return None

    @staticmethod
    def _replace(graph: Graph, chain: list[fx.Node], op, args: tuple) -> None:
        last = chain[-1]
        fused = graph.call(op, args, before=last)
        last.replace_all_uses_with(fused)
        for n in reversed(chain):
            graph.fx.erase_node(n)
