"""ONNX Runtime sessions and their spinning workers (issue 29): graphopt's workers spin during a run and stop
when it returns (graphopt/sessions.py). Two questions, on MobileNetV2, ResNet-50 and BERT-base (seq 128), batch 1,
in one process:

  1. Is the model itself slower? The same optimized ONNX model in three sessions — spinning after runs (ORT's
     default), never, during runs only — timed side by side in interleaved rounds (medians).
  2. How much does a session slow PyTorch code that runs right after a call? A torch op (a 512×512 matmul and
     a torch.fft convolution of 64 channels × 4096) timed alone (after a pause) and right after each call of
     each session: the ratio "after a call / alone" (1.0: no slowdown).

    python benchmarks/bench_sessions.py [--models resnet,bert] [--rounds 15]
"""
import argparse
import statistics
import time

import torch

import graphopt
from graphopt import bench, zoo
from graphopt.sessions import SPINNING, ort_session


def after_call_ratio(call, op, trials: int = 30) -> float:
    """Median of (op's time right after `call`) / (op's time after a 0.2 s pause)."""
    def timed():
        t0 = time.perf_counter()
        op()
        return time.perf_counter() - t0
    alone, after = [], []
    for _ in range(trials):
        time.sleep(0.2)
        alone.append(timed())
        call()
        after.append(timed())
    return statistics.median(after) / statistics.median(alone)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mobilenet_v2,resnet,bert")
    ap.add_argument("--rounds", type=int, default=15)
    ns = ap.parse_args()
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    signal, kernel = torch.randn(1, 64, 4096), torch.fft.rfft(torch.randn(64, 4096), n=8192)
    ops = {"matmul 512²": lambda: a @ b,
           "torch.fft conv": lambda: torch.fft.irfft(torch.fft.rfft(signal, n=8192) * kernel, n=8192)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median ms per call, interleaved rounds")
    for name in ns.models.split(","):
        model, args = zoo.build(name, size="base", batch=1, seq=128)
        cm = graphopt.compile(model, args, backend="ort")
        onnx_bytes = cm.executable.artifact().SerializeToString()
        disabled = cm.executable.chosen.disabled_optimizers if hasattr(cm.executable, "chosen") \
            else cm.executable.disabled_optimizers
        feeds = {i.name: t.numpy() for i, t in zip(cm.executable.artifact().graph.input, args)}
        sessions = {mode: ort_session(onnx_bytes, disabled=disabled, spinning=mode) for mode in SPINNING}
        systems = {k: (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()}
        ms = bench.time_side_by_side(systems, (), rounds=ns.rounds)
        print(f"{name} base, batch 1, spinning " + ", ".join(
            f"{k}: {v:.2f} ms (×{v / ms['always']:.3f} of always)" for k, v in ms.items()))
        for op_name, op in ops.items():
            ratios = {k: after_call_ratio(call, op) for k, call in systems.items()}
            print(f"  {op_name} right after a call / alone: " +
                  ", ".join(f"{k} ×{r:.2f}" for k, r in ratios.items()))


if __name__ == "__main__":
    main()
