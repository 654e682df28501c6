"""Issue 15's GPU checks, run by benchmarks/gpu.sh on a machine with a CUDA GPU (TVM from the .gpu bundle).

--zoo:    every zoo model (tiny) compiled for target="cuda" on TVM, run on the GPU and compared with eager on the
          GPU in fp32 (TF32 off on both): max error relative to the output scale, NaN/inf, and the first call's
          outputs unchanged after a second call with other inputs (CUDA graphs replay into cached buffers).
--bench:  ResNet-50 and BERT-base, batch 1 fp32 (TF32 off): eager, torch.compile (default and
          mode="reduce-overhead", its CUDA graphs) and graphopt TVM (DLight schedules, CUDA graphs); batch 32:
          eager fp16 (model.half()) against graphopt precision="fp16". Median ms per call (each call waits for
          the GPU) over graphopt's rotated interleaved rounds (`bench.time_side_by_side`); cosine to eager fp32
          beside every row.
--tune:   MetaSchedule on the GPU for ResNet (tiny) within a minute, into a fresh database; then a second compile
          with Tune(time_budget=0) must reuse every record (0 trials); each build checked against eager and timed
          against the untuned (DLight) build.
--smoke:  the same code on the CPU with tiny models and few runs (target "cpu", no torch.compile), to check the
          script itself where there is no GPU.

    python benchmarks/bench_gpu.py --zoo --bench --tune
"""
import argparse
import copy
import tempfile
import time

import torch
import torch.nn.functional as F

import graphopt
from graphopt import bench, zoo

ZOO = ("bert", "gpt2", "t5_encoder", "llama", "vit", "resnet", "mobilenet_v2", "convnext", "efficientnet", "swin")


def on(device, inputs):
    return tuple(t.to(device) for t in inputs)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12)).item()


def check_zoo(device: str, target: str) -> bool:
    print(f"\nzoo on {target} (TVM, fp32; error = max |graphopt − eager| / max |eager|, limit 1e-3):", flush=True)
    ok = True
    for name in ZOO:
        t0 = time.perf_counter()
        try:
            model, inputs = zoo.build(name, size="tiny", batch=2)
            cm = graphopt.compile(model, inputs, backend="tvm", target=target)
            model = model.to(device)
            x, other = on(device, inputs), on(device, tuple(t.flip(-1) for t in inputs))   # other pixels/tokens
            with torch.no_grad():
                want, want_other = bench.main_output(model(*x)), bench.main_output(model(*other))
            got = bench.main_output(cm(*x)).clone()
            kept = bench.main_output(cm(*x))                      # the buffer a second call could overwrite
            got_other = bench.main_output(cm(*other))
            err, err_other = relative_error(got, want), relative_error(got_other, want_other)
            stale = not torch.equal(kept, got)
            finite = bool(torch.isfinite(got).all() and torch.isfinite(got_other).all())
            good = finite and max(err, err_other) <= 1e-3 and not stale
            print(f"  {name:<13} {'ok  ' if good else 'FAIL'} error {err:.1e} / {err_other:.1e} (other inputs)"
                  f"{'' if finite else '  NaN or inf'}{'  first outputs overwritten by the second call' if stale else ''}"
                  f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
        except Exception as e:  # noqa: BLE001 - one model's failure is reported, the others still run
            good = False
            print(f"  {name:<13} FAIL {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}", flush=True)
        ok &= good
    return ok


def synced(fn, device: str):
    """`fn`, each call waiting for the GPU: what a caller of a batch-1 model waits for."""
    if device != "cuda":
        return fn
    return lambda *a: (fn(*a), torch.cuda.synchronize())[0]


def benchmark(device: str, target: str, smoke: bool) -> None:
    size, rounds = ("tiny", 2) if smoke else ("base", 7)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False   # fp32 against fp32
    for name in ("resnet", "bert"):
        print(f"\n{name} ({size}) on {target}, median ms per call, interleaved rounds", flush=True)
        for batch, half in ((1, False), (32, True)):
            model, inputs = zoo.build(name, size=size, batch=batch, **({} if name == "resnet" else {"seq": 128}))
            t0 = time.perf_counter()
            ours = graphopt.compile(model, inputs, backend="tvm", target=target, precision="fp16" if half else "fp32")
            eager = copy.deepcopy(model).to(device)
            x = on(device, inputs)
            with torch.no_grad():
                reference = bench.main_output(eager(*x)).float()
            if half:
                systems = {"eager fp16": lambda *a, m=eager.half(): m(*(t.half() if t.is_floating_point() else t
                                                                          for t in a)),
                           "graphopt fp16": ours}
            else:
                systems = {"eager": eager}
                if not smoke:
                    systems["torch.compile"] = torch.compile(copy.deepcopy(eager))
                    systems["torch.compile reduce-overhead"] = torch.compile(copy.deepcopy(eager),
                                                                             mode="reduce-overhead")
                systems["graphopt"] = ours
            with torch.no_grad():
                ms = bench.time_side_by_side({k: synced(f, device) for k, f in systems.items()}, x, rounds=rounds)
                print(f"  batch {batch} (built and warmed up in {time.perf_counter() - t0:.0f} s):", flush=True)
                base = ms["eager fp16" if half else "eager"]
                for label, t in ms.items():
                    got = bench.main_output(systems[label](*x)).float()
                    cos = F.cosine_similarity(got.flatten(), reference.flatten(), dim=0).item()
                    print(f"    {label:<30} {t:8.3f} ms   ×{base / t:5.2f} vs {'eager fp16' if half else 'eager'}"
                          f"   cosine to eager fp32 {cos:.5f}", flush=True)
            systems.clear()
            if device == "cuda":
                torch.cuda.empty_cache()


def tune(device: str, target: str, smoke: bool) -> bool:
    budget = 10 if smoke else 60
    print(f"\nMetaSchedule on {target}: ResNet (tiny, batch 1), a {budget} s budget into a fresh database", flush=True)
    model, inputs = zoo.build("resnet", size="tiny", batch=1)
    x = on(device, inputs)
    with torch.no_grad():
        want = bench.main_output(model.to(device)(*x))
    with tempfile.TemporaryDirectory() as db:
        t0 = time.perf_counter()
        builds = {"untuned": graphopt.compile(model.cpu(), inputs, backend="tvm", target=target),
                  "tuned": graphopt.compile(model.cpu(), inputs, backend="tvm", target=target,
                                            tune=graphopt.Tune(trials=16, time_budget=budget, db=db, progress=False))}
        builds["reused"] = graphopt.compile(model.cpu(), inputs, backend="tvm", target=target,
                                            tune=graphopt.Tune(time_budget=0, db=db, progress=False))
        print(f"  built in {time.perf_counter() - t0:.0f} s", flush=True)
        ms = bench.time_side_by_side({k: synced(cm, device) for k, cm in builds.items()}, x, rounds=3 if smoke else 7)
        ok = True
        for label, cm in builds.items():
            err = relative_error(bench.main_output(cm(*x)), want)
            summary = next((n for n in cm.report[-1].notes if n.startswith("tuning:")), "")
            ok &= err <= 1e-3
            print(f"  {label:<17} {ms[label]:8.3f} ms  error {err:.1e}  {summary}", flush=True)
        reused = next(n for n in builds["reused"].report[-1].notes if n.startswith("tuning:"))
        ok &= reused.startswith("tuning: 0 trials") and " 0 from the database" not in reused
    print(f"  {'ok' if ok else 'FAIL'}: tuned and reused builds match eager; the reuse measured nothing", flush=True)
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", action="store_true")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="on the CPU, tiny models: checks the script itself")
    ns = ap.parse_args()
    device, target = ("cpu", "cpu") if ns.smoke else ("cuda", "cuda")
    if not ns.smoke and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py: no CUDA device here (use --smoke to check the script on the CPU)")
    print(f"torch {torch.__version__}" + ("" if ns.smoke else f", {torch.cuda.get_device_name(0)}"), flush=True)
    ok = check_zoo(device, target) if ns.zoo else True
    if ns.bench:
        benchmark(device, target, ns.smoke)
    if ns.tune:
        try:
            ok &= tune(device, target, ns.smoke)
        except Exception as e:  # noqa: BLE001 - reported like a zoo model's failure
            ok = False
            print(f"  FAIL {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}", flush=True)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
