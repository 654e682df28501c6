"""Mixed precision: choose per layer float / int8 / int4 — the fastest plan within an accuracy budget.

Each layer's sensitivity is measured on the calibration batches: quantize that layer alone (in the
IR, which stays executable) and take the output error, mean (1 − cosine) against float. Each
option's latency gain is measured too: the uniform plans are lowered to ONNX Runtime and timed,
and a uniform plan's saving is shared among its layers by their FLOPs. A greedy then takes the
(layer, option) moves with the least error per millisecond saved while the summed error fits the
budget, and the combined plan is checked as a whole (moves are undone, worst first, until it fits).
The plan, the errors and the uniform plans it was compared with are in the dumps."""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.fx as fx
import torch.nn.functional as F

from ...errors import InputError
from ...ir import Graph, copy_graph
from ...ops import quant
from ...progress import Progress
from ..base import Pass, PassContext, PassResult, register
from ..calibration import observe, run_batches
from ...numerics import cosine_error, rank_correlation
from .layers import (CONV, LINEAR, QuantOptions, activation_qparams, layer_name, layers, quantize_weight, uniform_plan,
                     weight_max)
from .observers import Observer
from .options import DEFAULT_BUDGET
from .quantize import Quantize


@register
class QuantizeAuto(Pass):
    name = "quantize_auto"
    phase = "lossy"
    summary = "mixed precision: per-layer float/int8/int4 plan, fastest within an output-error budget"
    lossy = True
    needs_calibration = True

    def __init__(self, budget: float = DEFAULT_BUDGET, options: QuantOptions | None = None,
                 sensitivity: str = "measured"):
        if sensitivity not in ("measured", "proxy"):
            raise InputError(f"sensitivity={sensitivity!r}: 'measured' (one IR run per layer and option) or "
                             "'proxy' (each layer's own output noise, scaled by the uniform plan's measured error)")
        self.budget, self.options, self.sensitivity = budget, options or QuantOptions(), sensitivity

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        batches = ctx.calibration
        if not batches:
            raise InputError("quantize='auto' needs calibration data: pass calibration=[batch, ...]")
        result = PassResult()
        opts = dataclasses.replace(self.options, weight_max=weight_max(self.options, ctx)[0])   # as Quantize will
        options = {n.name: (["int8"] if n.target is CONV else ["int8", "int8-dynamic", "int4"]) for n in layers(graph)}
        refs = run_batches(graph, batches)
        uniform = {m: uniform_plan(graph, m) for m in ("int8", "int8-dynamic", "int4")}
        uniform_err = {m: _plan_error(graph, ctx, refs, uniform[m], opts)
                       for m in ctx.progress.each(uniform, "uniform plans measured")}
        swaps = quantized_layers(graph, batches[:2], options, opts)
        local = _local_noise(graph, batches[:2], swaps)
        # the cheap proxy: a layer's own output noise, scaled so the uniform int8 plan's sum matches its measurement
        k = uniform_err["int8"] / max(sum(v for (_, o), v in local.items() if o == "int8"), 1e-30)
        proxy = {key: k * v for key, v in local.items()}
        errors = proxy if self.sensitivity == "proxy" else _sensitivities(graph, batches[:2], swaps, ctx.progress)
        ms = {"float": _latency_ms(graph, ctx, {})}
        ms |= {m: _latency_ms(graph, ctx, p) if any(v != "float" for v in p.values()) else ms["float"]
               for m, p in uniform.items()}
        flops = {n.name: _flops(n) for n in layers(graph)}
        saving = {}
        for name, choices in options.items():
            for o in choices:
                pool = sum(flops[k] for k, v in uniform[o].items() if v == o) or 1
                saving[name, o] = max(ms["float"] - ms[o], 0.0) * flops[name] / pool

        plan, spent = {name: "float" for name in options}, 0.0
        moves = sorted(saving, key=lambda k: errors[k] / max(saving[k], 1e-9))
        for name, o in moves:
            gain = saving[name, o] - (saving.get((name, plan[name]), 0.0))
            extra = errors[name, o] - errors.get((name, plan[name]), 0.0)
            if gain > 0 and spent + extra <= self.budget:
                plan[name], spent = o, spent + extra
        measured = _plan_error(graph, ctx, refs, plan, opts)
        while measured > self.budget:          # errors do not add exactly: back off the worst move
            worst = max((k for k in plan if plan[k] != "float"), key=lambda k: errors[k, plan[k]])
            plan[worst] = "float"
            measured = _plan_error(graph, ctx, refs, plan, opts)
        est = ms["float"] - sum(saving[k, v] for k, v in plan.items() if v != "float")
        # the mixed plan is kept only if it measures faster than every uniform plan within the budget
        plan_ms = _latency_ms(graph, ctx, plan) if any(v != "float" for v in plan.values()) else ms["float"]
        fitting = [m for m in uniform if uniform_err[m] <= self.budget and any(v != "float" for v in uniform[m].values())]
        best = min(fitting, key=lambda m: ms[m], default=None)
        modes = list(uniform)
        rows = []
        for name, n in ((n.name, n) for n in layers(graph)):
            errs = ", ".join(f"{m} error {errors[name, m]:.1e} saves {saving[name, m]:.2f} ms" for m in options[name])
            result.notes.append(f"plan %{name} ({layer_name(n)}): {plan[name]}   [{errs}]")
            rows.append([f"%{name} ({layer_name(n)})", plan[name]]
                        + [errors.get((name, m)) for m in modes] + [saving.get((name, m)) for m in modes])
        result.table("Quantization plan per layer: sensitivity (output error with the layer alone quantized) and "
                     "ms saved, per precision", ["layer", "chosen"] + [f"{m} error" for m in modes]
                     + [f"{m} saves ms" for m in modes], rows,
                     bars=tuple(f"{m} error" for m in modes) + tuple(f"{m} saves ms" for m in modes))
        if self.sensitivity == "measured" and len(errors) > 2:
            result.notes.append(f"sensitivity measured per layer; the cheap proxy (layer-local noise) ranks the "
                                f"layers with Spearman ρ = {rank_correlation([errors[k] for k in errors], [proxy[k] for k in errors]):.2f}")
        for m in uniform:
            result.notes.append(f"uniform {m}: {ms[m]:.2f} ms, error {uniform_err[m]:.1e}"
                                + ("" if uniform_err[m] <= self.budget else " (over budget)"))
        result.notes.append(f"float: {ms['float']:.2f} ms; mixed plan: {plan_ms:.2f} ms measured (≈{est:.2f} "
                            f"estimated), error {measured:.1e} (budget {self.budget:g})")
        if best is not None and ms[best] < plan_ms:
            plan, measured = dict(uniform[best]), uniform_err[best]
            result.notes.append(f"chosen plan: uniform {best}, {ms[best]:.2f} ms, error {measured:.1e} — it measured "
                                "faster than the mixed plan")
        else:
            result.notes.append(f"chosen plan: the mixed plan, {plan_ms:.2f} ms, error {measured:.1e}")
        result.stats.update({f"layers_{m}": sum(v == m for v in plan.values()) for m in ("float", *uniform)})
        if any(v != "float" for v in plan.values()):
            sub = Quantize("int8", opts, plan).run(graph, ctx)
            result.rewrites += sub.rewrites
            result.notes.extend(sub.notes)
        result.plan = {"layers": dict(plan), "measured_loss": measured}
        return result


# --- measuring ---------------------------------------------------------------------------------
def quantized_layers(graph: Graph, batches, options: dict[str, list[str]], qopts: QuantOptions) -> dict:
    """(layer, option) → a function computing that layer quantized, its input range observed on `batches`."""
    nodes = {n.name: n for n in layers(graph)}
    observers = observe(graph, batches, {n.args[0] for n in nodes.values()}, observer=Observer)
    return {(name, o): (nodes[name], _quantized_layer(graph, nodes[name], o, observers[nodes[name].args[0].name]
                                                      .range(qopts.observer, True), qopts))
            for name, opts in options.items() for o in opts}


def _sensitivities(graph: Graph, batches, swaps: dict, progress: Progress) -> dict:
    """(layer, option) → output error with only that layer quantized."""
    refs = run_batches(graph, batches)
    return {key: cosine_error(run_batches(graph, batches, dict([swaps[key]])), refs)
            for key in progress.each(swaps, "layer sensitivities measured")}


def _local_noise(graph: Graph, batches, swaps: dict) -> dict:
    """(layer, option) → noise-to-signal ratio of the layer's own output when quantized, all in one
    pass over the calibration batches (the inputs each layer sees are the float model's)."""
    by_node: dict[fx.Node, list] = {}
    for key, (n, fn) in swaps.items():
        by_node.setdefault(n, []).append((key, fn))
    noise = dict.fromkeys(swaps, 0.0)
    signal = dict.fromkeys(by_node, 0.0)

    def on_node(n, args, y):
        if n in by_node:
            signal[n] += y.square().sum().item()
            for key, fn in by_node[n]:
                noise[key] += (fn(*args) - y).square().sum().item()
    observe(graph, batches, [], on_node)
    return {key: noise[key] / max(signal[n], 1e-30) for key, (n, _) in swaps.items()}


def _quantized_layer(graph: Graph, n: fx.Node, option: str, rng, qopts: QuantOptions):
    """A function computing layer `n` as `option` would (weights and input rounded the same way)."""
    w = graph.constant(n.args[1]).float()
    if option == "int8":
        wq = quant.dequantize(*quantize_weight(w, qopts.weight_max or 127), 0)
        s, z = activation_qparams(rng, qopts.symmetric_activations)
        if n.target is CONV:
            return lambda x, _w, b=None, *rest: F.conv2d(quant.dequantize(quant.quantize(x, s, z), s, z, 0), wq, b,
                                                         *[rest[i] for i in (0, 1, 2)], rest[5])
        return lambda x, _w, b=None: F.linear(quant.dequantize(quant.quantize(x, s, z), s, z, 0), wq, b)
    if option == "int8-dynamic":
        w_q, scale, _ = quantize_weight(w, qopts.weight_max or 127)
        return lambda x, _w, b=None: quant.dynamic_linear(x, w_q.t(), scale, b)
    packed = quant.pack_int4(w)
    return lambda x, _w, b=None: quant.int4_linear(x, *packed, b, w.shape[1], quant.INT4_BLOCK)


def _plan_error(graph: Graph, ctx: PassContext, refs: list[torch.Tensor], plan: dict[str, str],
                qopts: QuantOptions) -> float:
    """The output error of the whole graph under `plan`, against the float outputs `refs` on `batches`."""
    if all(v == "float" for v in plan.values()):
        return 0.0
    trial = copy_graph(graph)
    Quantize("int8", dataclasses.replace(qopts, kernel_choice=False), plan).run(trial, ctx)   # same numbers
    trial.eliminate_dead_code()
    return cosine_error(run_batches(trial, ctx.calibration), refs)


def _latency_ms(graph: Graph, ctx: PassContext, plan: dict[str, str]) -> float:
    """Milliseconds per call of the graph under `plan` on the target, as the cost model measures it."""
    trial = copy_graph(graph)
    if any(v != "float" for v in plan.values()):
        Quantize("int8", QuantOptions(bias_correction=False), plan).run(trial, ctx)
    trial.eliminate_dead_code()
    trial.tidy()
    return ctx.cost.graph_ms(trial, ctx.example_args, ctx.example_kwargs)


def _flops(n: fx.Node) -> float:
    w = n.args[1].meta["val"]
    out = n.meta["val"]
    per_out = math.prod(w.shape[1:]) if n.target is CONV else w.shape[1]
    return float(per_out * math.prod(int(d) for d in out.shape)) if n.target in (CONV, LINEAR) else 0.0
