"""TVM backend benchmark: eager PyTorch, ONNX Runtime (graphopt's ORT build), TVM untuned (default
schedules) and TVM tuned with MetaSchedule, side by side in one process on ResNet-50, MobileNetV2 and
BERT-base (seq 128), and on a workload class where TVM's operator fusion has no ORT counterpart: chains of
elementwise ops ending in a normalization. Tuning records persist in --db, so a rerun measures without
tuning again.

    python benchmarks/bench_tvm.py [--models resnet,mobilenet_v2,bert,chain] [--trials 32] [--budget 600]
                                   [--db tuning-db]
"""
import argparse
import time

import torch

import graphopt
from graphopt import bench, zoo


class GatedNorm(torch.nn.Module):
    """LayerNorm(gelu_tanh(x + b) · sigmoid(x) + x) on [1, 128, 3072]: ORT runs it as six kernels, each a pass
    over memory (it fuses bias + GELU only); Relax fuses the elementwise ops into one loop nest."""
    def __init__(self, d: int = 3072):
        super().__init__()
        self.b, self.norm = torch.nn.Parameter(torch.randn(d)), torch.nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(torch.nn.functional.gelu(x + self.b, approximate="tanh") * torch.sigmoid(x) + x)


def build(name: str):
    if name == "chain":
        return GatedNorm().eval(), (torch.randn(1, 128, 3072),)
    return zoo.build(name, size="base", batch=1, seq=128)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet,mobilenet_v2,bert,chain")
    ap.add_argument("--trials", type=int, default=32, help="trials per task")
    ap.add_argument("--budget", type=float, default=600, help="tuning seconds per model")
    ap.add_argument("--db", default="tuning-db")
    ap.add_argument("--rounds", type=int, default=10)
    ns = ap.parse_args()
    print(f"torch {torch.__version__}; median ms per call (TVM untuned: single calls, it is slow)")
    for name in ns.models.split(","):
        model, args = build(name)
        t0 = time.perf_counter()
        tuned = graphopt.compile(model, args, backend="tvm", tune=graphopt.Tune(trials=ns.trials, time_budget=ns.budget,
                                                                                db=f"{ns.db}/{name}"))
        tuning = f"{tuned.report[-1].notes[1]}; compile {time.perf_counter() - t0:.0f} s"
        untuned = graphopt.compile(model, args, backend="tvm")
        systems = {"eager": bench.eager(model), "ORT (graphopt)": graphopt.compile(model, args), "TVM tuned": tuned}
        ms = bench.time_side_by_side(systems, args, rounds=ns.rounds)
        ms["TVM untuned"] = bench.time_single_calls(untuned, args)
        print("\n".join(bench.format_table(f"{name}: {tuning}", ms, subject="TVM tuned")), flush=True)


if __name__ == "__main__":
    main()
