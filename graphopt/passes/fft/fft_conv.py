"""FFT-convolution rewriting: long 1-D convolutions become graphopt::fft_conv1d (lowered for ONNX Runtime
as a matmul (Monarch) FFT, for TVM on CPU as graphopt's fused FFT kernel when depthwise), and large-kernel
depthwise 2-D convolutions graphopt::fft_conv2d, a per-axis matmul DFT convolution, where the target's
cost model (ctx.cost: rates measured on the target with the backend that will run the model) says it is
faster. Three sources:

  1. aten.convolution with a 1-D kernel (dense, grouped or depthwise; stride and dilation 1), a
     zero pad in front of it folded in (the causal-conv idiom pad(x, [K−1, 0]) → conv);
  2. the same for a depthwise 2-D kernel (RepLKNet's 31×31), pads folded per axis;
  3. a convolution the model already computes by FFT, as Hyena does:
        irfft(rfft(pad(u), n) · K̂, n)[..., :L]  with K̂ constant (its filter generator folded),
     always rewritten (it is an FFT either way; ONNX Runtime's DFT op is slower than the matmul form,
     40 vs 6 ms for 64 channels at N = 8192 here, and TVM has no FFT op at all).

The kernel's spectrum is computed here, at compile time, in the layout the lowering wants; every
decision and its estimated costs go into the dumps."""
from __future__ import annotations

import torch
import torch.fx as fx

from ...cost import Conv2dShape, ConvShape, CostModel
from ...ir import Graph, conv_args, is_call, tensor_meta, zero_pad_into
from ...ops.fft_conv import fft_size, spectrum
from ...ops.fft_conv2d import spectrum2d
from ..base import Pass, PassContext, PassResult, register

aten = torch.ops.aten


def _static_batch(val: torch.Tensor) -> int:
    b = val.shape[0]
    return b if isinstance(b, int) else 1


@register
class FFTConv(Pass):
    name = "fft_conv"
    phase = "rewrite"
    summary = "rewrite long 1-D convolutions (and rfft·irfft convolutions) as matmul-FFT convs when measured faster"

    def __init__(self, force: str | None = None):
        self.force = force   # "fft" or "direct" overrides the cost model (tests, experiments)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        if ctx.cost.unmeasurable and self.force is None:
            result.skipped(f"every convolution: the cost model cannot measure for {ctx.target} here "
                           f"({ctx.cost.unmeasurable}); give FFTConv(force='fft') to rewrite without measuring")
            return result
        decided, shapes = [], []   # per conv the cost model priced: both estimates and the form chosen; its shape
        for node in self.nodes(graph, aten.convolution.default, aten._fft_c2r.default):
            if node.target is aten.convolution.default:
                self._conv(graph, node, result, ctx.cost, decided, shapes)
            elif node.target is aten._fft_c2r.default:
                self._fft_idiom(graph, node, result)
        if decided:
            result.table("FFT cost model per convolution: estimated ms of each form", ["conv", "direct ms", "FFT ms",
                         "chosen", "period"], decided, bars=("direct ms", "FFT ms"), unit=" ms")
        if decided and self.force is None:
            kinds = tuple(dict.fromkeys(k for shape in shapes for k in (shape.direct_rate, shape.fft_rate)))
            rates = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in ctx.cost.fft_rates(kinds).items())
            result.notes.append(f"cost model rates measured with {ctx.cost.on} (GMAC/s): {rates}")
        return result

    def _choose(self, shape: ConvShape | Conv2dShape, cost: CostModel):
        d = cost.fft_decision(shape)
        return d if self.force is None else type(d)(self.force, d.direct_ms, d.fft_ms, d.period)

    # --- 1. direct convolutions -----------------------------------------------------------------
    def _conv(self, graph: Graph, node: fx.Node, result: PassResult, cost: CostModel, decided: list,
              shapes: list) -> None:
        x, w, b, stride, padding, dilation, transposed, _, groups = conv_args(node)
        wv = tensor_meta(w)
        if wv is None or wv.dim() not in (3, 4):
            return                                    # not a 1-D or 2-D convolution
        dims, c_out = wv.dim() - 2, wv.shape[0]
        if max(wv.shape[2:]) == 1:
            return                                    # pointwise: nothing to transform
        kind = f"{dims}-D convolution"
        why = ("transposed" if transposed else "strided" if set(stride) != {1} else
               "dilated" if set(dilation) != {1} else "weights are not constant" if not graph.is_constant(w)
               or (b is not None and not graph.is_constant(b)) else
               "non-depthwise (only depthwise 2-D convs are rewritten)" if dims == 2 and not
               (groups == c_out == tensor_meta(x).shape[1]) else None)
        if why:
            result.skipped(f"%{node.name}: {why} {kind}")
            return
        folded = zero_pad_into(node)     # the causal / "same" pad idiom: fold it into the window
        source, pads = (folded.source, folded.pads) if folded else (x, [(p, p) for p in padding])
        xv, kernel = tensor_meta(source), tuple(wv.shape[2:])
        size = tuple(xv.shape[2:])
        if not all(isinstance(n, int) for n in size):
            result.skipped(f"%{node.name}: dynamic spatial size")
            return
        start = tuple(k - 1 - p[0] for k, p in zip(kernel, pads))
        out = tuple(n + p[0] + p[1] - k + 1 for n, p, k in zip(size, pads, kernel))
        if min(start) < 0:
            result.skipped(f"%{node.name}: padding wider than the kernel")
            return
        c_in = xv.shape[1]
        what = f"%{node.name} ({kind}, kernel {'×'.join(map(str, kernel))}, input {'×'.join(map(str, size))}, " \
               f"{c_in}→{c_out}, groups {groups})"
        if dims == 1:
            shape = ConvShape(_static_batch(xv), c_in, c_out, groups, size[0], kernel[0], out[0])
        else:
            shape = Conv2dShape(_static_batch(xv), c_in, size, kernel, start, out)
        decision = self._choose(shape, cost)
        shapes.append(shape)
        decided.append([f"%{node.name} k{'×'.join(map(str, kernel))} {'×'.join(map(str, size))} {c_in}→{c_out}",
                        decision.direct_ms, decision.fft_ms, decision.form, decision.period])
        if decision.form == "direct":
            result.skipped(f"{what}: {decision}")
            return
        h = graph.constant(w).flip(-1)
        if dims == 1:
            _, ns = shape.fft_size()
            spec = spectrum(h.reshape(groups, c_out // groups, c_in // groups, kernel[0]), ns)
            op, args = torch.ops.graphopt.fft_conv1d.default, (list(ns), groups, start[0], out[0])
        else:
            nh, nw = shape.fft_size()
            spec = spectrum2d(h.flip(-2)[:, 0], nh, nw)
            op, args = torch.ops.graphopt.fft_conv2d.default, (nh, nw, start[0], out[0], start[1], out[1])
        spec = graph.add_constant(spec, f"{w.target}_spectrum", before=node)
        y = graph.call(op, (source, spec, *args), before=node)
        if b is not None:
            bias = graph.call(aten.reshape.default, (b, [1, c_out] + [1] * dims), before=node)
            y = graph.call(aten.add.Tensor, (y, bias), before=node)
        node.replace_all_uses_with(y)
        result.did(f"{what} → {op.name().removesuffix('.default').replace('::', '.')}: {decision}")

    # --- 2. the rfft · irfft idiom ---------------------------------------------------------------
    def _fft_idiom(self, graph: Graph, node: fx.Node, result: PassResult) -> None:
        prod, dims, norm, n = node.args
        sl = next(iter(node.users)) if len(node.users) == 1 else None
        rank = tensor_meta(node).dim()
        if not (is_call(prod, aten.mul.Tensor) and [d % rank for d in dims] == [rank - 1] and rank == 3 and norm == 2):
            result.skipped(f"%{node.name}: not an irfft over the last dim of a spectrum product [B, C, ·]")
            return
        fwd, kern = prod.args if is_call(prod.args[0], aten._fft_r2c.default) else prod.args[::-1]
        if not (is_call(fwd, aten._fft_r2c.default) and isinstance(kern, fx.Node) and graph.is_constant(kern)):
            result.skipped(f"%{node.name}: spectrum product is not rfft(input) · constant spectrum")
            return
        if fwd.args[2] != 0 or [d % rank for d in fwd.args[1]] != [rank - 1]:
            result.skipped(f"%{node.name}: forward rfft is normalized or not over the last dim")
            return
        if n & (n - 1):
            result.skipped(f"%{node.name}: FFT size {n} is not a power of two (circular convolution kept)")
            return
        u = fwd.args[0]
        if is_call(u, aten.constant_pad_nd.default) and list(u.args[1])[:1] == [0] and all(p == 0 for p in u.args[1][2:]):
            u = u.args[0]                              # right zero-padding up to n: the op pads itself
        uv = tensor_meta(u)
        c, length = uv.shape[1], uv.shape[-1]
        kspec = graph.constant(kern)
        if not isinstance(length, int) or kspec.shape[-2:-1] not in (torch.Size([c]), torch.Size([1])):
            result.skipped(f"%{node.name}: spectrum {tuple(kspec.shape)} is not one filter per channel")
            return
        start, end = 0, n
        if is_call(sl, aten.slice.Tensor) and sl.args[1] % rank == rank - 1 and (len(sl.args) < 5 or sl.args[4] == 1):
            start, end = sl.args[2] or 0, min(sl.args[3], n)
        out_node = sl if start != 0 or end != n else node
        if self.force == "direct":
            result.skipped(f"%{node.name}: rfft·irfft convolution kept (forced)")
            return
        h = torch.fft.irfft(kspec.reshape(-1, kspec.shape[-1]).to(torch.complex128), n=n).expand(c, n)
        _, ns = fft_size(n)
        spec = graph.add_constant(spectrum(h.reshape(c, 1, 1, n), ns), f"{kern.target}_monarch", before=node)
        y = graph.call(torch.ops.graphopt.fft_conv1d.default, (u, spec, list(ns), c, start, end - start),
                       before=out_node)
        out_node.replace_all_uses_with(y)
        result.did(f"%{out_node.name}: rfft·irfft convolution (n={n}, {c} channels) → graphopt.fft_conv1d "
                   f"(circular, period {n}; replaces the model's own FFT: ONNX DFT on ORT, none on TVM)")
