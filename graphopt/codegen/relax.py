"""IR → TVM Relax through TVM's own torch frontend, with graphopt ops converted by their Relax part."""
from __future__ import annotations

import re
from typing import Any

import torch

from ..capture import dynamic_export
from ..errors import UnsupportedError
from ..ir import Graph, op_name
from ..ops import relax_convert_map
from ..quiet import quiet


def to_relax(graph: Graph, args: tuple, kwargs: dict | None = None, dynamic_shapes: Any = None,
             target="cpu"):
    """The optimized graph as a Relax IRModule (weights bound as constants), for `target` (a graphopt
    Target or its name: graphopt ops may lower to kernels written for it)."""
    from tvm.relax.frontend.torch import from_exported_program
    # exported at batch 2 where the batch is dynamic and 1: from a batch-1 example TVM built a broadcast it then
    # rejected (topi broadcast_to, a Whisper encoder)
    def doubled(a, spec):
        return torch.cat([a, a]) if isinstance(spec, dict) and 0 in spec and a.shape[0] == 1 else a
    if isinstance(dynamic_shapes, (tuple, list)):
        args = tuple(doubled(a, spec) for a, spec in zip(args, dynamic_shapes))
    elif isinstance(dynamic_shapes, dict) and kwargs:   # keyed by parameter name (keyword inputs)
        kwargs = {k: doubled(v, dynamic_shapes.get(k)) for k, v in kwargs.items()}
    with graph.flat_outputs():
        ep = _export(graph, args, kwargs, dynamic_shapes)
    values = {**dict(ep.named_parameters()), **dict(ep.named_buffers()), **ep.constants}
    constants = {s.arg.name: values[s.target] for s in ep.graph_signature.input_specs if s.target in values}
    try:
        converters = {**relax_convert_map(target, constants.get), "cumsum.default": cumsum,
                      "index.Tensor": shape_keeping("_index_tensor", wrapped_indices)}
        with quiet(stdout=True):   # its decompositions warn (torch's pytree API)
            imported = from_exported_program(ep, custom_convert_map=converters)
        return integer_powers_as_products(shapes_within_bounds(imported))
    except (AssertionError, KeyError, ValueError, NotImplementedError) as e:
        raise import_error(e, graph) from e


def import_error(e: Exception, graph: Graph) -> UnsupportedError:
    """One line from TVM's import failure; for ops it has no converter for, each op with where it came from (the
    model's module, or a graphopt pass) and what to do."""
    first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)[:300]
    unsupported = re.search(r"Unsupported function types \[(.*?)\]", first)
    if unsupported is None:
        return UnsupportedError(f"TVM Relax import failed: {first}. Compile with backend='ort', or report the model "
                                "to graphopt.")
    names = {n.strip(" '") for n in unsupported.group(1).split(",")}
    places = []
    for name in sorted(names):
        node = next((n for n in graph.ops() if op_name(n) == name.removesuffix(".default")
                     or str(n.target).endswith(name)), None)
        stack = list((node.meta.get("nn_module_stack") or {}).values()) if node is not None else []
        where = ""
        if stack:   # (path, class) of the innermost module the op was traced in
            path, cls = stack[-1]
            where = f" in module {path!r} ({getattr(cls, '__name__', cls)})" if path else f" in the top module ({cls})"
        origin = "written by a graphopt pass: compile with that pass left out of passes=" \
            if name.startswith("graphopt") else "from the model"
        places.append(f"{name}{where}, {origin}")
    return UnsupportedError(f"TVM's Relax frontend has no converter for {'; '.join(places)}. Compile with "
                            "backend='ort' (ONNX Runtime runs these, data-dependent shapes included), or keep the op "
                            "out of the compiled module.")


def wrapped_indices(node, importer) -> dict:
    """{index node: its Relax value with negative indices wrapped as torch does (i + size)}, for aten.index.Tensor.
    TVM lowers indexing to take / index_tensor in their 'fast' mode, which reads out of bounds for a negative
    index: Falcon picks its shared key and value heads as qkv[..., [-2], :] and qkv[..., [-1], :], and on TVM read
    memory before the tensor (NaN or garbage logits, silently). Cheap: index tensors are small."""
    from tvm import relax
    data, indices = node.args[0], node.args[1]
    wrapped = {}
    for axis, index in enumerate(indices):
        if not isinstance(index, torch.fx.Node) or index in wrapped:
            continue
        meta = index.meta.get("val")
        if meta is None or meta.dtype == torch.bool or not meta.dtype.is_signed:
            continue
        value, dtype, R = importer.env[index], str(meta.dtype)[len("torch."):], relax.op
        bb = importer.block_builder   # the size from the tensor's runtime shape: its type may know only its rank
        sizes = bb.emit(R.astype(R.take(R.shape_to_tensor(R.shape_of(importer.env[data])), relax.const([axis])), dtype))
        negative = bb.emit(R.less(value, relax.const(0, dtype)))
        wrapped[index] = bb.emit(R.where(negative, R.add(value, sizes), value))
    return wrapped


def shape_keeping(method: str, rewrite_args=None):
    """TVM's converter `method`, its result cast to the shape torch.export recorded for the node where TVM's own
    inference has none. GPT-2's causal mask indexes the [b, s] attention mask by [b, 1, s, 1] indices: Relax gave
    the result no shape, and R.where on it then crashed the process (a segfault in TVM's shape inference).
    R.match_cast also checks the shape when the module runs. `rewrite_args(node, importer)` may first replace some
    arguments' Relax values ({fx node: value}) for this call."""
    def convert(node, importer):
        from tvm import relax
        replaced = rewrite_args(node, importer) if rewrite_args else {}
        kept = {n: importer.env[n] for n in replaced}
        importer.env.update(replaced)
        try:
            value = getattr(importer, method)(node)
        finally:
            importer.env.update(kept)
        meta = node.meta.get("val")
        shape = value.ty.shape if isinstance(value.ty, relax.TensorType) else None
        if shape is not None or meta is None:
            return value
        sizes = {v.name: v for n, p in importer.env.items() if n.op == "placeholder"   # the inputs define them
                 for v in relax.analysis.definable_tir_vars_in_type(p.ty)}
        dims = [int(d) if str(d).lstrip("-").isdigit() else sizes.get(str(d)) for d in meta.shape]
        if None in dims:   # a size expression (s0*s1) or one no input has: leave it to TVM
            return value
        return importer.block_builder.match_cast(value, relax.TensorType(dims, value.ty.dtype))
    return convert


def cumsum(node, importer):
    """torch.cumsum with torch's result type: a cumulative sum of bools or integers is int64. TVM's converter
    kept bool (GPT-2's mask counts its padding with a cumsum of bools), which LLVM codegen then rejected."""
    from tvm import relax
    x, axis = importer.env[node.args[0]], node.args[1]
    dtype = str(node.meta["val"].dtype).removeprefix("torch.")
    return importer.block_builder.emit(relax.op.cumsum(x, axis, dtype=dtype))


def _export(graph: Graph, args: tuple, kwargs: dict | None, dynamic_shapes: Any):
    """The graph re-exported for TVM's frontend. Dynamic sizes are first reasoned about as torch.export does by
    default, which records the bounds the model implies (BERT's sequence ≤ its 512 positions) for TVM's frontend
    to pass on as tir_var_upper_bound; size-obliviously (no bounds) only where that fails."""
    try:
        with quiet(stdout=True):
            return torch.export.export(graph.module, args, kwargs or None, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception:  # noqa: BLE001 - torch raises many types; the size-oblivious export below has the last word
        if dynamic_shapes is None:
            raise
    with quiet(stdout=True), dynamic_export(dynamic_shapes):
        return torch.export.export(graph.module, args, kwargs or None, dynamic_shapes=dynamic_shapes, strict=False)


def integer_powers_as_products(mod):
    """x ** n for a whole n as products by repeated squaring (1 / that for a negative n, ones for 0). TVM compiles
    CUDA with --use_fast_math, where powf(x, n) is exp2(n · log2 x): NaN for every negative x, which made GPT-2
    (its GELU cubes) and Llama and T5 (their RMSNorms square) return NaN on the GPU. Exact for squares and cubes,
    and cheaper than powf on every target."""
    import numpy as np
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

    base, exponent = wildcard(), is_const()

    def products(call, matches):
        n = matches[exponent].value.numpy()
        if n.size != 1 or not float(n).is_integer() or abs(float(n)) >= 2 ** 31:
            return call
        x, power, result, k = matches[base], None, None, abs(int(n))
        if k == 0:
            return relax.op.ones_like(x)
        while k:   # square-and-multiply: x ** 13 is x · x⁴ · x⁸, five multiplications
            power = x if power is None else relax.op.multiply(power, power)
            if k & 1:
                result = power if result is None else relax.op.multiply(result, power)
            k >>= 1
        return result if int(n) > 0 else relax.op.divide(relax.const(np.ones((), n.dtype)), result)

    pattern = is_op("relax.power")(base, exponent)
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            mod[gv] = rewrite_call(pattern, products, func)
    return mod


def size_bounds(func) -> dict:
    """{symbolic size var: its highest value or None} of a Relax function's inputs, from its bounds attribute
    (TVM plans memory for the highest: a call beyond it must be refused)."""
    from tvm import relax
    upper = (func.attrs or {}).get("tir_var_upper_bound", {})
    return {v: int(upper[v.name]) if v.name in upper else None
            for p in func.params for v in relax.analysis.definable_tir_vars_in_type(p.ty)}


def size_limits(mod) -> list[tuple[int, int, int]]:
    """(input, dim, highest size) for each dynamic input size with an upper bound."""
    from tvm import relax
    func = mod["main"]
    highest = {v: hi for v, hi in size_bounds(func).items() if hi is not None}
    shapes = [p.ty.shape.values if isinstance(getattr(p.ty, "shape", None), relax.ShapeExpr) else []
              for p in func.params]
    return [(i, d, highest[size]) for i, shape in enumerate(shapes) for d, size in enumerate(shape) if size in highest]


def shapes_within_bounds(mod):
    """Sizes simplified by the bounds of the dynamic ones (at least 1, at most what torch.export proved), and slices
    marked in bounds where those prove it. BERT slices its 512 position ids to the sequence length s: Relax gives
    that min(s, 512) elements, cannot show that the add with the [b, s] embeddings broadcasts, and gives the sum no
    shape (ndim only), which TVM's TE lowering rejects. torch.export proved s ≤ 512; with that bound the slice has
    s elements and the shapes stay known (GPT-2's mask: min(1, s) is 1)."""
    import tvm
    from tvm import relax
    from tvm.relax import PyExprMutator, expr_functor
    from tvm.sym.analyzer import Analyzer, ConstIntBound

    func = mod["main"]
    bounds = size_bounds(func)
    if not bounds:
        return mod
    analyzer = Analyzer()
    for var, hi in bounds.items():   # from 1, not torch.export's 2: a batch of 1 is a batch
        analyzer.update(var, ConstIntBound(1, ConstIntBound.POS_INF if hi is None else hi))

    def same_shape(a, b) -> bool:
        return (isinstance(a, relax.ShapeExpr) and isinstance(b, relax.ShapeExpr) and len(a.values) == len(b.values)
                and all(analyzer.can_prove_equal(x, y) for x, y in zip(a.values, b.values)))

    @expr_functor.mutator
    class InBounds(PyExprMutator):
        def visit_shape_expr_(self, shape):   # the frontend's reshape targets spell the slice's min(s, 512) too
            return relax.ShapeExpr([analyzer.simplify(v) for v in shape.values])

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.strided_slice"
                    and not call.attrs.assume_inbound):
                return call
            sliced = self.builder_.normalize(call)
            x, axes, *rest = call.args
            ndim = x.ty.ndim   # TOPI's in-bounds slice takes no negative axis
            axes = [int(a.value) % ndim for a in (axes.fields if isinstance(axes, relax.Tuple) else axes.values)]
            inbound = self.builder_.normalize(relax.op.strided_slice(x, axes, *rest, assume_inbound=True))
            return inbound if same_shape(sliced.ty.shape, inbound.ty.shape) else sliced

    mutator = InBounds(mod)
    mutator.builder_.update_func(mod.get_global_var("main"), mutator.visit_expr(func))
    return mutator.builder_.get()
