"""Issue 13 benchmark: layer skipping side by side in one process, quality columns beside speed.

(a) MiniLM (all-MiniLM-L6-v2, trained weights) as a sentence encoder (mean-pooled, normalised embeddings,
    as sentence-transformers runs it): static skipping at budgets 1%, 2%, 5% (mean 1 − cosine of the
    embeddings on the calibration sentences), blocks removed only (replace=False) and removed or replaced by
    fitted maps (the default); speed against graphopt without skipping, cosine to the full model on held-out
    sentences never calibrated on.
(b) A DigitsResNet (8 residual blocks) trained here on scikit-learn's bundled digits: held-out accuracy
    and speed of the full model, static skipping and early exit (top-1 budget 1%), and the alternative a
    user has today: the same exits written with torch.cond, exported by torch.onnx (ONNX `If` nodes) and
    run by ONNX Runtime; and that torch.cond model compiled by graphopt (segments and branches run by the host).
    The torch.cond model leaves at an exit only when every sample of the batch is confident. Throughput on the
    whole test split in one batch, and latency one sample per call.
(c) A DigitsTransformer (4 pre-LN layers, 64 wide) trained here: early exit after its attention and FFN
    sub-blocks (PABEE/DeeBERT style, heads on pooled tokens): throughput and one sample per call, the early
    exit's one-sample graph (exits as ONNX If) and its host dispatcher both timed.

    python benchmarks/bench_skip.py [--parts minilm,digits] [--rounds 9]
"""
import argparse
import time

import onnxruntime as ort
import torch
import torch.nn.functional as F

import graphopt
from graphopt import bench, zoo
from graphopt.quiet import quiet


def dropped(cm) -> str:
    rec = next((r for r in cm.report if r.name == "layer_skip"), None)
    notes = rec.notes if rec else []
    gone = [n.split("[")[1].split("]")[0] for n in notes if n.startswith("dropped block")]
    mapped = [n.split("[")[1].split("]")[0] + " → " + n.split(" by a ")[1].split(" (")[0]
              for n in notes if n.startswith("replaced block")]
    return (f"{len(gone)} dropped" + (f" ({', '.join(gone)})" if gone else "")
            + (f", {len(mapped)} replaced ({', '.join(mapped)})" if mapped else ""))


def minilm(rounds: int) -> list[str]:
    model, tok = zoo.minilm()
    encoder = zoo.SentenceEncoder(model).eval()
    texts = zoo.sentences(320, seed=3)
    enc = [tok(texts[i:i + 16], padding="max_length", max_length=32, truncation=True, return_tensors="pt")
           for i in range(0, len(texts), 16)]
    batches = [(e["input_ids"], e["attention_mask"]) for e in enc]
    calibration, held_out = batches[:8], batches[8:]          # 128 sentences to spend the budget on, 192 to judge
    args = batches[0]
    with torch.no_grad():
        ref = torch.cat([encoder(*b) for b in held_out])
    systems, compile_s = {"eager": bench.eager(encoder), "torch.compile": bench.torch_compiled(encoder),
                          "plain ORT": bench.plain_ort(encoder, args)}, {}
    for label, option in [("graphopt", None)] + [(f"{'replace' if r else 'remove'} {b:.0%}",
                                                  graphopt.LayerSkip(budget=b, replace=r))
                                                 for b in (0.01, 0.02, 0.05) for r in (False, True)]:
        t0 = time.perf_counter()
        systems[label] = graphopt.compile(encoder, args, layer_skip=option,
                                          calibration=calibration if option else None)
        compile_s[label] = time.perf_counter() - t0
    ms = bench.time_side_by_side(systems, args, rounds=rounds)
    lines = [f"(a) MiniLM sentence encoder, batch 16 × 32 tokens; cosine to the full model on {len(ref)} held-out "
             "sentences"]
    for label, t in ms.items():
        cos = "" if label in ("eager", "torch.compile", "plain ORT") else \
            f"cosine {F.cosine_similarity(torch.cat([systems[label](*b) for b in held_out]), ref).mean().item():.4f}"
        extra = f"  {dropped(systems[label])}" if label.startswith(("remove", "replace")) else ""
        comp = f"  (compile {compile_s[label]:.0f} s)" if label in compile_s else ""
        lines.append(f"  {label:<14} {t:8.2f} ms  ×{ms['graphopt'] / t:5.2f} vs graphopt  ×{ms['eager'] / t:5.2f} "
                     f"vs eager  {cos}{extra}{comp}")
    return lines


class CondExits(torch.nn.Module):
    """A model with graphopt's exits (same cut points, heads and thresholds) written with torch.cond, as a user
    writes them today: `enter` maps the input to the residual stream, `units` are the residual units the plan
    counts (plan.after indexes them), `leave` maps the last stream to the output. A batch leaves at an exit when
    every sample in it is confident (cond takes one predicate per call)."""

    def __init__(self, enter, units, leave, plan):
        super().__init__()
        self.enter, self.units, self.leave = enter, units, leave
        self.after, self.thresholds = plan.after, plan.thresholds
        for k, h in enumerate(plan.heads):
            self.register_buffer(f"w{k}", h.weight)
            self.register_buffer(f"b{k}", h.bias)

    def head(self, k, h):
        dims = (2, 3) if h.dim() == 4 else (1,)          # feature maps: over space; tokens: over tokens
        feats = torch.cat([h.mean(dims), (h * h).mean(dims).sqrt()], 1)
        return F.linear(feats, getattr(self, f"w{k}"), getattr(self, f"b{k}"))

    def stage(self, k):
        first = self.after[k - 1] + 1 if k else 0
        last = self.after[k] if k < len(self.after) else len(self.units) - 1

        def run(h, *_):
            for i in range(first, last + 1):
                h = self.units[i](h)
            if k == len(self.after):
                return self.leave(h)
            logits = self.head(k, h)
            sure = torch.softmax(logits, -1).amax(-1).min() >= self.thresholds[k]
            return torch.cond(sure, lambda h, z: z.clone(), self.stage(k + 1), (h, logits))
        return run

    def forward(self, x):
        return self.stage(0)(self.enter(x))


def resnet_exits(model, plan) -> CondExits:
    return CondExits(model.stem, model.blocks, lambda h: model.head(h.mean((2, 3))), plan).eval()


def transformer_exits(model, plan) -> CondExits:
    """The DigitsTransformer's units are its sub-blocks, attention then FFN per layer (graphopt's block order)."""
    def attention(layer):
        def run(x):
            b, t, d = x.shape
            q, k, v = layer.qkv(layer.norm1(x)).reshape(b, t, 3, layer.heads, d // layer.heads).permute(2, 0, 3, 1, 4)
            return x + layer.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))
        return run

    def ffn(layer):
        return lambda x: x + layer.down(F.gelu(layer.up(layer.norm2(x))))
    units = [f(layer) for layer in model.layers for f in (attention, ffn)]
    return CondExits(lambda x: model.embed(x[:, 0]) + model.pos, units,
                     lambda h: model.head(model.norm(h).mean(1)), plan).eval()


def if_in_ort(cond: CondExits, x1: torch.Tensor):
    """The torch.cond model exported by torch.onnx (ONNX If nodes), in ORT: (runner, runner on one intra-op
    thread, If node count)."""
    with quiet(stdout=True):
        program = torch.onnx.export(cond, (x1,), dynamo=True, verbose=False,
                                    dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    model = program.model_proto.SerializeToString()
    return bench.ort_runner(model), bench.ort_runner(model, threads=1), count_if(program.model_proto.graph)


def one_per_call(rounds: int, systems: dict, samples: list, note: str) -> list[str]:
    """Latency rows, one sample per call: graphopt's full model and ORT's If (at its faster thread setting) as
    the references."""
    loops = {name: (lambda fn=fn: [fn(s) for s in samples]) for name, fn in systems.items()}
    ms = bench.time_side_by_side(loops, (), rounds=rounds)
    peer = min(ms["If in ORT"], ms["If in ORT, 1 thread"])
    lines = [f"  latency: one image per call, mean over {len(samples)} test images; the peer is ORT's If at its "
             f"faster thread setting", f"    ({note})"]
    for label, t in ms.items():
        lines.append(f"    {label:<22} {t / len(samples):8.3f} ms  ×{ms['graphopt'] / t:5.2f} vs graphopt  "
                     f"×{peer / t:5.2f} vs If in ORT")
    return lines


def count_if(graph) -> int:
    """If nodes in an ONNX graph, nested ones (inside branches) included."""
    return sum((n.op_type == "If") + sum(count_if(a.g) for a in n.attribute if a.type == a.GRAPH)
               for n in graph.node)


def digits(rounds: int) -> list[str]:
    t0 = time.perf_counter()
    model = zoo.train_digits(blocks=8, width=32, epochs=12)
    train_s = time.perf_counter() - t0
    data = zoo.digits()
    xc, _ = data["calibration"]
    xt, yt = data["test"]
    calibration = [(xc[i:i + 100],) for i in range(0, len(xc), 100)]
    acc = lambda out: (torch.as_tensor(out[0] if isinstance(out, list) else out).argmax(-1) == yt  # noqa: E731
                       ).float().mean().item() * 100
    with torch.no_grad():
        full_acc = acc(model(xt))
    compile_s = {}

    def timed(label, fn):
        t = time.perf_counter()
        out = fn()
        compile_s[label] = time.perf_counter() - t
        return out

    full = timed("graphopt", lambda: graphopt.compile(model, (xt,)))
    static = timed("static skip 1%", lambda: graphopt.compile(model, (xt,), calibration=calibration,
                                                               layer_skip=graphopt.LayerSkip(0.01, metric="top1")))
    ee = graphopt.EarlyExit(0.01, metric="top1")
    early = timed("early exit 1%", lambda: graphopt.compile(model, (xt,), early_exit=ee, calibration=calibration))
    plan = early.plans["early_exit"]
    cond = resnet_exits(model, plan)
    if_ort, if_1, n_if = if_in_ort(cond, xt[:1])
    early(xt)
    shares = torch.bincount(early.last_exits, minlength=len(plan.thresholds) + 1).tolist()
    lines = [f"(b) DigitsResNet, 8 residual blocks × 32 channels, trained here in {train_s:.0f} s; "
             f"test split {len(yt)} images; exits after blocks {plan.after} at thresholds "
             f"{[round(t, 3) for t in plan.thresholds]}; test samples leaving at each exit / the end: {shares}"]
    cond_batch = timed("graphopt torch.cond", lambda: graphopt.compile(cond, (xt,)))
    throughput = {"eager": bench.eager(model), "torch.compile": bench.torch_compiled(model),
                  "plain ORT": bench.plain_ort(model, (xt,)), "graphopt": full, "graphopt torch.cond": cond_batch,
                  "static skip 1%": static, "early exit 1%": early,
                  f"If in ORT ({n_if} If)": if_ort}
    ms = bench.time_side_by_side(throughput, (xt,), rounds=rounds)
    lines.append(f"  throughput: the {len(yt)} test images in one batch; accuracy on them (full model "
                 f"{full_acc:.2f}%)")
    for label, t in ms.items():
        extra = f"  {dropped(static)}" if label == "static skip 1%" else ""
        comp = f"  (compile {compile_s[label]:.0f} s)" if label in compile_s else ""
        lines.append(f"    {label:<20} {t:8.2f} ms  ×{ms['graphopt'] / t:5.2f} vs graphopt  ×{ms['eager'] / t:5.2f} "
                     f"vs eager  accuracy {acc(throughput[label](xt)):.2f}%{extra}{comp}")

    # the same two timed alone: with a dozen ONNX Runtime sessions in the process (the cond model's segments,
    # the If model) the static model's unfused convs measured slower than in a process of its own
    pair = bench.time_side_by_side({"graphopt": full, "static skip 1%": static}, (xt,), rounds=rounds)
    lines.append(f"  static skip 1% timed as a pair with graphopt: {pair['static skip 1%']:.2f} vs "
                 f"{pair['graphopt']:.2f} ms, ×{pair['graphopt'] / pair['static skip 1%']:.2f}")

    # latency: one image per call, over 100 test images (graphopt's full model compiled for batch 1)
    samples = [xt[i:i + 1] for i in range(100)]
    lines += one_per_call(rounds, {"graphopt": graphopt.compile(model, (xt[:1],)), "early exit 1%": early,
                                   "early exit, dispatcher": lambda s: early.executable.run_segments([s]),
                                   "graphopt torch.cond": graphopt.compile(cond, (xt[:1],)),
                                   "If in ORT": if_ort, "If in ORT, 1 thread": if_1},
                          samples, early.executable.single_notes[0])
    return lines


def transformer(rounds: int) -> list[str]:
    t0 = time.perf_counter()
    model = zoo.train_digits_transformer()
    train_s = time.perf_counter() - t0
    data = zoo.digits()
    xc, _ = data["calibration"]
    xt, yt = data["test"]
    calibration = [(xc[i:i + 100],) for i in range(0, len(xc), 100)]
    acc = lambda out: (torch.as_tensor(out).argmax(-1) == yt).float().mean().item() * 100  # noqa: E731
    with torch.no_grad():
        full_acc = acc(model(xt))
    t0 = time.perf_counter()
    early = graphopt.compile(model, (xt,), early_exit=graphopt.EarlyExit(0.01, metric="top1"), calibration=calibration)
    compile_s = time.perf_counter() - t0
    full = graphopt.compile(model, (xt,))
    ex = early.executable
    early(xt)
    shares = torch.bincount(early.last_exits, minlength=len(ex.thresholds) + 1).tolist()
    lines = [f"(c) DigitsTransformer, 4 layers × 64, trained here in {train_s:.0f} s; exits after "
             f"{len(ex.thresholds)} sub-blocks, test samples leaving at each exit / the end: {shares}; "
             f"early exit compiled in {compile_s:.0f} s", f"  {ex.single_notes[0]}"]
    ms = bench.time_side_by_side({"eager": bench.eager(model), "graphopt": full, "early exit 1%": early}, (xt,),
                                 rounds=rounds)
    lines.append(f"  throughput: the {len(yt)} test images in one batch (full model {full_acc:.2f}%)")
    for label, t in ms.items():
        out = model(xt) if label == "eager" else (full if label == "graphopt" else early)(xt)
        lines.append(f"    {label:<22} {t:8.2f} ms  ×{ms['graphopt'] / t:5.2f} vs graphopt  accuracy {acc(out):.2f}%")
    cond = transformer_exits(model, early.plans["early_exit"])
    with torch.no_grad():               # the peer computes the same exits: its outputs where a sample leaves alone
        agree = max((cond(xt[i:i + 1]) - early(xt[i:i + 1])).abs().max().item() for i in range(50))
    if_ort, if_1, n_if = if_in_ort(cond, xt[:1])
    lines += one_per_call(rounds, {"eager": bench.eager(model), "graphopt": graphopt.compile(model, (xt[:1],)),
                                   "early exit 1%": early, "early exit, dispatcher": lambda s: ex.run_segments([s]),
                                   "If in ORT": if_ort, "If in ORT, 1 thread": if_1},
                          [xt[i:i + 1] for i in range(100)],
                          f"{n_if} If nodes; torch.cond model vs early exit, one sample each: max |diff| {agree:.1e}")
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="minilm,digits,transformer")
    ap.add_argument("--rounds", type=int, default=9)
    ns = ap.parse_args()
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {torch.get_num_threads()} threads; "
          "median ms per call, interleaved rounds", flush=True)
    for part in ns.parts.split(","):
        print("\n".join({"minilm": minilm, "digits": digits, "transformer": transformer}[part](ns.rounds)),
              flush=True)


if __name__ == "__main__":
    main()
