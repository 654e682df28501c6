"""Issue 36: mixture-of-experts models — eager PyTorch, torch.compile, plain ONNX Runtime (torch.onnx's export of
the model as transformers runs it) and graphopt on ORT and on TVM, side by side in one process.

    python benchmarks/bench_moe.py [--models mixtral,qwen2_moe] [--tokens 64] [--hidden 256] [--experts 8]

graphopt captures each experts module as graphopt::moe_experts (every expert on every token as batched GEMMs,
weighted by the router: E/k times the routed multiply-adds, no data-dependent shapes)."""
import argparse
import time

import torch
import transformers

import graphopt
from graphopt import bench


def build(name: str, hidden: int, experts: int, layers: int):
    common = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=8,
                  num_key_value_heads=4, num_experts_per_tok=2, vocab_size=4096, use_cache=False)
    if name == "mixtral":
        config = transformers.MixtralConfig(num_local_experts=experts, **common)
        return transformers.MixtralForCausalLM(config).eval()
    config = transformers.Qwen2MoeConfig(num_experts=experts, moe_intermediate_size=hidden,
                                         shared_expert_intermediate_size=2 * hidden, **common)
    return transformers.Qwen2MoeForCausalLM(config).eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mixtral,qwen2_moe")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--no-tvm", action="store_true")
    ns = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median ms per call, interleaved rounds")
    for name in ns.models.split(","):
        torch.manual_seed(0)
        model = build(name, ns.hidden, ns.experts, ns.layers)
        args = (torch.randint(0, 4096, (1, ns.tokens)),)
        with torch.no_grad():
            ref = model(*args).logits
        systems = {"eager": bench.eager(model), "torch.compile": bench.torch_compiled(model)}
        try:
            systems["plain ORT"] = bench.plain_ort(model, args)
        except Exception as e:   # noqa: BLE001 - say why the peer is missing, and go on
            print(f"  plain ORT: torch.onnx cannot export {type(model).__name__}: "
                  f"{next((ln for ln in str(e).splitlines() if 'grouped_mm' in ln or 'No ONNX' in ln), str(e)[:160])}")
        compile_s = {}
        for backend in ["ort"] + ([] if ns.no_tvm else ["tvm"]):
            t0 = time.perf_counter()
            cm = graphopt.compile(model, args, backend=backend)
            compile_s[backend] = time.perf_counter() - t0
            err = (bench.main_output(cm(*args)) - ref).abs().max().item() / ref.abs().max().item()
            label = "graphopt" if backend == "ort" else "graphopt TVM"
            systems[label] = cm
            print(f"  {label}: compile {compile_s[backend]:.1f} s, relative error vs eager {err:.2e}, "
                  f"moe_experts ops {cm.graph.op_counts().get('graphopt.moe_experts', 0)}")
        ms = bench.time_side_by_side(systems, args, rounds=ns.rounds)
        title = (f"{name}: {ns.layers} layers, hidden {ns.hidden}, {ns.experts} experts top-2, "
                 f"{ns.tokens} tokens:")
        print("\n".join(bench.format_table(title, ms)), flush=True)


if __name__ == "__main__":
    main()
