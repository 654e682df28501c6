"""Issue 32: what a compile costs — time and peak memory, each measurement in a process of its own.

    python benchmarks/bench_compile.py [--models bert,gpt2,resnet,llama] [--sizes tiny,base,large]

Per model: torch.onnx.export of the model (the floor every ONNX path pays), torch.compile's first call, graphopt's
default compile with an empty verdict cache (cold), and again in a new process with the cache the cold compile
filled (warm: every measured decision read back, nothing timed). Peak RSS is the process's high-water mark
(ru_maxrss), beside the fp32 weights' size, the RSS of the libraries alone (torch, transformers, onnxruntime,
onnxscript and graphopt imported: 0.4 GB, the size of a base model's weights) and after building the model; the last
columns are graphopt's cold peak RSS over the fp32 weights, the same without the libraries, and per parameter, and under each row the cold compile's slowest steps. The
zoo's tiny CNNs: `--models resnet,mobilenet_v2,convnext,efficientnet --sizes tiny`. "large" is BERT-large, GPT-2
medium, ResNet-152 and a Llama of 0.77 B parameters (3.1 GB of fp32 weights: past protobuf's 2 GB, so ONNX with
external data)."""
import argparse
import json
import os
import subprocess
import sys
import tempfile

def build(name: str, size: str):
    import torch
    from graphopt import zoo
    if size != "large":
        return zoo.build(name, size=size, batch=1, seq=128)
    import transformers as T
    ids = (torch.randint(0, 1000, (1, 128)),)
    if name == "bert":
        return T.BertModel(T.BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                        intermediate_size=4096)).eval(), ids
    if name == "gpt2":
        return T.GPT2Model(T.GPT2Config(n_embd=1024, n_layer=24, n_head=16, use_cache=False)).eval(), ids
    if name == "llama":   # 0.77 B parameters: 3.1 GB of fp32 weights, past protobuf's 2 GB
        return T.LlamaModel(T.LlamaConfig(hidden_size=2048, intermediate_size=5504, num_hidden_layers=14,
                                          num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
                                          use_cache=False)).eval(), ids
    if name == "resnet":  # ResNet-152
        return T.ResNetModel(T.ResNetConfig(depths=[3, 8, 36, 3])).eval(), (torch.randn(1, 3, 224, 224),)
    raise SystemExit(f"no large size of {name}")


def one(kind: str, name: str, size: str) -> dict:
    """Run in the child: build the model, do `kind`, report seconds and peak RSS."""
    import resource
    import time
    import onnxruntime  # noqa: F401 - every library a column may use, imported before the baseline is read
    import onnxscript  # noqa: F401
    import torch
    import transformers  # noqa: F401
    import graphopt  # noqa: F401
    rss_libs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    model, args = build(name, size)
    params = sum(p.numel() for p in model.parameters())
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    error, seconds, steps = "", float("nan"), ""
    try:
        t0 = time.perf_counter()
        if kind == "onnx export":
            with tempfile.TemporaryDirectory() as d:
                program = torch.onnx.export(model, args, dynamo=True, verbose=False)
                program.save(os.path.join(d, "m.onnx"), external_data=params * 4 > 2 ** 31)
        elif kind == "torch.compile":
            with torch.no_grad():
                torch.compile(model)(*args)
        else:
            import graphopt
            cm = graphopt.compile(model, args)
        seconds = time.perf_counter() - t0
        if kind.startswith("graphopt"):
            cm(*args)
            steps = ", ".join(f"{r.name} {r.time_s:.1f}" for r in cm.report if r.time_s >= 0.5)
    except Exception as e:   # noqa: BLE001 - the table says what failed
        error = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    return {"seconds": seconds, "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "model_gb": rss_model, "libs_gb": rss_libs, "params": params, "error": error, "steps": steps}


def run(kind: str, name: str, size: str, cache: str) -> dict:
    env = dict(os.environ, XDG_CACHE_HOME=cache)
    done = subprocess.run([sys.executable, __file__, "--child", kind, name, size], env=env, capture_output=True,
                          text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"seconds": float("nan"), "peak_gb": float("nan"), "model_gb": float("nan"), "libs_gb": float("nan"),
                "params": 0,
                "error": f"the process failed: {done.stderr.strip().splitlines()[-1:]}"}
    return json.loads(lines[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="bert,gpt2,resnet,llama")
    ap.add_argument("--sizes", default="tiny,base,large")
    ap.add_argument("--no-torch-compile", action="store_true")
    ap.add_argument("--child", nargs=3)
    ns = ap.parse_args()
    if ns.child:
        print(json.dumps(one(*ns.child)))
        return
    kinds = ["onnx export"] + ([] if ns.no_torch_compile else ["torch.compile"]) + ["graphopt cold", "graphopt warm"]
    print("each measurement in a process of its own; peak RSS in GB (libs: after importing torch, transformers, "
          "onnxruntime, onnxscript and graphopt; model: after building the model too)")
    print(f"{'model':<14}{'params':>9}{'fp32 GB':>9}{'libs GB':>9}{'model GB':>9}  " + "".join(f"{k:>22}" for k in kinds)
          + "  cold/export  warm/export  cold peak/fp32  (peak-libs)/fp32  bytes/param", flush=True)
    for name in ns.models.split(","):
        for size in ns.sizes.split(","):
            with tempfile.TemporaryDirectory() as cache:   # the cold compile fills it, the warm one reads it
                results = {k: run(k, name, size, cache) for k in kinds}
            first = next(iter(results.values()))
            cells = "".join(f"{r['seconds']:>9.1f} s {r['peak_gb']:>5.1f} GB   " if not r["error"] else f"{'failed':>22}"
                            for r in results.values())
            export = results["onnx export"]["seconds"]
            ratios = "  ".join(f"×{results[k]['seconds'] / export:.2f}" if not results[k]["error"] else "—"
                               for k in ("graphopt cold", "graphopt warm"))
            cold, fp32 = results["graphopt cold"], first["params"] * 4 / 2 ** 30
            memory = (f"  {cold['peak_gb'] / fp32:>13.2f}×  {(cold['peak_gb'] - cold['libs_gb']) / fp32:>15.2f}×  "
                      f"{cold['peak_gb'] * 2 ** 30 / first['params']:>11.1f}"
                      if first["params"] and cold["peak_gb"] == cold["peak_gb"] else "")
            print(f"{name + ' ' + size:<14}{first['params'] / 1e6:>8.1f}M{fp32:>9.2f}{first['libs_gb']:>9.2f}"
                  f"{first['model_gb']:>9.2f}  "
                  f"{cells}  {ratios}{memory}", flush=True)
            for k, r in results.items():
                if r["error"]:
                    print(f"    {k}: {r['error']}")
            if not cold["error"] and cold.get("steps"):
                print(f"    graphopt cold, steps over 0.5 s: {cold['steps']} (the rest: capture)", flush=True)


if __name__ == "__main__":
    main()
