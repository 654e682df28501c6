"""Capture: torch.export (non-strict) → core ATen, keeping the high-level ops passes match on.

A model that cannot be captured raises CaptureError naming the module and source line that
stopped torch.export, and the reason in one sentence, instead of a traceback wall."""
from __future__ import annotations

import contextlib
import inspect
import os
import sys
import traceback
from typing import Any

import torch
from torch.export import Dim

from .errors import CaptureError, InputError
from .ir import Graph
from .ir.decompose import decompose_locally
from .hf import transformers_capture
from .quiet import quiet

# Ops kept whole (not decomposed): passes and backends have better lowerings for them.
KEPT_OPS = (
    torch.ops.aten.linear.default,
    torch.ops.aten.matmul.default,
    torch.ops.aten.layer_norm.default,
    torch.ops.aten.rms_norm.default,
    torch.ops.aten.group_norm.default,
    torch.ops.aten.scaled_dot_product_attention.default,
    torch.ops.aten.gelu.default,
    torch.ops.aten.silu.default,
    torch.ops.aten.hardswish.default,
    torch.ops.aten.hardsigmoid.default,
)


def dynamic_export(dynamic_shapes: Any):
    """Around a torch.export of dynamic shapes: sizes reasoned about size-obliviously, so an example of batch 1
    does not specialize the batch to 1 (torch.export's 0/1 specialization: a Whisper encoder given batch 1 and
    dynamic_shapes="batch" failed with a constraint conflict). Users mostly give batch-1 examples."""
    if dynamic_shapes is None:
        return contextlib.nullcontext()
    from torch.fx.experimental import _config
    return _config.patch(backed_size_oblivious=True)


def capture(model: torch.nn.Module, args: tuple, kwargs: dict | None = None, dynamic_shapes: Any = None) -> Graph:
    table = torch.export.default_decompositions()
    for op in KEPT_OPS:
        table.pop(op, None)
    with transformers_capture(model):
        try:
            with quiet(stdout=True), dynamic_export(dynamic_shapes):
                ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
        except Exception as e:  # torch raises many types here; all mean "could not capture"
            raise CaptureError(describe_capture_failure(e, model)) from e
        # node by node where it can be (ir/decompose.py: no second trace of the whole model), else the retrace
        module = decompose_locally(ep.module(check_guards=False), dict(table.items()), KEPT_OPS) \
            if dynamic_shapes is None else None
        if module is None:
            with quiet():
                module = ep.run_decompositions(table).module(check_guards=False)
    graph = Graph(module, ep.call_spec.in_spec, ep.call_spec.out_spec)
    _views_to_reshapes(graph)
    _drop_empty_concat_inputs(graph)
    return graph


def _drop_empty_concat_inputs(graph: Graph) -> None:
    """torch.cat skips 1-D empty tensors whatever the others' rank (a KV cache's first update concatenates its
    empty start with the keys); ONNX's Concat and Relax's concat require one rank: those inputs are dropped."""
    changed = False
    for node in graph.fx.find_nodes(op="call_function", target=torch.ops.aten.cat.default):
        tensors = node.args[0]
        metas = [t.meta.get("val") if isinstance(t, torch.fx.Node) else None for t in tensors]
        kept = [t for t, m in zip(tensors, metas) if not (m is not None and m.dim() == 1 and m.shape[0] == 0)]
        if len(kept) == len(tensors) or not kept or all(m is not None and m.dim() == 1 for m in metas):
            continue
        changed = True
        if len(kept) == 1:
            node.replace_all_uses_with(kept[0])
        else:
            node.args = (kept, *node.args[1:])
    if changed:
        graph.eliminate_dead_code()
        graph.module.recompile()


def _views_to_reshapes(graph: Graph) -> None:
    """The IR has value semantics: a `view` is a `reshape` that happens to need contiguous strides.
    Making them reshapes lets passes drop copies (clone/contiguous) without breaking a later view."""
    for node in graph.fx.find_nodes(op="call_function", target=torch.ops.aten.view.default):
        node.target = torch.ops.aten.reshape.default
    for node in graph.fx.find_nodes(op="call_function", target=torch.ops.aten._unsafe_view.default):
        node.target = torch.ops.aten.reshape.default
    graph.module.recompile()


def batch_dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict | None) -> tuple | dict:
    """`dynamic_shapes="batch"`: dim 0 of every tensor input is dynamic, the rest static. With keyword inputs (as
    Hugging Face models are called: input_ids=, attention_mask=) the spec is keyed by forward()'s parameter names,
    the form torch.export takes for keyword inputs."""
    def spec(x):
        if isinstance(x, torch.Tensor):
            return {0: Dim.DYNAMIC} if x.dim() > 0 else None
        if isinstance(x, (list, tuple)):
            return type(x)(spec(v) for v in x)
        if isinstance(x, dict):
            return {k: spec(v) for k, v in x.items()}
        return None
    if not kwargs:
        return tuple(spec(a) for a in args)
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as e:
        raise InputError(f"example_inputs do not fit {type(model).__name__}.forward: {e}") from e
    return {name: spec(value) for name, value in bound.arguments.items()}


# --- capture errors ------------------------------------------------------------------------------
_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(__file__)


def describe_capture_failure(err: BaseException, model: torch.nn.Module) -> str:
    frame = _user_frame(err)
    reason = _reason(err)
    where = ""
    if frame is not None:
        module = _module_at(model, frame.filename, frame.lineno)
        where = f" at {frame.filename}:{frame.lineno}"
        if module:
            where += f" in module {module}"
        if frame.line:
            where += f"\n    {frame.line.strip()}"
    if "data-dependent" in reason:
        hint = "Rewrite data-dependent Python control flow with torch.where or torch.cond, or move it out of forward()."
    elif "not a known type" in reason:
        hint = ("The model returns (or takes) an object torch.export cannot flatten into tensors: return tensors, or "
                "register its class with torch.utils._pytree.register_pytree_node; a Hugging Face cache other than "
                "DynamicCache can be left out with use_cache=False in the model's config.")
    else:
        hint = ("Make forward() traceable by torch.export (non-strict): tensor inputs, no data-dependent Python "
                "control flow, no unsupported Python side effects.")
    return f"could not capture {type(model).__name__} with torch.export{where}\nreason: {reason}\n{hint}"


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _user_frame(err: BaseException):
    """The innermost frame in the user's (or a model library's) code, not in torch or graphopt."""
    best = None
    for e in _chain(err):
        for fr in traceback.extract_tb(e.__traceback__):
            f = fr.filename
            if f.startswith(_TORCH_DIR) or f.startswith(_OWN_DIR) or f.startswith("<") or \
                    "/lib/python3" in f and "site-packages" not in f:   # <string>: code torch generated
                continue
            best = fr
        if best is not None:
            return best
    return best


def _reason(err: BaseException) -> str:
    text = " ".join(str(e) for e in _chain(err))
    if "data-dependent" in text or "data dependent" in text or "GuardOnDataDependent" in text:
        return "data-dependent Python control flow: a branch or value depends on tensor contents"
    first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
    return f"{type(err).__name__}: {first[:300]}"


def _module_at(model: torch.nn.Module, filename: str, lineno: int) -> str | None:
    """Name (and class) of the submodule whose forward() holds filename:lineno."""
    for name, mod in model.named_modules():
        fwd = type(mod).forward
        try:
            if os.path.abspath(inspect.getsourcefile(fwd)) != os.path.abspath(filename):
                continue
            lines, start = inspect.getsourcelines(fwd)
        except (OSError, TypeError):
            continue
        if start <= lineno < start + len(lines):
            return f"'{name or '<root>'}' ({type(mod).__name__}.forward)"
    return None
