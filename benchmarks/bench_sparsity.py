"""Issue 14 benchmark: sparse models made faster, quality beside speed, one process; eager PyTorch, torch.compile
(default mode), dense ONNX Runtime (torch.onnx's export; ORT's default session options, all graph optimizations)
as the baseline, and graphopt's dense compile beside it.

  structured   ResNet-50 and BERT-base (random init, `zoo`) with 30/50/70% of every prunable group's units
               removed (channels, heads, FFN units; reconstruction: least-squares refit); quality = cosine of
               the main output to eager fp32 on held-out inputs
  budget       the trained MiniLM encoder pruned within budgets 1% and 5% (mean 1 − cosine on the calibration
               sentences); quality = sentence-embedding cosine and pair-similarity Spearman on held-out sentences
  block        BERT-base linears at 80/90/95% block sparsity (32×32 blocks): each linear shape as the kernel
               (graphopt::bsr_linear vs a dense linear, both exported and run by ORT), the 72 linears of the
               model summed, and end to end
  2:4          BERT-base with 2:4 weights: what the cost gate measured, end to end, quality

    nice -n 10 python benchmarks/bench_sparsity.py [--parts structured,budget,block,nm] [--rounds 5]
"""
import argparse
import time

import onnxruntime as ort
import torch
import torch.nn.functional as F

import graphopt
from graphopt import bench, zoo
from graphopt.cost import CostModel
from graphopt.numerics import cosine_error, flat_tensors, rank_correlation


def cosine(model, run, held_out) -> float:
    with torch.no_grad():
        pairs = [(bench.main_output(model(*b)), bench.main_output(run(*b))) for b in held_out]
    return sum(F.cosine_similarity(r.reshape(len(r), -1), o.reshape(len(o), -1)).mean().item()
               for r, o in pairs) / len(pairs)


def inputs(name, model, args, n, seed):
    g = torch.Generator().manual_seed(seed)
    if name == "resnet":
        return [(torch.randn(args[0].shape, generator=g),) for _ in range(n)]
    return [(torch.randint(0, model.config.vocab_size, args[0].shape, generator=g),) for _ in range(n)]


def peers(model, args) -> dict:
    """The dense systems every sparse one is compared with."""
    return {"eager": bench.eager(model), "torch.compile": bench.torch_compiled(model),
            "ORT dense": bench.plain_ort(model, args), "graphopt dense": graphopt.compile(model, args)}


def compiled(model, args, sparsity, calibration):
    t0 = time.perf_counter()
    cm = graphopt.compile(model, args, sparsity=sparsity, calibration=calibration)
    return cm, time.perf_counter() - t0


def table(title: str, ms: dict[str, float], extras: dict[str, str], width: int = 16) -> None:
    """One benchmark table: ms per call, ratios against the dense peers, quality and notes where given."""
    print(f"\n{title}, median ms per call:")
    for label, t in ms.items():
        extra = f"   {extras[label]}" if label in extras else ""
        print(f"  {label:<{width}} {t:8.2f} ms   ×{ms['ORT dense'] / t:5.2f} vs ORT dense   "
              f"×{ms['graphopt dense'] / t:5.2f} vs graphopt dense   ×{ms['eager'] / t:5.2f} vs eager{extra}", flush=True)


def step(cm, name="sparsify"):
    return next(r for r in cm.report if r.name == name)


def structured(ns):
    for name in ("resnet", "bert"):
        model, args = zoo.build(name, size="base", batch=1, seq=128)
        calibration, held_out = inputs(name, model, args, 4, 1), inputs(name, model, args, 3, 2)
        systems = peers(model, args)
        quality, notes = {}, {}
        for ratio in (0.3, 0.5, 0.7):
            label = f"graphopt {ratio:.0%}"
            systems[label], secs = compiled(model, args, graphopt.Sparsity("structured", ratio=ratio), calibration)
            quality[label] = cosine(model, systems[label], held_out)
            notes[label] = f"{step(systems[label]).notes[-1]}; compile {secs:.0f} s"
        ms = bench.time_side_by_side(systems, args, rounds=ns.rounds)
        table(f"structured {name}-base ({'x'.join(map(str, args[0].shape))})", ms,
              {label: f"cosine {quality[label]:.4f}   {notes[label]}" for label in quality})


def budget(ns):
    model, tok = zoo.minilm()
    texts = zoo.sentences(320)
    enc = [tok(texts[i:i + 16], padding="max_length", max_length=32, truncation=True, return_tensors="pt")
           for i in range(0, len(texts), 16)]
    batches = [(e["input_ids"], e["attention_mask"]) for e in enc]
    args, calibration, held_out = batches[0], batches[:8], batches[8:]
    systems = peers(model, args)
    quality, notes = {}, {}

    def embed(run, b):
        return zoo.mean_pool(bench.main_output(run(*b)), b[1])
    with torch.no_grad():
        ref = torch.cat([embed(model, b) for b in held_out])
        ref_outputs = [t for b in held_out for t in flat_tensors(model(*b))]
    for b in (0.01, 0.05):
        label = f"graphopt ≤{b:.0%}"
        systems[label], secs = compiled(model, args, graphopt.Sparsity("structured", budget=b), calibration)
        out = torch.cat([embed(systems[label], h) for h in held_out]).detach()
        i, j = torch.triu_indices(len(ref), len(ref), 1)
        rho = rank_correlation((ref[i] * ref[j]).sum(1), (out[i] * out[j]).sum(1))
        outputs = [torch.as_tensor(t) for b in held_out for t in flat_tensors(systems[label](*b))]
        quality[label] = (f"held-out: output error {cosine_error(outputs, ref_outputs):.4f} (the budget's measure), "
                          f"sentence-embedding 1 − cosine {1 - F.cosine_similarity(ref, out).mean().item():.4f}, "
                          f"pair Spearman {rho:.4f}")
        s = step(systems[label])
        notes[label] = f"{s.rewrites} groups pruned; {s.notes[-1]}; compile {secs:.0f} s"
    ms = bench.time_side_by_side(systems, args, rounds=ns.rounds)
    table("MiniLM (trained) pruned within a budget, 16 sentences × 32 tokens", ms,
          {label: f"{quality[label]}   {notes[label]}" for label in quality})


def block_and_nm(ns, parts):
    model, args = zoo.build("bert", size="base", batch=1, seq=128)
    calibration, held_out = inputs("bert", model, args, 4, 1), inputs("bert", model, args, 3, 2)
    cost = CostModel(graphopt.get_target("cpu"))
    shapes = {(768, 768): 48, (768, 3072): 12, (3072, 768): 12}       # (in, out): count in BERT-base
    systems = peers(model, args)
    quality, notes = {}, {}
    if "block" in parts:
        print("\nblock-sparse kernel, 32×32 blocks, 128 rows (graphopt::bsr_linear vs dense linear, both in ORT):")
        for ratio in (0.8, 0.9, 0.95):
            sparse_total = dense_total = 0.0
            for (i, o), count in shapes.items():
                k = max(1, round((1 - ratio) * i / 32))
                s, d = cost.sparse_linear_choice(128, i, o, k, (32, 32))
                sparse_total, dense_total = sparse_total + count * s, dense_total + count * d
                print(f"  {ratio:.0%} {i:>4}→{o:<4}  sparse {s * 1e3:6.3f} ms  dense {d * 1e3:6.3f} ms  ×{d / s:5.2f}")
            print(f"  {ratio:.0%} all 72 linears of BERT-base: sparse {sparse_total * 1e3:.1f} ms, dense "
                  f"{dense_total * 1e3:.1f} ms, ×{dense_total / sparse_total:.2f}", flush=True)
            label = f"graphopt blk{ratio:.0%}"
            systems[label], secs = compiled(model, args, graphopt.Sparsity("block", ratio=ratio), calibration)
            quality[label] = cosine(model, systems[label], held_out)
            ops = systems[label].graph.op_counts()
            notes[label] = f"{ops.get('graphopt.bsr_linear', 0)} bsr_linear / {ops.get('aten.linear', 0)} dense; compile {secs:.0f} s"
    if "nm" in parts:
        systems["graphopt 2:4"], secs = compiled(model, args, graphopt.Sparsity("2:4"), calibration)
        quality["graphopt 2:4"] = cosine(model, systems["graphopt 2:4"], held_out)
        gate = [n for n in step(systems["graphopt 2:4"]).notes if "kept dense" in n]
        notes["graphopt 2:4"] = f"compile {secs:.0f} s; gate: {gate[0] if gate else 'none'}"
    ms = bench.time_side_by_side(systems, args, rounds=ns.rounds)
    table("BERT-base end to end (1×128)", ms,
          {label: f"cosine {quality[label]:.4f}   {notes[label]}" for label in quality}, width=18)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="structured,budget,block,nm")
    ap.add_argument("--rounds", type=int, default=5)
    ns = ap.parse_args()
    parts = ns.parts.split(",")
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {torch.get_num_threads()} threads; "
          "interleaved rounds; ratios are what to read")
    if "structured" in parts:
        structured(ns)
    if "budget" in parts:
        budget(ns)
    if "block" in parts or "nm" in parts:
        block_and_nm(ns, parts)


if __name__ == "__main__":
    main()
