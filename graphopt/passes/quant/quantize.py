"""Quantization lowering: convs and linears to int8 (static or dynamic) or int4 weight-only.

A plan maps each layer (a conv or linear with constant weights) to "float", "int8" (static: weights
per output channel, activations calibrated), "int8-dynamic" (linears: activations quantized at run
time) or "int4" (linears: 4-bit block-wise weights). Static int8 inserts the QDQ form ONNX Runtime
turns into integer kernels:

    x → Q → DQ ─┐
    w_int8 → DQ ─┼→ conv → (relu) → Q → DQ → next conv / residual add / max-pool
    b_int32 → DQ ┘

Residual adds between quantized convs, and the max-pools and zero pads between them, are quantized
too, so whole blocks stay integer (ORT: QLinearConv → QLinearAdd → uint8 MaxPool, all NHWC).
Softmax, norms, attention and everything else stay float. The float bias absorbs the mean shift
the weight rounding causes (bias correction, measured on the calibration data), and a linear's
outlier input channels move into its weights first (SmoothQuant)."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from ...cost.probes import SHIFT
from ...errors import InputError
from ...ir import Graph, conv_args, is_call, linear_args, tensor_meta, zero_pad_into
from ...ops import quant
from ..base import Pass, PassContext, PassResult, register
from ..calibration import observe
from ...numerics import sqnr_db
from .layers import (CONV, LINEAR, MODES, QuantOptions, activation_qparams, layer_name, quantize_weight, uniform_plan,
                     weight_max)
from .observers import Observer
from .smooth import smooth

aten = torch.ops.aten
gop = torch.ops.graphopt
ADD, PAD = aten.add.Tensor, aten.constant_pad_nd.default
# ops that do not change a tensor's range: their output reuses their input's quantization
PASS_THROUGH = (aten.max_pool2d_with_indices.default, PAD)
ACTIVATIONS = (aten.relu.default, aten.hardtanh.default, aten.clamp.default)


@register
class Quantize(Pass):
    name = "quantize"
    phase = "lossy"
    summary = "lower convs/linears to int8 (static QDQ or dynamic) or int4 weight-only, per a plan"
    lossy = True

    def __init__(self, mode: str = "int8-dynamic", options: QuantOptions | None = None,
                 plan: dict[str, str] | None = None):
        if mode not in MODES:
            raise InputError(f"quantize={mode!r}: choose one of {', '.join(MODES)} or 'auto'")
        self.mode, self.options, self.plan = mode, options or QuantOptions(), plan

    @property
    def needs_calibration(self) -> bool:
        return "int8" in (self.plan.values() if self.plan else [MODES[self.mode]])

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        plan = self.plan or uniform_plan(graph, MODES[self.mode], self.options.keep_float)
        nodes = {n.name: n for n in graph.ops()}
        chosen = {name: m for name, m in plan.items() if m != "float" and name in nodes}
        for name, m in plan.items():
            if m == "float" and name in nodes:
                result.skipped(f"%{name} ({layer_name(nodes[name])}): kept in float by the plan")
        self.qmax, why = weight_max(self.options, ctx) if {"int8", "int8-dynamic"} & set(chosen.values()) else (127, None)
        if why:
            result.notes.append(why)
        static = [nodes[n] for n, m in chosen.items() if m == "int8"]
        if static:
            self._static(graph, ctx, static, result)
        for name, m in chosen.items():
            if m in ("int8-dynamic", "int4"):
                node = nodes[name]
                if node.target is not LINEAR:
                    result.skipped(f"%{name}: {m} covers linears only")
                    continue
                self._weight_only(graph, node, m)
                result.did(f"%{name} ({layer_name(node)}) → {m}")
        return result

    # --- int8 dynamic / int4 weight-only: one op per linear -------------------------------------
    def _weight_only(self, graph: Graph, node: fx.Node, mode: str) -> None:
        x, w_node, b_node = linear_args(node)
        w = graph.constant(w_node).float()
        name = w_node.target
        if mode == "int8-dynamic":
            w_q, scale, _ = quantize_weight(w, self.qmax)
            args = (x, graph.add_constant(w_q.t().contiguous(), f"{name}_int8", before=node),
                    graph.add_constant(scale, f"{name}_scale", before=node), b_node)
            op = gop.dynamic_linear.default
        else:
            packed, scales, zps = quant.pack_int4(w)
            args = (x, *(graph.add_constant(t, f"{name}_{s}", before=node)
                         for t, s in ((packed, "int4"), (scales, "scales"), (zps, "zero_points"))),
                    b_node, w.shape[1], quant.INT4_BLOCK)
            op = gop.int4_linear.default
        new = graph.call(op, args, before=node)
        node.replace_all_uses_with(new)
        graph.fx.erase_node(node)

    # --- int8 static: QDQ around layers, residual adds and the pools/pads between them -----------
    def _static(self, graph: Graph, ctx: PassContext, layer_nodes: list[fx.Node], result: PassResult) -> None:
        batches = ctx.calibration
        if not batches:
            raise InputError("static int8 quantization needs calibration data: pass calibration=[batch, ...] "
                             "(a few representative inputs), or use quantize='int8-dynamic'")
        for pad in _fold_zero_pads(layer_nodes):
            result.did(f"%{pad}: zero pad folded into the conv's own padding")
        linears = [n for n in layer_nodes if n.target is LINEAR]
        if linears and self.options.smooth is not None:
            for note in smooth(graph, batches, linears, self.options.smooth):
                result.did(note)
        quantized = set(layer_nodes)
        quantized |= _residual_adds(graph, quantized)
        quantized |= _pass_throughs(graph, quantized)
        quantized = [n for n in graph.fx.nodes if n in quantized]   # graph order: stable names and notes
        tensors = _quantized_tensors(quantized)
        ends = _unquantized_ends(quantized, tensors)
        tensors += ends

        weights = {n: quantize_weight(graph.constant(n.args[1]).float(), self.qmax) for n in layer_nodes}
        qparams, shift = self._calibrate(graph, batches, tensors, weights)
        x_scale = {n: qparams[n.args[0]][0] for n in layer_nodes}
        _rewire(graph, quantized, tensors, ends, qparams, result)
        rows = []
        for n in layer_nodes:
            gemm_path, why = _gemm_path(n, ctx, self.qmax) if n.target is CONV and self.options.kernel_choice \
                else (False, None)
            if gemm_path:
                q, s, _ = weights[n]
                weights[n] = ((q.to(torch.int16) + SHIFT).to(torch.int8), s, torch.full_like(q[:, 0, 0, 0], SHIFT))
            if why:
                result.notes.append(f"%{n.name}: weights given zero point {SHIFT if gemm_path else 0}: {why}")
            w, (q, s, z) = graph.constant(n.args[1]).float(), weights[n]
            per_channel = (-1,) + (1,) * (w.dim() - 1)
            rows.append([f"%{n.name} ({layer_name(n)})", "conv" if n.target is CONV else "linear",
                         "im2col + int8 GEMM" if gemm_path else "symmetric kernel" if n.target is CONV else "-",
                         sqnr_db(w, s.reshape(per_channel) * (q.float() - z.float().reshape(per_channel))),
                         x_scale[n].item(), why or ""])
            self._quantize_layer(graph, n, weights[n], x_scale[n], shift.get(n))
            kind = "conv" if n.target is CONV else "linear"
            result.did(f"%{n.name} ({layer_name(n)}) → int8 {kind}, per-channel weights"
                       + (", bias corrected" if n in shift else ""))
        result.table("int8 layers: weight SQNR (per-channel rounding), input scale, ORT conv path and why",
                     ["layer", "kind", "int8 path", "weight SQNR dB", "input scale", "path measured"], rows,
                     bars=("weight SQNR dB",), unit="")
        result.stats.update(quantized_layers=len(layer_nodes), quantized_tensors=len(tensors))

    def _calibrate(self, graph: Graph, batches, tensors: list[fx.Node], weights: dict) -> tuple[dict, dict]:
        """Activation (scale, zero point) per quantized tensor, and per layer the mean output shift its
        weight rounding causes (bias correction), both measured on the calibration batches."""
        shift = {}

        def on_node(n, args, _out):
            if n in weights and self.options.bias_correction:
                dw = quant.dequantize(*weights[n], 0) - graph.constant(n.args[1]).float()
                d = _layer(n, args[0], dw)
                dims = [0] + list(range(2, d.dim())) if n.target is CONV else list(range(d.dim() - 1))
                shift.setdefault(n, []).append(d.mean(dims))
        observers = observe(graph, batches, tensors, on_node, Observer)
        qparams: dict[fx.Node, tuple] = {}
        sym, wanted = self.options.symmetric_activations, set(tensors)
        for t in graph.fx.nodes:   # topological: a pass-through's input is settled before it
            if t in wanted:
                src = _range_source(t, wanted)
                qparams[t] = qparams[src] if src is not t else activation_qparams(
                    observers[t.name].range(self.options.observer, not sym), sym)
        return qparams, {n: torch.stack(v).mean(0) for n, v in shift.items()}

    def _quantize_layer(self, graph: Graph, n: fx.Node, weight, x_scale, shift) -> None:
        w_q, w_scale, w_zp = weight
        name = n.args[1].target
        consts = [graph.add_constant(v, f"{name}_{k}", before=n) for v, k in
                  ((w_q, "int8"), (w_scale, "scale"), (w_zp, "zero_point"))]
        w_dq = graph.call(gop.dequantize.default, (*consts, 0), before=n)
        b_node = n.args[2] if len(n.args) > 2 else None
        bias = graph.constant(b_node).float() if b_node is not None else torch.zeros(w_q.shape[0])
        if shift is not None:
            bias = bias - shift
        if n.target is CONV:   # QLinearConv takes its bias in int32 at the scale x_scale · w_scale
            b_scale = (x_scale * w_scale).float()
            b_q = torch.round(bias / b_scale).clamp(-2**31, 2**31 - 1).to(torch.int32)
            b_consts = [graph.add_constant(v, f"{name}_bias_{k}", before=n) for v, k in
                        ((b_q, "int32"), (b_scale, "scale"), (torch.zeros_like(b_q), "zero_point"))]
            b_dq = graph.call(gop.dequantize.default, (*b_consts, 0), before=n)
        else:                  # an int8 matmul's output is float: its bias stays float
            b_dq = graph.add_constant(bias, f"{name}_bias", before=n)
        if n.target is CONV:
            n.args = (n.args[0], w_dq, b_dq, *n.args[3:])
            return
        # linear → matmul with the weight stored [in, out]: the form ORT's QDQ MatMul fusion reads
        w_t = graph.call(aten.permute.default, (w_dq, [1, 0]), before=n)
        mm = graph.call(aten.matmul.default, (n.args[0], w_t), before=n)
        out = graph.call(aten.add.Tensor, (mm, b_dq), before=n)
        n.replace_all_uses_with(out)
        graph.fx.erase_node(n)


def _rewire(graph: Graph, quantized: list[fx.Node], tensors: list[fx.Node], ends: list[fx.Node], qparams: dict,
            result: PassResult) -> None:
    """Insert Q → DQ after every quantized tensor and make the quantized ops read the DQ; pads run
    on the integers (ORT leaves DQ → Pad → Q in float)."""
    int_pads = [n for n in quantized if n.target is PAD]
    dq = {t: _insert_qdq(graph, t, *qparams[t], quantized_already=t in int_pads) for t in tensors}
    for n in (n for n in quantized if n.target is not PAD):
        n.args = tuple(dq.get(a, a) if i < (2 if n.target is ADD else 1) else a for i, a in enumerate(n.args))
        if n.target is ADD:
            result.did(f"%{n.name}: residual add in int8 (QLinearAdd)")
        elif n.target in PASS_THROUGH:
            result.did(f"%{n.name} ({n.target.name()}): runs on the int8 values")
    for t in ends:   # every reader of a block's last output reads it dequantized
        for u in [u for u in t.users if u is not dq[t].args[0]]:
            u.replace_input_with(t, dq[t])
    for pad in int_pads:
        src = pad.args[0]
        zp = qparams[src][1]   # (fake-tracing an integer pad would pin a dynamic batch dim)
        int_pad = graph.call(PAD, (dq[src].args[0], pad.args[1], int(zp)), before=pad, dtype=zp.dtype)
        pad.replace_all_uses_with(int_pad)
        graph.fx.erase_node(pad)
        result.did(f"%{pad.name} (constant_pad_nd): pads the int8 values with the zero point")


def _insert_qdq(graph: Graph, t: fx.Node, scale: torch.Tensor, zp: torch.Tensor, quantized_already: bool) -> fx.Node:
    after = t.next
    s, z = (graph.add_constant(v, f"{t.name}_{k}", before=after) for v, k in ((scale, "scale"), (zp, "zero_point")))
    q = t if quantized_already else graph.call(gop.quantize.default, (t, s, z), before=after)
    return graph.call(gop.dequantize.default, (q, s, z, 0), before=after)


def _gemm_path(conv: fx.Node, ctx: PassContext, qmax: int) -> tuple[bool, str | None]:
    """Whether ORT's im2col + int8 GEMM path should run this conv instead of its symmetric conv kernel, and why
    (a choice ORT's CPU provider has; on other targets, or where nothing can be measured, keep the default)."""
    a = conv_args(conv)
    x, w = tensor_meta(a.x), tensor_meta(a.weight)
    if not ctx.target.host or ctx.cost.unmeasurable or not all(isinstance(d, int) for d in (*x.shape, *w.shape)):
        return False, None
    return ctx.cost.int8_conv_gemm_path(*x.shape, w.shape[0], *w.shape[2:], tuple(a.stride), tuple(a.padding),
                                        tuple(a.dilation), a.groups, qmax)


def _layer(n: fx.Node, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The layer's output for weight `w` and no bias."""
    if n.target is CONV:
        a = conv_args(n)
        return F.conv2d(x, w, None, a.stride, a.padding, a.dilation, a.groups)
    return F.linear(x, w)


def _through_activations(t: fx.Node) -> fx.Node:
    while is_call(t, *ACTIVATIONS) or (is_call(t, operator.getitem) and t.args[1] == 0):
        t = t.args[0]
    return t


def _residual_adds(graph: Graph, quantized: set[fx.Node]) -> set[fx.Node]:
    """Adds of two feature maps both coming (through activations) from quantized convs or such adds."""
    adds: set[fx.Node] = set()
    for n in graph.ops():
        if n.target is ADD and len(n.args) == 2 and all(isinstance(a, fx.Node) for a in n.args) \
                and tensor_meta(n) is not None and tensor_meta(n).dim() == 4 and n.kwargs.get("alpha", 1) == 1 \
                and all(_through_activations(a) in quantized | adds for a in n.args):
            adds.add(n)
    return adds


def _pass_throughs(graph: Graph, quantized: set[fx.Node]) -> set[fx.Node]:
    """Max-pools and zero pads whose result feeds a quantized op: run them on the int8 values."""
    out = set()
    for n in reversed(list(graph.ops())):
        if n.target in PASS_THROUGH and (n.target is not PAD or (n.args[2:] or [0])[0] == 0):
            users = {u for v in ([n] + [u for u in n.users if is_call(u, operator.getitem)]) for u in v.users}
            if users and all(u in quantized or u in out or is_call(u, operator.getitem) for u in users):
                out.add(n)
    return out


def _fold_zero_pads(convs: list[fx.Node]) -> list[str]:
    """A symmetric zero pad in front of a conv becomes the conv's padding (TF-"same" models pad every
    conv): in QDQ form a separate Pad would run in float between a DequantizeLinear and a QuantizeLinear."""
    folded = []
    for conv in (n for n in convs if n.target is CONV):
        f = zero_pad_into(conv)
        if f is not None and all(before == after for before, after in f.pads):
            conv.args = conv_args(conv).replace(x=f.source, padding=[before for before, _ in f.pads])
            folded.append(f.pad.name)
    return folded


def _quantized_tensors(quantized: list[fx.Node]) -> list[fx.Node]:
    """Every activation read by a quantized op (both inputs of adds, the data input of the rest)."""
    seen: dict[fx.Node, None] = {}
    for n in quantized:
        for a in n.args[:2] if n.target is ADD else n.args[:1]:
            seen[a] = None
    return list(seen)


def _unquantized_ends(quantized: list[fx.Node], tensors: list[fx.Node]) -> list[fx.Node]:
    """Outputs (after their activation) of quantized convs and adds that no quantized op reads, like
    the last block before a pooling head: quantizing them lets ORT run that conv/add in int8 too."""
    ends = []
    for n in quantized:
        if n.target is not CONV and n.target is not ADD:
            continue
        out = n
        while len(out.users) == 1 and is_call(next(iter(out.users)), *ACTIVATIONS):
            out = next(iter(out.users))
        if out not in tensors and out not in ends:
            ends.append(out)
    return ends


def _range_source(t: fx.Node, tensors) -> fx.Node:
    """The tensor whose quantization `t` shares: a pass-through's input, when that is quantized too."""
    p = t.args[0] if is_call(t, operator.getitem) else t
    if is_call(p, *PASS_THROUGH) and p.args[0] in tensors:
        return p.args[0]
    return t
