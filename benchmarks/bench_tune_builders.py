"""Issue 31 benchmark: MetaSchedule's candidate builds by its LocalBuilder against Ray tasks (Tune(workers=N)), in one
process on the same model, trials and target, each tuning into a fresh database: the tuning's wall time, the build
part's (every batch MetaSchedule hands its builder, timed around the builder), Ray's start-up, and the model's latency
once tuned, with its outputs checked against eager.

The measurements stay on this machine (MetaSchedule's LocalRunner) in both: only where candidates are built changes.
LocalBuilder starts a fresh pool of worker processes for every batch (each imports TVM: seconds); Ray's workers are
started once per tuning and stay warm.

    python benchmarks/bench_tune_builders.py [--trials 8] [--workers 2] [--rounds 1]

Then what a cluster changes, from the per-build seconds measured here: a model of T tasks at N trials builds T × N
candidates; on W Ray workers a batch of B builds takes ⌈B / W⌉ builds' time.
"""
import argparse
import math
import re
import tempfile
import time

import torch

import graphopt


class ThreeLayers(torch.nn.Module):
    """Three distinct matmul tasks (and their epilogues) for MetaSchedule."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(64, 256), torch.nn.Linear(256, 128), torch.nn.Linear(128, 32)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def tuned(model, x, trials, workers):
    tune = graphopt.Tune(trials=trials, time_budget=3600, db=tempfile.mkdtemp(prefix="bench-tune-"), progress=False,
                         **({"workers": workers} if workers else {}))
    t0 = time.perf_counter()
    cm = graphopt.compile(model, x, backend="tvm", tune=tune)
    return cm, time.perf_counter() - t0


def latency_ms(cm, x, calls=200) -> float:
    for _ in range(20):
        cm(*x)
    t0 = time.perf_counter()
    for _ in range(calls):
        cm(*x)
    return (time.perf_counter() - t0) / calls * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="LocalBuilder and Ray runs, alternated, per round")
    ap.add_argument("--project", type=int, default=64, help="the cluster size to project to")
    ns = ap.parse_args()
    torch.manual_seed(0)
    model, x = ThreeLayers().eval(), (torch.randn(8, 64),)
    with torch.no_grad():
        eager = model(*x)
    print(f"# 3 linear layers 64 → 256 → 128 → 32, batch 8; Tune(trials={ns.trials}) on cpu, a fresh database per "
          f"run; LocalBuilder vs Ray(workers={ns.workers})", flush=True)
    rows = {"LocalBuilder": [], f"Ray, {ns.workers} workers": []}
    per_build = []
    for r in range(ns.rounds):
        order = list(rows) if r % 2 == 0 else list(rows)[::-1]
        for label in order:
            cm, seconds = tuned(model, x, ns.trials, ns.workers if label.startswith("Ray") else None)
            report = cm.executable.tune_report
            built = " ".join(report.built)
            build_s = float(re.search(r"batches: ([\d.]+) s", built)[1])
            start = re.search(r"start-up ([\d.]+) s", built)
            each = re.search(r"([\d.]+) s each", built)
            if each:
                per_build.append(float(each[1]))
            diff = (cm(*x) - eager).abs().max().item()
            rows[label].append((seconds, report.seconds, build_s, float(start[1]) if start else 0.0))
            print(f"  {label:<16} compile {seconds:6.1f} s; tuning {report.seconds:6.1f} s ({report.trials} trials, "
                  f"{len(report.tuned)} tasks); builds {build_s:5.1f} s"
                  + (f" + Ray start-up {float(start[1]):.1f} s" if start else "")
                  + f"; tuned model {latency_ms(cm, x):.3f} ms; max |diff| vs eager {diff:.1e}", flush=True)
            for line in report.built:
                print(f"    {line}", flush=True)
            time.sleep(2)
    local, ray = (min(v, key=lambda t: t[1]) for v in rows.values())
    print(f"\ntuning wall time, Ray / LocalBuilder: {ray[1] / local[1]:.2f}; build part {ray[2] / local[2]:.2f} "
          f"({ray[2]:.1f} s vs {local[2]:.1f} s, Ray's start-up {ray[3]:.1f} s on top)")
    if per_build:
        each = min(per_build)
        batch = ns.trials
        print(f"per build in a Ray worker: {each:.3f} s; a batch of {batch} candidates on {ns.project} workers: "
              f"{math.ceil(batch / ns.project) * each:.2f} s, on one worker {batch * each:.2f} s")


if __name__ == "__main__":
    main()
