"""Issue 36: every transformers architecture graphopt can build from a small config (random init), compiled on
ONNX Runtime and TVM and compared with eager — the architectures the tests do not build.

    python benchmarks/sweep_architectures.py [--kinds causal,image] [--backends ort,tvm] [--only mixtral,falcon]
                                             [--out sweep.jsonl] [--seconds 240]

Each model runs in a worker process (a crash in a native library takes one model, not the sweep); results are
appended to --out as JSON lines (one per model and backend) and summarized at the end: how many of how many pass,
and each failure's cause in one line."""
import argparse
import collections
import contextlib
import inspect
import json
import os
import signal
import subprocess
import sys
import time

SMALL = {   # config attribute → small value, set where the architecture's config has the attribute
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "embed_dim": 64, "n_embed": 64, "word_embed_proj_dim": 64,
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2, "encoder_layers": 2, "decoder_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "encoder_attention_heads": 4, "decoder_attention_heads": 4,
    "num_key_value_heads": 2, "multi_query_group_num": 2,
    "intermediate_size": 128, "ffn_dim": 128, "n_inner": 128, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128,
    "d_ff": 128, "ffn_hidden_size": 128,
    "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64, "num_local_experts": 4, "num_experts": 4,
    "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_topk": 2, "first_k_dense_replace": 1,
    "vocab_size": 512, "max_position_embeddings": 128, "n_positions": 128,
    "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16, "kv_lora_rank": 32, "q_lora_rank": 32,
    "image_size": 32, "patch_size": 8, "num_channels": 3,
}
TOLERANCE = 1e-3   # of the output scale


def small_config(name: str):
    from transformers import CONFIG_MAPPING
    config = CONFIG_MAPPING[name]()
    text = getattr(config, "text_config", None)
    for cfg in [config] + ([text] if text is not None and text is not config else []):
        for key, value in SMALL.items():
            if key in cfg.to_dict() and not isinstance(cfg.to_dict()[key], (list, dict)):
                with contextlib.suppress(AttributeError):   # a property without a setter
                    setattr(cfg, key, value)
        if getattr(cfg, "head_dim", None) is not None and not hasattr(cfg, "qk_rope_head_dim"):
            with contextlib.suppress(AttributeError):
                cfg.head_dim = 16
    return config


def build(kind: str, name: str):
    import torch
    import transformers
    from transformers.models.auto import modeling_auto as auto
    mapping = {"causal": auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
               "image": auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES}[kind]
    cls = mapping[name]
    cls = getattr(transformers, cls if isinstance(cls, str) else cls[0])
    config = small_config(name)
    torch.manual_seed(0)
    model = cls(config).eval()
    if kind == "causal":
        vocab = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", 512)
        return model, (torch.randint(0, min(vocab, 512), (2, 16)),)
    size = getattr(config, "image_size", 32)
    size = size if isinstance(size, int) else size[0]
    return model, (torch.randn(2, getattr(config, "num_channels", 3), size, size),)


def worker(kind: str, names: list[str], backends: list[str], out: str, seconds: int) -> None:
    import torch
    import graphopt
    from graphopt.numerics import drift, flat_tensors

    unchecked = {"check": False} if "check" in inspect.signature(graphopt.compile).parameters else {}  # older graphopt

    def timeout(*_):
        raise TimeoutError(f"over {seconds} s")
    signal.signal(signal.SIGALRM, timeout)
    for name in names:
        with open(out, "a") as f:
            f.write(json.dumps({"kind": kind, "name": name, "started": True}) + "\n")
        try:
            model, args = build(kind, name)
            with torch.no_grad():
                model(*args)
        except Exception as e:   # noqa: BLE001
            record(out, kind, name, "-", "not built", f"{type(e).__name__}: {first_line(e)}")
            continue
        for backend in backends:
            t0 = time.perf_counter()
            signal.alarm(seconds)
            try:
                cm = graphopt.compile(model, args, backend=backend, **unchecked)
                with torch.no_grad():   # after compile: graphopt may register the model's output types as pytrees
                    ref = flat_tensors(model(*args))
                d = drift(cm(*args), ref)
                status = "pass" if d.rel <= TOLERANCE else "mismatch"
                why = "" if status == "pass" else f"relative error {d.rel:.3g} on output {d.output}"
            except BaseException as e:   # noqa: BLE001
                status, why = "fail", f"{type(e).__name__}: {first_line(e)}"
            finally:
                signal.alarm(0)
            record(out, kind, name, backend, status, why, time.perf_counter() - t0)


def first_line(e: BaseException) -> str:
    """The error's first line, and its `reason:` line where it has one (graphopt's capture errors)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    reason = next((ln for ln in lines if ln.startswith("reason:")), "")
    return (lines[0][:160] + (" — " + reason[:200] if reason else "")) if lines else ""


def record(out, kind, name, backend, status, why, seconds=0.0):
    with open(out, "a") as f:
        f.write(json.dumps({"kind": kind, "name": name, "backend": backend, "status": status, "why": why,
                            "seconds": round(seconds, 1)}) + "\n")


def names_of(kind: str) -> list[str]:
    from transformers.models.auto import modeling_auto as auto
    return sorted({"causal": auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                   "image": auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES}[kind])


def read(out: str) -> list[dict]:
    if not os.path.exists(out):
        return []
    return [json.loads(ln) for ln in open(out) if ln.strip()]


def drive(ns) -> None:
    for kind in ns.kinds.split(","):
        todo = ns.only.split(",") if ns.only else names_of(kind)
        while True:
            done = {(r["kind"], r["name"]) for r in read(ns.out) if "status" in r and
                    (r["backend"] == ns.backends.split(",")[-1] or r["status"] == "not built")}
            started = [r["name"] for r in read(ns.out) if r.get("started") and r["kind"] == kind]
            crashed = [n for n in started if (kind, n) not in done]
            for name in crashed:   # the worker died in it (a native crash): recorded, and skipped
                record(ns.out, kind, name, "?", "fail", "the process died (a crash in a native library)")
                done.add((kind, name))
            rest = [n for n in todo if (kind, n) not in done]
            if not rest:
                break
            worker = subprocess.Popen([sys.executable, __file__, "--worker", kind, "--only", ",".join(rest),
                                       "--backends", ns.backends, "--out", ns.out, "--seconds", str(ns.seconds)])
            stale = 2 * ns.seconds * len(ns.backends.split(",")) + 60   # the alarm cannot stop native code
            launched = time.time()
            while worker.poll() is None:
                time.sleep(5)
                written = os.path.getmtime(ns.out) if os.path.exists(ns.out) else launched   # none yet: importing
                if time.time() - max(written, launched) > stale:
                    worker.kill()
                    worker.wait()
                    last = [r for r in read(ns.out) if r.get("started")]
                    record(ns.out, kind, last[-1]["name"] if last else rest[0], "?", "fail",
                           f"no result in {stale} s (stuck in native code)")
    summarize(read(ns.out))


def summarize(rows: list[dict]) -> None:
    results = [r for r in rows if "status" in r]
    by = collections.defaultdict(dict)
    for r in results:
        by[(r["kind"], r["name"])][r["backend"]] = r
    built = {k: v for k, v in by.items() if "-" not in v}
    print(f"{len(by)} architectures tried, {len(built)} built from a small config")
    for backend in ("ort", "tvm"):
        ok = sum(1 for v in built.values() if v.get(backend, {}).get("status") == "pass")
        print(f"  {backend}: {ok} of {len(built)} match eager (relative error ≤ {TOLERANCE:g})")
    print("failures:")
    for (kind, name), v in sorted(built.items()):
        for backend, r in sorted(v.items()):
            if r["status"] != "pass":
                print(f"  {kind:<6} {name:<28} {backend:<4} {r['status']}: {r['why']}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kinds", default="causal,image")
    ap.add_argument("--backends", default="ort,tvm")
    ap.add_argument("--only", default="")
    ap.add_argument("--out", default="sweep.jsonl")
    ap.add_argument("--seconds", type=int, default=240)
    ap.add_argument("--worker", default="")
    ap.add_argument("--summary", action="store_true", help="summarize --out and stop")
    ns = ap.parse_args()
    if ns.summary:
        summarize(read(ns.out))
    elif ns.worker:
        worker(ns.worker, ns.only.split(","), ns.backends.split(","), ns.out, ns.seconds)
    else:
        drive(ns)


if __name__ == "__main__":
    main()
