"""What capture does for Hugging Face transformers models: their KV caches become outputs, and their experts
(mixture-of-experts layers) become graphopt's moe_experts op, through the hooks transformers itself offers for
torch.export (its cache pytree support, its experts interface)."""
from __future__ import annotations

import contextlib
import sys

import torch


@contextlib.contextmanager
def transformers_capture(model: torch.nn.Module | None = None):
    """Around capture: KV caches as outputs, `model`'s experts as graphopt::moe_experts. Nothing where transformers
    is not in use."""
    with _kv_caches_as_outputs(), _experts_as_op(model):
        yield


def register_kv_caches() -> bool:
    """Hugging Face's DynamicCache as a pytree node (transformers' own registration for torch.export), so its
    tensors count as outputs, in eager's reference outputs too. False where transformers is not in use."""
    if "transformers" not in sys.modules:   # no Hugging Face model can be in play
        return False
    from transformers.integrations.executorch import register_dynamic_cache_export_support
    register_dynamic_cache_export_support()   # idempotent
    return True


@contextlib.contextmanager
def _kv_caches_as_outputs():
    """Hugging Face models return a DynamicCache by default (use_cache=True): its key and value tensors become
    outputs like any other, through the pytree support transformers ships for torch.export, and the compiled
    module returns a DynamicCache again. While capturing (export, and the decompositions' retrace, which rebuilds
    the cache from its tensors), a cache layer starts from an empty tensor made from the keys (`new_empty`) instead
    of `torch.tensor([])`: torch 2.13's run_decompositions drops the constants such a tensor becomes
    ("Constant tensor lifted_tensor_0 is not in the constants dictionary", pytorch#164461)."""
    if not register_kv_caches():
        yield
        return
    from transformers import cache_utils

    def lazy_initialization(self, key_states, value_states):
        self.device = key_states.device
        self.keys, self.values = key_states.new_empty((0,)), value_states.new_empty((0,))
        self.is_initialized = True

    original = cache_utils.DynamicLayer.lazy_initialization
    cache_utils.DynamicLayer.lazy_initialization = lazy_initialization
    try:
        yield
    finally:
        cache_utils.DynamicLayer.lazy_initialization = original



EXPERTS_IMPLEMENTATION = "graphopt"


@contextlib.contextmanager
def _experts_as_op(model: torch.nn.Module | None):
    """transformers dispatches every experts module (Mixtral, Qwen-MoE, OLMoE, DeepSeek…) through its experts
    interface by the config's `_experts_implementation`: while capturing, that is graphopt's, which calls
    graphopt::moe_experts instead of the default per-expert loop (data-dependent shapes) or grouped_mm (an opaque
    custom op no exporter lowers). The configs are restored afterwards."""
    experts = [m for m in model.modules() if _is_experts(m)] if model is not None and "transformers" in sys.modules \
        else []
    if not experts:
        yield
        return
    from transformers.integrations import moe
    if EXPERTS_IMPLEMENTATION not in moe.ALL_EXPERTS_FUNCTIONS:
        moe.ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, experts_forward)
    configs = {id(m.config): (m.config, m.config._experts_implementation) for m in experts}
    try:
        for config, _ in configs.values():
            config._experts_implementation = EXPERTS_IMPLEMENTATION
        yield
    finally:
        for config, implementation in configs.values():
            config._experts_implementation = implementation


def _is_experts(module: torch.nn.Module) -> bool:
    """A module transformers' use_experts_implementation decorated (it adds these attributes)."""
    return all(hasattr(module, a) for a in ("config", "has_gate", "has_bias", "is_transposed", "is_concatenated"))


def experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """transformers' experts forward as graphopt::moe_experts: the weights brought to [experts, out, in] with gate
    rows before up rows, the activation named. A variant the op does not express (a custom gate, a norm after each
    expert, expert parallelism) runs transformers' batched_mm form, standard gathers and batched matmuls."""
    from transformers.integrations import moe
    act = _activation(getattr(self, "act_fn", None))
    if (act is None or self.has_post_expert_norm or getattr(self, "_is_expert_parallel", False)
            or type(self)._apply_gate is not moe._default_apply_gate):
        return moe.batched_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    up = self.gate_up_proj if self.has_gate else self.up_proj
    up_bias = (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias) if self.has_bias else None
    down, down_bias = self.down_proj, self.down_proj_bias if self.has_bias else None
    if self.is_transposed:   # stored [experts, in, out]
        up, down = up.transpose(1, 2), down.transpose(1, 2)
    if self.has_gate and not self.is_concatenated:   # gate and up rows interleaved: gate rows first
        up = torch.cat([up[:, 0::2], up[:, 1::2]], dim=1)
        up_bias = None if up_bias is None else torch.cat([up_bias[:, 0::2], up_bias[:, 1::2]], dim=1)
    return torch.ops.graphopt.moe_experts(hidden_states, top_k_index, top_k_weights.to(hidden_states.dtype), up,
                                          down, up_bias, down_bias, act, self.has_gate)


def _activation(fn) -> str | None:
    """The name of ops/epilogue.py's activation that `fn` (a transformers ACT2FN module) computes, or None."""
    from transformers import activations as A
    names = [(torch.nn.SiLU, "silu"), (A.SiLUActivation, "silu"), (torch.nn.ReLU, "relu"), (torch.nn.Tanh, "tanh"), (torch.nn.Sigmoid, "sigmoid"),
             (A.GELUActivation, "gelu"), (A.NewGELUActivation, "gelu_tanh"), (A.PytorchGELUTanh, "gelu_tanh"),
             (A.GELUTanh, "gelu_tanh")]
    for cls, name in names:
        if type(fn) is cls:
            return name
    if type(fn) is torch.nn.GELU:
        return "gelu_tanh" if fn.approximate == "tanh" else "gelu"
    return None
