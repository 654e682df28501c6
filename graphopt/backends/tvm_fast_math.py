"""Vectorizable transcendentals for TVM's CPU builds.

TVM lowers exp, tanh, erf (and pow) to LLVM intrinsics that LLVM scalarizes into libm calls (16 per AVX-512
vector): a tuned fused bias + tanh-GELU · sigmoid chain on [128, 3072] took 3.6 ms, against 0.5 ms for
ONNX Runtime's six separate (vectorized) kernels. TOPI's fast_exp/fast_tanh/fast_erf are polynomial and
vectorize; Relax's FastMathTransform swaps them in, but only for the bare exp, tanh, erf and softmax ops,
so the activations built from them (GELU in both forms, sigmoid, SiLU) and attention (TOPI's computes its
softmax with scalar exp; causal attention only at static lengths, its mask a constant) are first written out
with those ops, and x² and x³ as products. The error stays within a few fp32 ulps
(tests/test_tvm_backend.py checks it against torch). Tuned BERT-base: 214 → 163 ms with attention written out."""
from __future__ import annotations

import math

import numpy as np


def fast_math(mod):
    """Relax module → the same with every transcendental activation in TOPI's vectorizable fast forms."""
    import tvm
    from tvm import relax
    from tvm.relax import PyExprMutator, expr_functor

    op = relax.op

    def const(x, value: float):
        return relax.const(value, x.ty.dtype)

    def sigmoid(x):   # 1 / (1 + e^-x): fast_exp clamps its argument, so large |x| gives exactly 0 or 1
        return op.divide(const(x, 1.0), op.add(const(x, 1.0), op.exp(op.negative(x))))

    def gelu(x):      # x · ½(1 + erf(x/√2))
        return op.multiply(x, op.add(const(x, 0.5), op.multiply(const(x, 0.5),
                                                                 op.erf(op.multiply(x, const(x, math.sqrt(0.5)))))))

    def gelu_tanh(x):  # x · ½(1 + tanh(√(2/π)(x + 0.044715 x³)))
        inner = op.multiply(const(x, math.sqrt(2 / math.pi)),
                            op.add(x, op.multiply(const(x, 0.044715), op.multiply(x, op.multiply(x, x)))))
        return op.multiply(x, op.add(const(x, 0.5), op.multiply(const(x, 0.5), op.tanh(inner))))

    def causal_mask(call):   # additive [q_len, kv_len] constant; None where the lengths are symbolic
        try:
            s, t = int(call.args[0].ty.shape[1]), int(call.args[1].ty.shape[1])
        except (TypeError, ValueError):
            return None
        first_masked = 1 + (0 if call.attrs.causal_mask == "TopLeft" else t - s)
        return relax.const(np.triu(np.full((s, t), -np.inf, np.float32), first_masked))

    def attention(call, masks):   # [b, s, h, d] in and out
        q, k, v = call.args[:3]
        scale = call.attrs.scale.value if call.attrs.scale is not None else 1 / math.sqrt(int(q.ty.shape[-1]))
        scores = op.multiply(op.matmul(op.permute_dims(q, [0, 2, 1, 3]), op.permute_dims(k, [0, 2, 3, 1])),
                             const(q, scale))
        for mask in masks:
            scores = op.add(scores, mask)
        probs = op.nn.softmax(scores, axis=-1)
        return op.permute_dims(op.matmul(probs, op.permute_dims(v, [0, 2, 1, 3])), [0, 2, 1, 3])

    def power(call):   # x² or x³ as products (GPT-2 writes its GELU with x³); None for other exponents
        x, n = call.args
        n = n.value.numpy() if isinstance(n, tvm.ir.expr.Constant) else None
        if n is None or n.size != 1 or float(n) not in (2, 3):
            return None
        square = op.multiply(x, x)
        return square if float(n) == 2 else op.multiply(square, x)

    expand = {"relax.sigmoid": sigmoid, "relax.nn.silu": lambda x: op.multiply(x, sigmoid(x)),
              "relax.nn.gelu": gelu, "relax.nn.gelu_tanh": gelu_tanh}
    attentions = ("relax.nn.attention", "relax.nn.attention_bias")

    @expr_functor.mutator
    class Expand(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            fp32 = bool(call.args) and getattr(call.args[0].ty, "dtype", None) == "float32"
            if not isinstance(call.op, tvm.ir.Op) or not fp32:
                return call
            if call.op.name in expand:
                return self.builder_.normalize(expand[call.op.name](call.args[0]))
            if call.op.name == "relax.power" and (product := power(call)) is not None:
                return self.builder_.normalize(product)
            if call.op.name in attentions and call.attrs.window_size is None:
                masks = list(call.args[3:]) + ([] if call.attrs.causal_mask is None else [causal_mask(call)])
                if None not in masks:
                    return self.builder_.normalize(attention(call, masks))
            return call

    mutator = Expand(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return relax.transform.FastMathTransform()(mutator.builder_.get())
