"""Issue 2 benchmark: eager PyTorch, torch.compile, plain ONNX Runtime (torch.onnx export) and graphopt
(default pipeline → ORT) side by side in one process, on ResNet-50, MobileNetV2 and BERT-base (seq 128).

    python benchmarks/bench_spine.py [--models resnet,mobilenet_v2,bert] [--no-torch-compile]
"""
import argparse

import torch

import graphopt
from graphopt import bench, zoo


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet,mobilenet_v2,bert")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--no-torch-compile", action="store_true")
    ns = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median ms per call, interleaved rounds")
    summary = []
    for name in ns.models.split(","):
        model, args = zoo.build(name, size="base", batch=ns.batch, seq=128)
        systems = {"eager": bench.eager(model)}
        if not ns.no_torch_compile:
            systems["torch.compile"] = bench.torch_compiled(model)
        systems["plain ORT"] = bench.plain_ort(model, args)
        systems["graphopt"] = graphopt.compile(model, args, target="cpu")
        ms = bench.time_side_by_side(systems, args, rounds=ns.rounds)
        shape = "x".join(map(str, args[0].shape))
        print("\n".join(bench.format_table(f"{name} base, input {shape}:", ms)), flush=True)
        summary.append((name, {k: v / ms["graphopt"] for k, v in ms.items() if k != "graphopt"}))
    print("\nsummary (graphopt speedup over each system; > 1 is faster):")
    for name, ratios in summary:
        print(f"  {name:<14}" + "".join(f"  vs {k}: ×{v:.2f}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
