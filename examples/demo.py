"""The main job: compile real models (transformers BERT-base and ResNet-50, built from their configs)
with graphopt, in fp32 and in int8, check them against eager PyTorch, and print the speedups.

    make demo          # or: python examples/demo.py [--models bert,resnet]

BERT's per-pass dumps land in dumps/bert/ (open dumps/bert/report.html)."""
import argparse
import time

import torch
import torch.nn.functional as F

import graphopt
from graphopt import bench, zoo

from graphopt.numerics import drift, flat_tensors


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="bert,resnet")
    ap.add_argument("--dump-root", default="dumps")
    ns = ap.parse_args()
    for name in ns.models.split(","):
        model, args = zoo.build(name, size="base", batch=1, seq=128)
        t0 = time.perf_counter()
        compiled = graphopt.compile(model, args, target="cpu", dump_dir=f"{ns.dump_root}/{name}")
        print(f"\n{name}: compiled in {time.perf_counter() - t0:.1f} s; steps:")
        for rec in compiled.report:
            print(f"  {rec.index} {rec.name:<16} {rec.rewrites:>4} rewrites  {rec.nodes_before:>4} → {rec.nodes_after:<4} ops"
                  f"  drift {rec.drift.rel:.1e}")
        err = drift(compiled(*args), flat_tensors(model(*args)))
        # int8: static (calibrated on random images) for the CNN, dynamic for the transformer
        calibration = [(torch.randn_like(args[0]),) for _ in range(4)] if name == "resnet" else None
        int8 = graphopt.compile(model, args, quantize="int8" if calibration else "int8-dynamic", calibration=calibration)
        ref, out = flat_tensors(model(*args))[0], flat_tensors(int8(*args))[0]
        cos = F.cosine_similarity(ref.reshape(1, -1), out.reshape(1, -1)).item()
        ms = bench.time_side_by_side({"eager": bench.eager(model), "plain ORT": bench.plain_ort(model, args),
                                      "graphopt": compiled, "graphopt int8": int8}, args, rounds=9)
        print("\n".join(bench.format_table(f"  fp32 relative error vs eager {err.rel:.1e}, int8 output cosine "
                                           f"{cos:.4f}; median latency:", ms, subject="graphopt int8")))
        print(f"  graphopt fp32 speedup: ×{ms['eager'] / ms['graphopt']:.2f} vs eager, "
              f"×{ms['plain ORT'] / ms['graphopt']:.2f} vs plain ORT")
        print(f"  dumps: {ns.dump_root}/{name}/report.html")


if __name__ == "__main__":
    main()
