"""Operator-fusion benchmark: eager PyTorch, torch.compile, plain ONNX Runtime (torch.onnx export), the
ORT transformer optimizer (same export + onnxruntime.transformers.optimizer.optimize_model) and graphopt,
side by side in one process on the same inputs (interleaved, rotated rounds; see graphopt.bench).

    python benchmarks/bench_fusion.py [--models bert128,bert512,gpt2,vit,resnet,mobilenet_v2]
                                      [--size base|tiny] [--rounds 15] [--no-torch-compile]

Each table's title gives every system's max |error| relative to max |eager| on the first output.
"""
import argparse
import os
import tempfile

import onnx
import onnxruntime as ort
import torch
from onnxruntime.transformers.optimizer import optimize_model

import graphopt
from graphopt import bench, zoo
from graphopt.quiet import quiet

MODELS = {   # CLI name → (zoo name, sequence length; unused by the vision models)
    "bert128": ("bert", 128), "bert512": ("bert", 512), "gpt2": ("gpt2", 128),
    "vit": ("vit", 128), "resnet": ("resnet", 128), "mobilenet_v2": ("mobilenet_v2", 128),
}
ORT_MODEL_TYPE = {"bert": "bert", "gpt2": "gpt2", "vit": "vit"}   # onnxruntime.transformers model_type
CNN_SKIP = ("onnxruntime.transformers has no CNN fusions (only attention/LayerNorm/GELU patterns); ORT's own "
            "CNN fusions (Conv+BN, Conv+activation) already run in the plain ORT session")


class FirstOutput(torch.nn.Module):
    """The model called with keyword ids, returning its first output (TorchScript's tracer passes arguments
    positionally, which transformers' forward wrappers reject)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False)[0] if "use_cache" in self.model.forward.__code__.co_varnames \
            else self.model(input_ids=input_ids)[0]


def ort_optimizer(model: torch.nn.Module, args: tuple, model_type: str, dynamo: bool = True):
    """torch.onnx's export → optimize_model → ORT session with default options. ORT's documentation exports with
    the TorchScript exporter (dynamo=False), so both exports are run and labelled. With onnxruntime 1.32 neither
    gets an Attention fused here (tiny BERT, also with eager attention: BiasGelu 2, SkipLayerNormalization 5 on
    both), so these peers are "ORT's optimizer as a user runs it", not "ORT with fused attention"."""
    # Workarounds (onnxruntime 1.31): given a ModelProto, optimize_model moves every initializer out to external
    # data and ORT's shape inference then fails on Reshape's shape constants, so it gets a file; and at the
    # default opt_level 1 its ORT pre-pass runs MatMulAddFusion, whose Reshape-shape initializers
    # (gemm_input_shape…) collide when the final session runs that fusion again ("Attempt to replace the
    # existing tensor"); opt_level 2 (ORT's extended pre-pass) leaves MatMulAddFusion out.
    with quiet(stdout=True), tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        if dynamo:
            onnx.save_model(torch.onnx.export(model, args, dynamo=True, verbose=False).model_proto, path)
        else:
            torch.onnx.export(FirstOutput(model), args, path, dynamo=False, opset_version=17)
        opt = optimize_model(path, model_type=model_type, num_heads=model.config.num_attention_heads,
                             hidden_size=model.config.hidden_size, opt_level=2)
    fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    return bench.ort_runner(opt.model.SerializeToString()), fused


def rel_error(out, reference: torch.Tensor) -> float:
    got = bench.main_output(out).double()
    if got.shape != reference.shape:
        return float("inf")
    return ((got - reference).abs().max() / reference.abs().max().clamp_min(1e-30)).item()


def build_systems(key: str, model, args, ns) -> dict:
    zoo_name = MODELS[key][0]
    builders = {"eager": lambda: bench.eager(model)}
    if not ns.no_torch_compile:
        builders["torch.compile"] = lambda: bench.torch_compiled(model)
    builders["plain ORT"] = lambda: bench.plain_ort(model, args)
    if zoo_name in ORT_MODEL_TYPE:
        def build_ort_optimizer(dynamo):
            run, fused = ort_optimizer(model, args, ORT_MODEL_TYPE[zoo_name], dynamo)
            print(f"  ORT optimizer ({ORT_MODEL_TYPE[zoo_name]}, {'dynamo' if dynamo else 'TorchScript'} export) fused: "
                  + (", ".join(f"{k} {v}" for k, v in fused.items()) or "nothing"))
            return run
        builders["ORT opt (TorchScript)"] = lambda: build_ort_optimizer(False)
        builders["ORT opt (dynamo)"] = lambda: build_ort_optimizer(True)
    else:
        print(f"  ORT optimizer: skipped for {key}: {CNN_SKIP}")
    builders["graphopt"] = lambda: graphopt.compile(model, args, target="cpu")
    systems = {}
    for name, build in builders.items():
        try:
            systems[name] = build()
            systems[name](*args)   # a system that builds but cannot run is skipped too
        except Exception as e:     # noqa: BLE001 — one broken system must not end the benchmark
            print(f"  {name}: FAILED, skipped ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})")
            systems.pop(name, None)
    return systems


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--size", choices=("base", "tiny"), default="base")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--no-torch-compile", action="store_true")
    ns = ap.parse_args()
    unknown = [m for m in ns.models.split(",") if m not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {torch.get_num_threads()} threads; "
          "median ms per call, interleaved rounds", flush=True)
    summary = []
    for key in ns.models.split(","):
        zoo_name, seq = MODELS[key]
        model, args = zoo.build(zoo_name, size=ns.size, batch=ns.batch, seq=seq)
        print(f"\n{key} ({ns.size}), input {'x'.join(map(str, args[0].shape))}:", flush=True)
        systems = build_systems(key, model, args, ns)
        if "eager" not in systems or "graphopt" not in systems:
            print(f"  {key}: skipped (needs both eager and graphopt)")
            continue
        with torch.inference_mode():
            reference = bench.main_output(model(*args)).double()
        errors = {n: rel_error(fn(*args), reference) for n, fn in systems.items() if n != "eager"}
        ms = bench.time_side_by_side(systems, args, rounds=ns.rounds)
        title = "  rel. error vs eager: " + ", ".join(f"{n} {e:.1e}" for n, e in errors.items())
        print("\n".join(bench.format_table(title, ms)), flush=True)
        summary.append((key, {n: t / ms["graphopt"] for n, t in ms.items() if n != "graphopt"}))

    print("\nsummary (graphopt speedup over each system; > 1: graphopt is faster):")
    for key, ratios in summary:
        print(f"  {key:<13}" + "".join(f"  vs {n}: ×{r:.2f}" for n, r in ratios.items()))
        best = min(ratios, key=ratios.get)   # the fastest other system: the smallest speedup over it
        verdict = "yes" if ratios[best] >= 1 else "no"
        vs_ort = f"×{ratios['plain ORT']:.2f}" if "plain ORT" in ratios else "n/a"
        print(f"  {'':<13}  graphopt >= best other ({best}): {verdict} (×{ratios[best]:.2f}); vs plain ORT {vs_ort}")


if __name__ == "__main__":
    main()
