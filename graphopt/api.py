"""compile(): validate everything, capture, run the passes, build for the backend. Nothing else."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils import _pytree as pytree

from .artifacts import writable_dir
from .backends import BuildInputs, get_backend
from .backends.tvm_tune import Tune
from .capture import batch_dynamic_shapes, capture
from .hf import register_kv_caches
from .compiled import CompiledModule
from .errors import InputError, UnsupportedError
from .options import Option, check_calibration
from .passes import Pass, PassContext, PassManager, resolve, with_options
from .passes.auto import optimize_option
from .passes.calibration import check_batches
from .numerics import flat_tensors
from .passes.quant.options import Quantization, quantization
from .passes.skip import EarlyExit, LayerSkip
from .passes.sparsity import Sparsity
from .progress import Progress
from .report import default_instruments
from .runtime import build_program, has_cond
from .targets import Target, get_target


PRECISIONS = ("fp32", "fp16")


def compile(model: torch.nn.Module, example_inputs: Any, *, target: str | Target = "cpu", backend: str | None = None,
            passes: str | Sequence[str | Pass] = "default", dump_dir: str | Path | None = None,
            verify: bool = False, tolerance: float = 1e-4, dynamic_shapes: Any = None,
            tune: Tune | None = None, quantize: str | Quantization | None = None, calibration: Any = None,
            accuracy_budget: float | None = None, layer_skip: LayerSkip | None = None,
            early_exit: EarlyExit | None = None, sparsity: Sparsity | None = None,
            optimize=None, precision: str = "fp32", check: bool = True,
            progress: bool | None = None, rpc=None, measure: float | None = None) -> CompiledModule:
    """Capture `model` on `example_inputs` (a tuple of positional inputs, a dict of keyword inputs, or
    one tensor), optimize it and build it for `target`.

    backend: "ort", "tvm" or "auto". By default "auto" (on cuda "ort"): ONNX Runtime, with graphopt's TVM kernels
    between ORT segments where that measures faster (depthwise FFT convolutions), tuned TVM where `tune=` is given
    and measures faster; on arm64 both the ONNX model and TVM's cross-compiled library, for `export(dir)` to ship
    (nothing can be timed here to choose between them). Every measured decision of the passes is timed on the
    backend that runs the model (TVM builds for backend="tvm").

    dump_dir: write per-pass dumps and report.html there.  verify: raise VerificationError at the first
    pass whose output drift (relative to output scale) exceeds `tolerance`.  dynamic_shapes: a
    torch.export spec, or "batch" to let dim 0 of every input vary.  tune: graphopt.Tune(...) searches
    kernel schedules for the TVM backend, keeping what it finds in a database directory.

    The families' options are graphopt.Option objects (graphopt/options.py), each checked before any work:
    quantize: graphopt.Quantization("int8" | "int8-dynamic" | "int4-weight" | "auto", budget=...) or the mode's
    name; "int8" (static) and "auto" need `calibration`, a list of batches shaped like example_inputs; "auto" is
    per layer float/int8/int4, the fastest plan whose mean (1 − cosine) output error on the calibration batches
    stays within the budget (`accuracy_budget`, 0.01).

    layer_skip: graphopt.LayerSkip(budget=...) drops the residual blocks that save most time within the budget.
    early_exit: graphopt.EarlyExit(budget=...) lets each sample leave after a block when an exit head is
    confident, the graph compiled as segments run by a host dispatcher (`cm.last_exits`); captured with a
    dynamic batch dim. Both need `calibration`; their budget is the allowed quality loss on it.

    precision: "fp32", or "fp16" (TVM): convs and matmuls in half precision with fp32 accumulation, the rest as
    Relax's mixed-precision rewrite decides; the inputs and outputs stay fp32. For GPUs (tensor cores); lossy, so
    verify reports the backend step without checking it.

    sparsity: graphopt.Sparsity() removes channels, heads and FFN units already all zero in the weights (exact);
    Sparsity("structured", ratio=... | budget=...) prunes them, Sparsity("block", ratio=0.9) prunes linears to
    block-sparse weights (run by a block-sparse kernel where measured faster), Sparsity("2:4") to N:M; pruning
    needs `calibration` (importance, reconstruction of the next layer, and the budget are measured on it).

    optimize: graphopt.Auto(budget=0.01, metric="cosine" | "top1" | callable, time_budget=None) spends one budget
    across quantization, structured pruning and layer skipping: the fastest plan measured on the target whose loss on
    held-out calibration batches fits (needs ≥ 2 `calibration` batches); `cm.plan` is what it chose, savable as JSON
    and given back as optimize=plan (or its path) to rebuild the same model without searching.

    check: run the built module once on the example inputs and raise VerificationError where an output is NaN or
    infinite and eager's is not, or, when every pass is lossless, further than 1e-2 of the output scale from eager's
    (a defect in a backend's lowering would otherwise be silent). check=False skips that one call.

    progress: a progress line on stderr (each phase and what it measures now): True, False, or None (default) for
    only when stderr is a terminal.

    measure: the seconds this compile may spend measuring decisions on the target (verdicts from the cache cost
    nothing); once spent, the decisions after take their stated defaults (conv epilogues fused, long convs left
    direct, ORT's fusions as ORT applies them), each saying so in its notes. None (default): no limit.

    rpc: graphopt.RPC(tracker="host:port", key=...): boards of the target's kind behind TVM's RPC tracker, where TVM
    builds are measured — MetaSchedule's candidates (tune=, which may carry it instead: Tune(rpc=...)) and the cost
    model's decisions for backend="tvm" — and where an arm64 TVM module's calls run. Probed before any work.

    What planning passes decided (quantize="auto"'s per-layer plan, early exit's exits) is in `cm.plans`."""
    # 1. everything the user gave is checked before any work
    tgt = get_target(target, _rpc(rpc, tune))
    if measure is not None and (isinstance(measure, bool) or not isinstance(measure, (int, float))
                                or not math.isfinite(measure) or measure < 0):
        raise InputError(f"measure={measure!r}: give the seconds this compile may spend measuring, a finite number "
                         "≥ 0 (0: measure nothing, take every default), or None for no limit")
    be = get_backend(backend, tgt)
    options = [_option("sparsity", sparsity, Sparsity), quantization(quantize, accuracy_budget),
               _option("layer_skip", layer_skip, LayerSkip), _option("early_exit", early_exit, EarlyExit),
               optimize_option(optimize)]
    options = [o for o in options if o is not None]
    be.check(tgt, tune)
    pipeline = with_options(resolve(passes, tgt), options)
    if precision not in PRECISIONS:
        raise InputError(f"precision={precision!r}: choose one of {', '.join(map(repr, PRECISIONS))}")
    if precision != "fp32" and (be.name != "tvm" or early_exit is not None):
        raise UnsupportedError(f"precision={precision!r} is implemented on backend='tvm' (Relax's mixed-precision "
                               "rewrite), without early_exit=; for ONNX Runtime use quantize= instead")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance) \
            or tolerance <= 0:
        raise InputError(f"tolerance={tolerance!r}: give a finite number > 0, the allowed drift relative to the "
                         "output scale (default 1e-4)")
    if progress is not None and not isinstance(progress, bool):
        raise InputError(f"progress={progress!r}: give True, False, or None (only on a terminal)")
    if not isinstance(check, bool):
        raise InputError(f"check={check!r}: give True (run the build once and compare it with eager) or False")
    args, kwargs = _example(model, example_inputs)
    if isinstance(dynamic_shapes, str):
        if dynamic_shapes != "batch":
            raise InputError(f"dynamic_shapes={dynamic_shapes!r}: give 'batch' or a torch.export dynamic_shapes spec")
        dynamic_shapes = batch_dynamic_shapes(model, args, kwargs)
    for option in options:
        option.check(model, tgt, be.name)
    if be.name in ("ort", "auto") and torch.bfloat16 in _dtypes(model, args, kwargs):
        raise UnsupportedError("the model or its inputs are bfloat16, and ONNX Runtime's CPU provider has no bfloat16 "
                               "kernels for most ops (Add, Conv, MatMul): use backend='tvm', or model.float()")
    calibration = check_batches(calibration, args, kwargs)
    check_calibration(options, calibration)
    for option in options:
        option.check_data(model, calibration)
    needy = [p.name for p in pipeline if p.needs_calibration]
    if needy and not calibration:
        raise InputError(f"pass {needy[0]} needs calibration data: pass calibration=[batch, ...] with a few "
                         "representative inputs shaped like example_inputs")
    if any(o.dynamic_batch for o in options) and dynamic_shapes is None:
        dynamic_shapes = batch_dynamic_shapes(model, args, kwargs)
    if dump_dir is not None:
        dump_dir = writable_dir(dump_dir, "dump_dir")
    if tgt.rpc is not None:
        tgt.rpc.probe()        # an unreachable tracker, or none of the key's boards: an InputError now

    register_kv_caches()   # a model's KV cache counts as outputs, eager's too
    eager = _outputs(_run_eager(model, args, kwargs))   # inputs the model rejects fail here, before any work
    reference = eager if verify or check or dump_dir is not None else None

    # 2. capture → passes → build
    with Progress(progress, phases=len(pipeline) + 3) as shown:
        shown.phase("capture")
        graph = capture(model, args, kwargs, dynamic_shapes)
        for option in options:
            option.check_graph(graph)
        if has_cond(graph):
            _check_cond_options(pipeline, dynamic_shapes)
        cost = be.cost_model(tgt)            # every measured decision, timed as this backend runs the model
        cost.on_measure = shown.step
        cost.measure_budget = measure
        manager = PassManager(pipeline, default_instruments(dump_dir, verify, tolerance, reference, check))
        manager.run(graph, PassContext(tgt, args, kwargs, calibration, cost, shown))
        shown.phase(f"build ({be.name})")
        t0, asked = time.perf_counter(), len(cost.ledger)
        inputs = BuildInputs(args, kwargs, dynamic_shapes, tune, precision, cost)
        executable = build_program(graph, be, tgt, inputs, pipeline, manager.plans)
        build_s = time.perf_counter() - t0
        verdicts = [line] if (line := cost.summary(asked)) else []
        compiled = CompiledModule(graph, executable, tgt, getattr(executable, "backend", be.name), manager.records,
                                  [(p.name, getattr(p, "phase", "unknown")) for p in pipeline],
                                  (graph.flat_inputs(args, kwargs), eager), manager.plans)
        shown.phase("check")
        outputs = compiled(*args, **kwargs) if reference is not None and compiled.runs_here else None
        manager.record_backend(f"backend-{compiled.backend}", outputs, build_s, graph, executable.describe() + verdicts,
                               getattr(executable, "tables", list)(), rounds=None if precision == "fp32" else precision)
    return compiled


def _rpc(rpc, tune):
    """The RPC device, given to compile (rpc=) or with the tuning (Tune(rpc=...)); two different ones are an error."""
    given = getattr(tune, "rpc", None)
    if rpc is not None and given is not None and rpc != given:
        raise InputError(f"rpc={rpc} and tune=Tune(rpc={given}) name different devices: give one")
    return rpc if rpc is not None else given


def _option(keyword: str, value, cls: type[Option]) -> Option | None:
    if value is not None and not isinstance(value, cls):
        raise InputError(f"{keyword}= takes a graphopt.{cls.__name__}(...), got {type(value).__name__}")
    return value


def _run_eager(model: torch.nn.Module, args: tuple, kwargs: dict):
    """The model's outputs on the example inputs; where it raises, an InputError naming the innermost module it
    was in and the inputs given (a wrong dtype or rank otherwise surfaced after capture and the passes as an
    ONNX Runtime failure). The module is found from the traceback: hooks would break torch.cond's tracing."""
    try:
        with torch.no_grad():
            return model(*args, **kwargs)
    except Exception as e:
        names = {id(m): name for name, m in model.named_modules()}
        name, mod, tb = "", model, e.__traceback__
        while tb is not None:
            obj = tb.tb_frame.f_locals.get("self")
            if isinstance(obj, torch.nn.Module) and id(obj) in names:
                name, mod = names[id(obj)], obj
            tb = tb.tb_next
        given = ", ".join(f"{pytree.keystr(p)}: {str(t.dtype).removeprefix('torch.')}{list(t.shape)}"
                          for p, t in pytree.tree_flatten_with_path((args, kwargs))[0])
        raise InputError(f"the model raised on example_inputs in {name or 'the top module'!r} "
                         f"({type(mod).__name__}): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
                         f"inputs given: {given}. Give inputs of the dtype and shape the model takes") from e


def _outputs(outputs) -> list[torch.Tensor]:
    """The model's output tensors; a cache transformers' export support cannot flatten is an UnsupportedError."""
    try:
        return flat_tensors(outputs)
    except RuntimeError as e:   # transformers' DynamicCache flattening refuses caches of other layer kinds
        if "DynamicCache" not in str(e):
            raise
        raise UnsupportedError(f"the model returns a KV cache graphopt cannot return as tensors ({str(e).strip()}): "
                               "set use_cache=False in the model's config (or call it with use_cache=False)") from e


def _check_cond_options(pipeline: list[Pass], dynamic_shapes) -> None:
    """A model with torch.cond is run as a host program of static segments (runtime/control.py)."""
    lossy = [p.name for p in pipeline if p.lossy]
    if lossy:
        raise UnsupportedError(f"the model contains torch.cond, and {', '.join(lossy)} cannot yet be applied inside "
                               "its branches (their calibration data would have to be routed per branch): compile "
                               "without it, or apply it to a model without torch.cond")
    if dynamic_shapes is not None:
        raise UnsupportedError("the model contains torch.cond, whose branches graphopt compiles for the example's "
                               "shapes: compile once per input shape, without dynamic_shapes")


def _dtypes(model: torch.nn.Module, args: tuple, kwargs: dict) -> set[torch.dtype]:
    tensors = [*model.parameters(), *model.buffers(), *pytree.tree_leaves((args, kwargs))]
    return {t.dtype for t in tensors if isinstance(t, torch.Tensor)}


def _example(model, example_inputs) -> tuple[tuple, dict]:
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise InputError(f"model is in training mode (e.g. {training[0]!r}): call model.eval() first. graphopt "
                         "compiles for inference; capturing training mode would bake in dropout and batch statistics")
    if isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        raise InputError(f"example_inputs must be a tuple of inputs, a dict of keyword inputs or a tensor, "
                         f"got {type(example_inputs).__name__}")
    for path, leaf in pytree.tree_flatten_with_path((args, kwargs))[0]:
        if not isinstance(leaf, torch.Tensor):
            raise InputError(f"example input {pytree.keystr(path)} is a {type(leaf).__name__}; graphopt compiles "
                             "tensor inputs only: bind other arguments with functools.partial or a wrapper module")
    if not args and not kwargs:
        raise InputError("example_inputs is empty: give the tensors the model is called with")
    return args, kwargs
