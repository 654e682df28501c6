"""FFT-convolution benchmark: a depthwise causal long convolution (kernel as long as the sequence, as
in H3/Hyena) at lengths 1K–64K and 64–768 channels, and large-kernel depthwise 2-D convs (RepLKNet,
SLaK); then the Hyena-style and RepLKNet-style examples end to end. All side by side in one process on
the same inputs. The systems:
  eager direct / ORT direct   the conv itself in PyTorch, and torch.onnx's export of it in ONNX Runtime
  eager torch.fft             what such models do in eager: rfft · spectrum · irfft, the kernel's spectrum
                              computed once per length (as graphopt does), under inference_mode, at a 5-smooth
                              FFT size (pocketfft's fast sizes)
  torch.compile torch.fft     the same function through torch.compile (inductor with freezing; 1-D only)
  graphopt                    the direct conv module compiled for ONNX Runtime: the matmul (Monarch) FFT
  graphopt TVM                compiled for TVM: depthwise FFT convs run graphopt's fused TIR kernel (no
                              tuning needed for it); the 2-D --tvm configs tune with MetaSchedule for
                              --tvm-budget seconds
  graphopt auto               (examples) backend="auto": ONNX Runtime, with the depthwise FFT convs on
                              graphopt's TVM kernel between ORT segments where that measures faster

    python benchmarks/bench_fft_conv.py [--configs 64x1024,...] [--configs-2d 32x56x31,...] [--no-examples]
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt import bench
from graphopt.cli import load_factory
from graphopt.numerics import drift, flat_tensors
from graphopt.cost import ConvShape, CostModel

SLOW_S = 0.5      # with a system slower than this per call (after its first), 2 interleaved rounds, not --rounds
SKIP_S = 20.0     # direct convs estimated slower than this are not run at all


def smooth(n: int) -> int:
    """The smallest 2^a·3^b·5^c ≥ n: an FFT size pocketfft runs at its best (86 → 90, 114 → 120)."""
    def factors_left(m):
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        return m
    return next(m for m in range(max(n, 1), 2 * max(n, 1) + 1) if factors_left(m) == 1)


class CausalConv(nn.Module):
    def __init__(self, c, k):
        super().__init__()
        self.conv, self.k = nn.Conv1d(c, c, k, groups=c, bias=False), k

    def forward(self, x):
        return self.conv(F.pad(x, (self.k - 1, 0)))


class TorchFFTConv(nn.Module):
    """The eager FFT conv at its best: the kernel's spectrum computed once (as graphopt does)."""

    def __init__(self, w, length):
        super().__init__()
        self.n, self.length = 2 * length, length
        self.register_buffer("spectrum", torch.fft.rfft(w[:, 0].flip(-1), n=self.n))   # the causal response

    def forward(self, x):
        return torch.fft.irfft(torch.fft.rfft(x, n=self.n) * self.spectrum, n=self.n)[..., : self.length]


class LargeKernel2d(nn.Module):
    def __init__(self, c, k):
        super().__init__()
        self.conv = nn.Conv2d(c, c, k, padding=k // 2, groups=c, bias=False)

    def forward(self, x):
        return self.conv(x)


def torch_fft_conv2d(w):
    """As TorchFFTConv: the kernel's spectrum computed once per input size."""
    h, k = w[:, 0].flip(-1, -2), w.shape[-1]
    spectra = {}

    def run(x):
        with torch.inference_mode():
            s = (smooth(x.shape[-2] + k - 1), smooth(x.shape[-1] + k - 1))
            if s not in spectra:
                spectra[s] = torch.fft.rfft2(h, s=s)
            y = torch.fft.irfft2(torch.fft.rfft2(x, s=s) * spectra[s], s=s)
            return y[..., k // 2: k // 2 + x.shape[-2], k // 2: k // 2 + x.shape[-1]]
    return run


def compare(title, systems, args, reference, rounds, subject="graphopt"):
    """Every system timed in the same interleaved rounds (fewer rounds when one is slow); print ms and
    graphopt's speedups. A system's first call is a warm-up (torch.compile compiles in it), its second says
    how slow it is."""
    second = {}
    for name, fn in systems.items():
        out = fn(*args)
        out = [torch.as_tensor(o) for o in out] if isinstance(out, list) else out   # plain ORT returns numpy
        if name != "eager direct":
            err = drift(out, flat_tensors(reference)).rel
            title += f"  {name} err {err:.1e};"
        t0 = time.perf_counter()
        fn(*args)
        second[name] = time.perf_counter() - t0
    slow = max(second.values()) >= SLOW_S
    ms = bench.time_side_by_side(systems, args, rounds=2 if slow else rounds, min_round_s=0.1, warmup=0)
    print("\n".join(bench.format_table(title, ms, subject)), flush=True)
    return ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="64x1024,64x4096,256x4096,768x4096,64x16384,64x65536",
                    help="CHANNELSxLENGTH, kernel length = sequence length")
    ap.add_argument("--configs-2d", default="32x56x31,128x56x31,64x64x51,128x28x13",
                    help="CHANNELSxSIZExKERNEL: depthwise 2-D, 'same' padding")
    ap.add_argument("--tvm", default="32x56x31", help="2-D configs also compiled for TVM, tuned")
    ap.add_argument("--tvm-budget", type=float, default=150, help="MetaSchedule seconds per --tvm config")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-examples", action="store_true", help="skip the end-to-end Hyena and RepLKNet examples")
    ns = ap.parse_args()
    rates = CostModel(graphopt.get_target("cpu")).fft_rates()
    print(f"torch {torch.__version__}; median ms per call. graphopt TVM: 1-D convs untuned (the fused kernel is "
          f"graphopt's own); tuned {ns.tvm_budget:.0f} s per model (64 trials per task at most) on {ns.tvm}")
    print("1-D: depthwise causal conv, kernel = length")
    summary = []
    tvm_db = tempfile.TemporaryDirectory(prefix="graphopt-bench-tvm-")

    def graphopt_systems(cfg, model, x, tvm=False):
        systems = {"graphopt": graphopt.compile(model, x)}
        if cfg in ns.tvm.split(","):
            tune = graphopt.Tune(trials=64, time_budget=ns.tvm_budget, db=tvm_db.name, progress=False)
            systems["graphopt TVM"] = graphopt.compile(model, x, backend="tvm", tune=tune)
        elif tvm:
            systems["graphopt TVM"] = graphopt.compile(model, x, backend="tvm")
        return systems
    for cfg in filter(None, ns.configs.split(",")):
        c, length = map(int, cfg.split("x"))
        torch.manual_seed(0)
        model, x = CausalConv(c, length).eval(), (torch.randn(1, c, length),)
        est_direct_s = ConvShape(1, c, c, c, length + length - 1, length, length).direct_macs() / rates["depthwise"]
        systems = {}
        if est_direct_s < SKIP_S:
            systems["eager direct"] = bench.eager(model)
            systems["ORT direct"] = bench.plain_ort(model, x)
        fft = TorchFFTConv(model.conv.weight.detach(), length).eval()
        systems["eager torch.fft"] = bench.eager(fft)
        systems["torch.compile torch.fft"] = bench.torch_compiled(fft)
        systems.update(graphopt_systems(cfg, model, x, tvm=True))
        with torch.no_grad():
            ref = model(*x) if est_direct_s < SKIP_S else fft(*x)
        skipped = "" if est_direct_s < SKIP_S else f" (direct convs skipped: ~{est_direct_s:.0f} s per call)"
        ms = compare(f"C={c}, L=K={length}{skipped}:", systems, x, ref, ns.rounds, "graphopt TVM")
        summary.append((cfg, ms))
    print("\n2-D: depthwise large-kernel conv, 'same' padding")
    for cfg in filter(None, ns.configs_2d.split(",")):
        c, size, k = map(int, cfg.split("x"))
        torch.manual_seed(0)
        model, x = LargeKernel2d(c, k).eval(), (torch.randn(1, c, size, size),)
        systems = {"eager direct": bench.eager(model), "ORT direct": bench.plain_ort(model, x),
                   "eager torch.fft": torch_fft_conv2d(model.conv.weight.detach()), **graphopt_systems(cfg, model, x)}
        with torch.no_grad():
            ref = model(*x)
        notes = next(r for r in systems["graphopt"].report if r.name == "fft_conv").notes
        ms = compare(f"C={c}, {size}×{size}, kernel {k}×{k} (graphopt's choice: {notes[0].split(': ', 1)[1]}):",
                     systems, x, ref, ns.rounds)
        summary.append((cfg, ms))
    examples = {"hyena": "Hyena-style model (d_model 128, L 4096, 2 layers)",
                "replknet": "RepLKNet-style stage (128 channels, 56×56, 31×31 kernels, 2 blocks)"}
    for name, title in examples.items() if not ns.no_examples else ():
        model, x = load_factory(str(Path(__file__).parents[1] / "examples" / f"{name}.py"))()
        systems = {"eager": bench.eager(model), "torch.compile": bench.torch_compiled(model),
                   "plain ORT": bench.plain_ort(model, x), "graphopt": graphopt.compile(model, x),
                   "graphopt auto": graphopt.compile(model, x, backend="auto")}
        print(f"  graphopt auto: {systems['graphopt auto'].executable.describe()[0]}")
        with torch.no_grad():
            ref = model(*x)
        ms = compare(f"{title}, end to end:", systems, x, ref, ns.rounds)
        summary.append((f"{name} e2e", ms))
    print("\nsummary (each graphopt system's speedup over each peer; > 1 is faster):")
    for cfg, ms in summary:
        ours = [k for k in ms if k.startswith("graphopt")]
        for mine in ours:
            print(f"  {cfg:<12} {mine:<13}" + "".join(f"  vs {k}: ×{v / ms[mine]:.2f}" for k, v in ms.items()
                                                      if k not in ours))


if __name__ == "__main__":
    sys.exit(main())
