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
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..errors import InputError
from ..ir import Graph, is_call, tensor_meta
from ..ops import quant
from .base import Pass, PassContext, PassResult, register
from .calibrate import METHODS, observe
from .qconv_choice import SHIFT, gemm_path_faster

aten = torch.ops.aten
gop = torch.ops.graphopt
CONV, LINEAR, ADD, PAD = aten.convolution.default, aten.linear.default, aten.add.Tensor, aten.constant_pad_nd.default
# ops that do not change a tensor's range: their output reuses their input's quantization
PASS_THROUGH = (aten.max_pool2d_with_indices.default, PAD)
ACTIVATIONS = (aten.relu.default, aten.hardtanh.default, aten.clamp.default)
MODES = {"int8": "int8", "int8-dynamic": "int8-dynamic", "int4-weight": "int4"}


@dataclass
class QuantOptions:
    observer: str = "mse"                 # activation range: minmax | percentile | mse
    symmetric_activations: bool = False   # int8 around 0 instead of uint8 over [min, max]
    bias_correction: bool = True
    kernel_choice: bool = True            # per conv shape, encode weights for the faster ORT int8 kernel
    smooth: float | None = 0.7            # SmoothQuant α for static int8 linears (None: off)
    keep_float: tuple[str, ...] = ()      # layer names (node names or module paths) to leave in float

    def __post_init__(self):
        if self.observer not in METHODS:
            raise InputError(f"observer={self.observer!r}: choose one of {', '.join(METHODS)}")


def layers(graph: Graph) -> list[fx.Node]:
    """The quantizable layers: 2-D convs and linears whose weights are constants."""
    return [n for n in graph.ops() if why_not_layer(graph, n) is None]


def why_not_layer(graph: Graph, n: fx.Node) -> str | None:
    if n.target not in (CONV, LINEAR):
        return "not a conv or linear"
    if not (isinstance(n.args[1], fx.Node) and graph.is_constant(n.args[1])):
        return "weight is not a constant"
    if tensor_meta(n.args[0]) is None or tensor_meta(n.args[0]).dtype != torch.float32:
        return "input is not float32"
    if n.target is CONV and (n.args[6] or tensor_meta(n.args[1]).dim() != 4):
        return "transposed or non-2-D convolution"
    return None


def layer_name(n: fx.Node) -> str:
    """The module path of a layer ('encoder.layer.0.attention.self.query'), else its node name."""
    stack = n.meta.get("nn_module_stack")
    return next(reversed(stack.values()))[0] if stack else n.name


def uniform_plan(graph: Graph, mode: str, keep_float=()) -> dict[str, str]:
    """Every layer in `mode` (static int8 for convs; linears as the mode says), except kept ones."""
    plan = {}
    for n in layers(graph):
        m = mode if n.target is LINEAR or mode == "int8" else "float"
        plan[n.name] = "float" if (n.name in keep_float or layer_name(n) in keep_float) else m
    return plan


@register
class Quantize(Pass):
    name = "quantize"
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
        if result.changed:
            graph.eliminate_dead_code()
            graph.tidy()
        return result

    # --- int8 dynamic / int4 weight-only: one op per linear -------------------------------------
    def _weight_only(self, graph: Graph, node: fx.Node, mode: str) -> None:
        x, w_node, b_node = (list(node.args) + [None])[:3]
        w = graph.constant(w_node).float()
        name = w_node.target
        if mode == "int8-dynamic":
            w_q, scale, _ = quantize_weight(w)
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
        batches = ctx.options.get("calibration")
        if not batches:
            raise InputError("static int8 quantization needs calibration data: pass calibration=[batch, ...] "
                             "(a few representative inputs), or use quantize='int8-dynamic'")
        for pad in _fold_zero_pads(graph, layer_nodes):
            result.did(f"%{pad}: zero pad folded into the conv's own padding")
        linears = [n for n in layer_nodes if n.target is LINEAR]
        if linears and self.options.smooth is not None:
            for note in _smooth(graph, batches, linears, self.options.smooth):
                result.did(note)
        quantized = set(layer_nodes)
        quantized |= _residual_adds(graph, quantized)
        quantized |= _pass_throughs(graph, quantized)
        quantized = [n for n in graph.fx.nodes if n in quantized]   # graph order: stable names and notes
        tensors = _quantized_tensors(quantized)
        ends = _unquantized_ends(quantized, tensors)
        tensors += ends

        weights = {n: quantize_weight(graph.constant(n.args[1]).float()) for n in layer_nodes}
        qparams, shift = self._calibrate(graph, batches, tensors, weights)
        x_scale = {n: qparams[n.args[0]][0] for n in layer_nodes}
        _rewire(graph, quantized, tensors, ends, qparams, result)
        for n in layer_nodes:
            if n.target is CONV and self.options.kernel_choice and ctx.target is not None \
                    and ctx.target.name == "cpu" and _prefers_gemm_path(n):
                q, s, _ = weights[n]
                weights[n] = ((q.to(torch.int16) + SHIFT).to(torch.int8), s, torch.full_like(q[:, 0, 0, 0], SHIFT))
                result.notes.append(f"%{n.name}: weights given zero point {SHIFT}: ORT's int8 GEMM path measured "
                                    "faster than its symmetric conv kernel for this shape")
            self._quantize_layer(graph, n, weights[n], x_scale[n], shift.get(n))
            kind = "conv" if n.target is CONV else "linear"
            result.did(f"%{n.name} ({layer_name(n)}) → int8 {kind}, per-channel weights"
                       + (", bias corrected" if n in shift else ""))
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
        observers = observe(graph, batches, tensors, on_node)
        qparams: dict[fx.Node, tuple] = {}
        sym, wanted = self.options.symmetric_activations, set(tensors)
        for t in graph.fx.nodes:   # topological: a pass-through's input is settled before it
            if t in wanted:
                src = _range_source(t, wanted)
                qparams[t] = qparams[src] if src is not t else _activation_qparams(
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


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel (axis 0): (int8 weight, scales, zero points)."""
    scale = w.reshape(w.shape[0], -1).abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.clamp(torch.round(w / scale.reshape(-1, *[1] * (w.dim() - 1))), -127, 127).to(torch.int8)
    return q, scale, torch.zeros(w.shape[0], dtype=torch.int8)


def _prefers_gemm_path(conv: fx.Node) -> bool:
    x, w = tensor_meta(conv.args[0]), tensor_meta(conv.args[1])
    if not all(isinstance(d, int) for d in (*x.shape, *w.shape)):   # a dynamic shape: keep the default
        return False
    _, _, _, stride, padding, dilation, _, _, groups = conv.args
    return gemm_path_faster(*x.shape, w.shape[0], *w.shape[2:], tuple(stride), tuple(padding), tuple(dilation), groups)


def _activation_qparams(rng: tuple[float, float], symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = rng
    if symmetric:
        scale = max(abs(lo), abs(hi), 1e-8) / 127
        return torch.tensor(scale, dtype=torch.float32), torch.tensor(0, dtype=torch.int8)
    scale = max(hi - lo, 1e-8) / 255
    return torch.tensor(scale, dtype=torch.float32), torch.tensor(round(-lo / scale), dtype=torch.uint8)


def _layer(n: fx.Node, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The layer's output for weight `w` and no bias."""
    if n.target is CONV:
        _, _, _, stride, padding, dilation, _, _, groups = n.args
        return F.conv2d(x, w, None, stride, padding, dilation, groups)
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


def _smooth(graph: Graph, batches, linears: list[fx.Node], alpha: float) -> list[str]:
    """SmoothQuant: a few input channels of a transformer's linears carry outliers that a per-tensor
    activation scale cannot hold. Divide each input channel by s_j = max|x_j|^α / max|W_j|^(1−α) and
    multiply the weights' columns by it — the product is unchanged, the activation is flat enough to
    quantize. Linears reading the same tensor (q, k, v) share s."""
    groups: dict[fx.Node, list[fx.Node]] = {}
    for n in linears:
        groups.setdefault(n.args[0], []).append(n)
    x_max: dict[fx.Node, torch.Tensor] = {}

    def on_node(n, _args, out):
        if n in groups:
            m = out.detach().abs().reshape(-1, out.shape[-1]).amax(0)
            x_max[n] = torch.maximum(x_max[n], m) if n in x_max else m
    observe(graph, batches, [], on_node)
    notes = []
    for x, group in groups.items():
        if x not in x_max:
            continue
        w_max = torch.stack([graph.constant(n.args[1]).float().abs().amax(0) for n in group]).amax(0)
        s = (x_max[x].clamp(min=1e-5) ** alpha / w_max.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
        inv = graph.add_constant(1.0 / s, f"{x.name}_smooth", before=group[0])
        scaled = graph.call(aten.mul.Tensor, (x, inv), before=group[0])
        for n in group:
            w = graph.constant(n.args[1]).float() * s
            n.args = (scaled, graph.add_constant(w, f"{n.args[1].target}_smoothed", before=n), *n.args[2:])
        notes.append(f"%{x.name}: smoothed for {', '.join('%' + n.name for n in group)} "
                     f"(outlier ratio max/median {(x_max[x].max() / x_max[x].median()).item():.1f})")
    return notes


def _fold_zero_pads(graph: Graph, convs: list[fx.Node]) -> list[str]:
    """A symmetric zero pad in front of a conv becomes the conv's padding (TF-"same" models pad every
    conv): in QDQ form a separate Pad would run in float between a DequantizeLinear and a QuantizeLinear."""
    folded = []
    for conv in convs:
        pad = conv.args[0]
        if conv.target is not CONV or not is_call(pad, PAD) or (pad.args[2:] or [0])[0] != 0:
            continue
        p = list(pad.args[1])
        if len(p) != 4 or p[0] != p[1] or p[2] != p[3] or min(p) < 0:
            continue
        padding = [conv.args[4][0] + p[2], conv.args[4][1] + p[0]]
        conv.args = (pad.args[0], *conv.args[1:4], padding, *conv.args[5:])
        folded.append(pad.name)
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
