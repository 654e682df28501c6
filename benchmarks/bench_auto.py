"""Issue 30 benchmark: one accuracy budget across every family (graphopt.Auto) against each family alone, the
families combined by hand, ONNX Runtime's quantization tool and the unoptimized systems — one process per model,
all systems timed side by side (interleaved rounds), quality on held-out data beside every speedup.

    python benchmarks/bench_auto.py --model digits|transformer|minilm [--budgets 0.01,0.02] [--rounds 7]
                                    [--time-budget 120] [--families quant,prune,skip]

Models (all trained here or shipped with trained weights; nothing downloaded):
  digits       DigitsResNet, 10 residual blocks × 48 channels, trained on scikit-learn's digits; the 397 test
               images in one batch; quality: test accuracy, top-1 disagreement with the full model (metric "top1")
  transformer  DigitsTransformer, 4 pre-LN layers × 64 wide, the same data read as 8 tokens of 8 pixels; 100 images
               per call (its reshapes hold the batch size the calibration batches have), quality on 300 test images
  minilm       all-MiniLM-L6-v2 (trained weights) as a sentence encoder, 16 sentences × 48 tokens; quality:
               1 − cosine of the embeddings on 96 held-out sentences (metric "cosine")
Rows per budget: each family alone at its best within the budget (Auto restricted to that family: the same
metric, search and held-out check), the families' own options (Sparsity("structured", budget=), EarlyExit), the
families combined by hand (each given the whole budget), and Auto. "fits" compares the held-out loss with the
budget; "× best single" divides the best single family's time (among rows that fit) by Auto's.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import graphopt
from graphopt import bench, zoo

sys.path.insert(0, str(Path(__file__).parent))
from bench_quant import ort_tool  # noqa: E402  (ONNX Runtime's quantization tool at its documented configuration)


def classifier(name: str):
    t0 = time.perf_counter()
    model = zoo.train_digits(blocks=10, width=48, epochs=12) if name == "digits" else zoo.train_digits_transformer()
    trained = time.perf_counter() - t0
    data = zoo.digits()
    xc, _ = data["calibration"]
    xt, yt = data["test"]
    if name == "transformer":   # its reshapes hold the batch: the calibration batches' size (100) is the one timed
        xt, yt = xt[:300], yt[:300]
    step = 100 if name == "transformer" else len(xt)
    with torch.no_grad():
        full = model(xt)

    def quality(run) -> tuple[float, str]:
        out = torch.cat([torch.as_tensor(bench.main_output(run(xt[i:i + step]))) for i in range(0, len(xt), step)])
        disagree = (out.argmax(-1) != full.argmax(-1)).float().mean().item()
        return disagree, f"acc {(out.argmax(-1) == yt).float().mean().item():.4f}, top-1 disagreement {disagree:.4f}"
    what = (f"{'DigitsResNet 10×48' if name == 'digits' else 'DigitsTransformer 4×64'} trained here in "
            f"{trained:.0f} s; full model test accuracy {(full.argmax(-1) == yt).float().mean().item():.4f}")
    return dict(model=model, args=(xt[:step],), calibration=[(xc[i:i + 100],) for i in range(0, 400, 100)],
                metric="top1", quality=quality, what=what, early_exit=True,
                # the export has the test split's static batch: the tool calibrates on that many calibration images
                tool=lambda: ort_tool(model, (xt[:step],), [(xc[:step],)],
                                      static=name == "digits", recommended=name == "digits")[0])


def minilm():
    hf, tok = zoo.minilm()
    model = zoo.SentenceEncoder(hf).eval()
    texts = zoo.sentences(16 * 14, seed=3)
    enc = [tok(texts[i:i + 16], padding="max_length", max_length=48, truncation=True, return_tensors="pt")
           for i in range(0, len(texts), 16)]
    batches = [(e["input_ids"], e["attention_mask"]) for e in enc]
    calibration, held = batches[:8], batches[8:]
    with torch.no_grad():
        ref = torch.cat([model(*b) for b in held])

    def quality(run, pooled=True) -> tuple[float, str]:
        outs = []
        for ids, mask in held:
            out = torch.as_tensor(bench.main_output(run(ids, mask)))
            outs.append(out if out.dim() == 2 else zoo.mean_pool(out, mask))
        loss = (1 - F.cosine_similarity(torch.cat(outs), ref)).mean().item()
        return loss, f"1 − cosine {loss:.4f}"

    def tool():   # ORT's documented transformer path returns the last hidden state: pooled by `quality`
        return ort_tool(hf, batches[0], None, static=False, recommended=True)[0]
    return dict(model=model, args=batches[0], calibration=calibration, metric="cosine", quality=quality,
                what=f"all-MiniLM-L6-v2 sentence encoder, 16 × 48 tokens; {16 * len(held)} held-out sentences",
                early_exit=False, tool=tool)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("digits", "transformer", "minilm"), required=True)
    ap.add_argument("--budgets", default="0.01,0.02")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--time-budget", type=float, default=None, help="also run Auto with this time_budget (s)")
    ap.add_argument("--families", default="quant,prune,skip", help="the 'alone' rows to run")
    ns = ap.parse_args()
    spec = minilm() if ns.model == "minilm" else classifier(ns.model)
    model, args, cal, metric, quality = spec["model"], spec["args"], spec["calibration"], spec["metric"], spec["quality"]
    print(f"# {ns.model}: {spec['what']}; metric {metric!r}; calibration {len(cal)} batches "
          f"({len(graphopt.Auto.split(cal)[1])} held out by Auto)", flush=True)
    compile_s, systems = {}, {"eager": bench.eager(model), "torch.compile": bench.torch_compiled(model),
                              "plain ORT": bench.plain_ort(model, args), "ORT quant tool": spec["tool"]()}

    def compiled(label, **options):
        t0 = time.perf_counter()
        try:
            systems[label] = graphopt.compile(model, args, **options)
        except graphopt.GraphoptError as e:
            print(f"  {label}: {type(e).__name__}: {str(e)[:160]}", flush=True)
            return None
        compile_s[label] = time.perf_counter() - t0
        print(f"  compiled {label} in {compile_s[label]:.0f} s", flush=True)
        return systems[label]

    compiled("graphopt dense")
    int8 = "int8" if ns.model == "digits" else "int8-dynamic"
    compiled(f"graphopt {int8}", quantize=int8, calibration=cal)
    singles, autos = {}, {}
    for budget in [float(b) for b in ns.budgets.split(",")]:
        b = f"{budget:.0%}"
        for family in ns.families.split(","):
            label = f"{family} alone {b}"
            if compiled(label, calibration=cal, optimize=graphopt.Auto(budget, metric, families=(family,))):
                singles[label] = budget
        if compiled(f"Sparsity structured {b}", calibration=cal, sparsity=graphopt.Sparsity("structured", budget=budget)):
            singles[f"Sparsity structured {b}"] = budget
        hand = dict(calibration=cal, sparsity=graphopt.Sparsity("structured", budget=budget),
                    layer_skip=graphopt.LayerSkip(budget, metric), quantize=int8)
        compiled(f"structured+skip+{int8} {b}", **hand)
        if spec["early_exit"]:
            if compiled(f"early exit {b}", calibration=cal, early_exit=graphopt.EarlyExit(budget, metric)):
                singles[f"early exit {b}"] = budget
            compiled(f"early exit+structured+{int8} {b}", calibration=cal, quantize=int8,
                     sparsity=graphopt.Sparsity("structured", budget=budget),
                     early_exit=graphopt.EarlyExit(budget, metric))
        if compiled(f"Auto {b}", calibration=cal, optimize=graphopt.Auto(budget, metric)):
            autos[f"Auto {b}"] = budget
        if spec["early_exit"] and compiled(f"Auto {b} + early exit", calibration=cal,
                                           optimize=graphopt.Auto(budget, metric, early_exit=True)):
            autos[f"Auto {b} + early exit"] = budget
        if ns.time_budget and budget == float(ns.budgets.split(",")[0]):
            label = f"Auto {b}, time_budget={ns.time_budget:g} s"
            if compiled(label, calibration=cal, optimize=graphopt.Auto(budget, metric, time_budget=ns.time_budget)):
                autos[label] = budget
                auto_step = next(r for r in systems[label].report if r.name == "auto")
                build = compile_s[label] - sum(r.time_s for r in systems[label].report[:auto_step.index + 1])
                print(f"  {label}: compile {compile_s[label]:.1f} s; the auto pass {auto_step.time_s:.1f} s "
                      f"(≤ 1.1 × {ns.time_budget:g} = {1.1 * ns.time_budget:.0f} s: "
                      f"{'yes' if auto_step.time_s <= 1.1 * ns.time_budget else 'no'}); the rest of the compile "
                      f"{build:.1f} s", flush=True)

    ms = bench.time_side_by_side(systems, args, rounds=ns.rounds)
    losses = {label: quality(run) for label, run in systems.items()}
    print(f"\n{'system':<34} {'ms':>8} {'×eager':>7} {'×t.comp':>7} {'×ORT':>6} {'×tool':>6} {'×dense':>7}  "
          f"quality (held out)                        fits   compile")
    for label, t in ms.items():
        budget = singles.get(label, autos.get(label))
        fits = "" if budget is None else ("yes" if losses[label][0] <= budget else "NO")
        comp = f"{compile_s[label]:.0f} s" if label in compile_s else ""
        print(f"{label:<34} {t:8.2f} {ms['eager'] / t:7.2f} {ms['torch.compile'] / t:7.2f} {ms['plain ORT'] / t:6.2f} "
              f"{ms['ORT quant tool'] / t:6.2f} {ms['graphopt dense'] / t:7.2f}  {losses[label][1]:<42}{fits:>4}   "
              f"{comp}")
    for label, budget in autos.items():
        fitting = [s for s, b in singles.items() if b == budget and losses[s][0] <= budget]
        best = min(fitting, key=ms.get, default=None)
        if best:
            print(f"{label}: ×{ms[best] / ms[label]:.2f} the best single family within the budget ({best}); "
                  f"×{ms['ORT quant tool'] / ms[label]:.2f} ONNX Runtime's quantization tool (tool's loss "
                  f"{losses['ORT quant tool'][0]:.4f}, Auto's {losses[label][0]:.4f})")
        plan = systems[label].plan
        exits = systems[label].plans.get("early_exit")
        print(f"  plan: {plan.summary()}; {plan.search['stopped']}; {len(plan.search['evaluated'])} plans measured"
              + (f"; exits after blocks {exits.after}" if exits else ""))


if __name__ == "__main__":
    with torch.no_grad():
        main()
