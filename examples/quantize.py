"""Quantization: ResNet-50 in static int8 (calibrated), and the trained MiniLM sentence encoder in
dynamic int8, each timed against fp32 ONNX Runtime with its accuracy.

    python examples/quantize.py
    graphopt compile examples/quantize.py --quantize int8 --calibration examples/quantize.py:calibration
    graphopt compile examples/quantize.py:tiny --quantize auto --calibration examples/quantize.py:calibration_tiny
"""
import torch
import torch.nn.functional as F

import graphopt
from graphopt import bench, zoo
from graphopt.numerics import sqnr_db


def build():
    return zoo.build("resnet", size="base", batch=1)


def tiny():
    return zoo.build("resnet", size="tiny", batch=2)


def calibration(shape=(1, 3, 224, 224), n=8):
    """Representative inputs (random images stand in for a real calibration set here)."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(shape, generator=g),) for _ in range(n)]


def calibration_tiny():
    return calibration(tiny()[1][0].shape, n=4)


def main():
    model, args = build()
    cm = graphopt.compile(model, args, quantize="int8", calibration=calibration())
    ms = bench.time_side_by_side({"eager fp32": bench.eager(model), "ORT fp32": bench.plain_ort(model, args),
                                  "graphopt int8": cm}, args, rounds=7)
    x = torch.randn_like(args[0])
    print("\n".join(bench.format_table("ResNet-50, static int8:", ms, subject="graphopt int8")))
    print(f"  output SQNR {sqnr_db(model(x).pooler_output, cm(x).pooler_output):.1f} dB on a held-out input")

    encoder, tokenizer = zoo.minilm()
    texts = zoo.sentences(64)
    batch = tokenizer(texts, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    inputs = (batch["input_ids"], batch["attention_mask"])
    cm = graphopt.compile(encoder, inputs, quantize="int8-dynamic")
    ms = bench.time_side_by_side({"eager fp32": bench.eager(encoder), "ORT fp32": bench.plain_ort(encoder, inputs),
                                  "graphopt int8": cm}, inputs, rounds=7)
    with torch.no_grad():
        ref = zoo.mean_pool(encoder(*inputs).last_hidden_state, inputs[1])
    out = zoo.mean_pool(cm(*inputs).last_hidden_state, inputs[1])
    print("\n".join(bench.format_table("MiniLM (trained), 64 sentences, dynamic int8:", ms, subject="graphopt int8")))
    print(f"  sentence-embedding cosine to fp32: {F.cosine_similarity(ref, out).mean():.4f}")


if __name__ == "__main__":
    main()
