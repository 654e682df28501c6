"""Issue 31 benchmark: graphopt.Auto's candidate evaluations in this process against two Ray workers, in one process
on the same model, calibration and seed — the wall time of the evaluation part (the auto pass's "evaluating plans":
the search and its finalists' confirmation, every plan built and run on the calibration batches; not the rate probes,
the move proxies or the finalists' timing, which stay in this process) side by side, the plans compared, and the
seconds one candidate takes, measured in a worker.

Then what a cluster changes, measured rather than assumed: the same search run once more with a simulated pool of
`--project` workers (evaluated here, one by one) that records the batches the search asks for. Each batch of n
candidates takes ⌈n / workers⌉ rounds on that many workers: the rounds times the per-candidate seconds is the
evaluation part's wall time there, before Ray's own per-task overheads.

    python benchmarks/bench_distributed.py [--model mlp|digits] [--families quant,prune,skip] [--project 64]
                                           [--rows 2048] [--serial-threads default,1]

Models (nothing downloaded):
  mlp      a residual MLP, 6 blocks 128 → 512 → 128, 4 calibration batches of --rows rows (2 held out), random
           weights with cheap moves for every family (the model of tests/test_auto.py, larger batches)
  digits   DigitsResNet 8 × 32, trained here on scikit-learn's digits; 4 calibration batches of 100 images
The goal on 2 cores: the evaluation part with 2 Ray workers ≤ 0.7 × serial. The serial search runs twice, at torch's
default threads and on one thread (each Ray worker runs one): on a loaded machine two threads contend, and a busy
2-core machine measured one run_batches 10× slower on 2 threads than on 1. Read the ratios, and rerun where nothing
else runs.
"""
import argparse
import math
import re
import statistics
import sys
import time
from pathlib import Path

import torch

import graphopt
from graphopt import quality, zoo
from graphopt.passes.auto import joint
from graphopt.passes.auto.plan import Plan
from graphopt.passes.calibration import run_batches

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))


def mlp(rows: int):
    from test_auto import ResidualMLP
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    return ResidualMLP().eval(), [(torch.randn(rows, 64, generator=g),) for _ in range(4)], "cosine", \
        f"residual MLP 6 × (128 → 512 → 128), 4 × {rows} rows"


def digits():
    model = zoo.train_digits(blocks=8, width=32, epochs=8)
    xc, _ = zoo.digits()["calibration"]
    return model, [(xc[i:i + 100],) for i in range(0, 400, 100)], "top1", "DigitsResNet 8 × 32, 4 × 100 images"


class CountingPool:
    """A stand-in for the Ray pool: evaluates here, one by one, and records the batches the search asks for."""

    def __init__(self, space, fit, check, refs, metric, per_batch, width):
        self.space, self.fit, self.check, self.refs, self.metric = space, fit, check, refs, metric
        self.per_batch, self.width, self.batches, self.startup_s = per_batch, width, [], 0.0
        self.refs_by = {"check": refs}

    def losses(self, plans, which="check", refs=None):
        self.batches.append(len(plans))
        if refs is not None:
            self.refs_by[which] = refs
        batches = self.check if which == "check" else self.fit + self.check
        return [quality.loss(run_batches(self.space.built(Plan(**p)), batches), self.refs_by[which], self.metric,
                             self.per_batch) for _, p in plans]

    def close(self):
        pass

    def report(self):
        return []


def search_seconds(cm) -> tuple[float, float, str]:
    """(the evaluation part's seconds, Ray's start-up seconds, the auto pass's Ray note) from the pass's notes."""
    notes = next(r for r in cm.report if r.name == "auto").notes
    time_note = next(n for n in notes if n.startswith("time:"))
    search = float(re.search(r"evaluating plans ([\d.]+) s", time_note).group(1))
    start = re.search(r"Ray start-up ([\d.]+) s", time_note)
    ray_note = next((n for n in notes if n.startswith("candidates evaluated as Ray tasks")), "")
    return search, float(start.group(1)) if start else 0.0, ray_note


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("mlp", "digits"), default="mlp")
    ap.add_argument("--families", default="quant,prune,skip")
    ap.add_argument("--budget", type=float, default=0.02)
    ap.add_argument("--project", type=int, default=64, help="the cluster size to project to")
    ap.add_argument("--rows", type=int, default=2048, help="rows per calibration batch (mlp): the work per candidate")
    ap.add_argument("--serial-threads", default="default,1",
                    help="torch threads of the serial runs: 'default' (torch's), and/or counts")
    ns = ap.parse_args()
    model, cal, metric, what = mlp(ns.rows) if ns.model == "mlp" else digits()
    families = tuple(ns.families.split(","))
    print(f"# {what}; Auto(budget={ns.budget:g}, metric={metric!r}, families={families}); "
          f"{torch.get_num_threads()} torch threads here", flush=True)

    def run(label, threads=None, **kw):
        default = torch.get_num_threads()
        torch.set_num_threads(threads or default)
        t0 = time.perf_counter()
        try:
            cm = graphopt.compile(model, cal[0], calibration=cal,
                                  optimize=graphopt.Auto(ns.budget, metric, families=families, **kw))
        finally:
            torch.set_num_threads(default)
        total = time.perf_counter() - t0
        search, start, note = search_seconds(cm)
        print(f"  {label:<16} compile {total:6.1f} s; Ray start-up {start:5.1f} s; evaluation part {search:6.1f} s; "
              f"{cm.plan.summary()}; {len(cm.plan.search['evaluated'])} plans", flush=True)
        if note:
            print(f"    {note}", flush=True)
        return cm, search

    serials = {}
    for t in ns.serial_threads.split(","):
        threads = torch.get_num_threads() if t == "default" else int(t)
        serials[threads] = run(f"serial, {threads} thr", threads=threads)
    first = next(iter(serials))
    serial, serial_s = serials[first]
    # this process (rate probes, finalists' timing, the full graph's outputs) on the first serial run's threads
    parallel, parallel_s = run("2 Ray workers", threads=first, workers=2)
    same = serial.plan.to_json() == parallel.plan.to_json()
    layers = [(r["where"], r["level"]) for r in serial.plan.layers] == \
        [(r["where"], r["level"]) for r in parallel.plan.layers]
    evaluated = len(serial.plan.search["evaluated"])
    per_candidate = statistics.median(float(x) for x in re.findall(
        r"([\d.]+) s each", search_seconds(parallel)[2])) if search_seconds(parallel)[2] else float("nan")
    verdict = "yes" if layers and same else ("levels yes, " if layers else "levels NO, ") + \
        ("JSON yes" if same else "JSON differs (losses in the last bits)")
    print("\nevaluation part, 2 Ray workers (1 torch thread each) / serial: " + ", ".join(
        f"{parallel_s / s:.2f} against serial on {t} thread{'s' * (t > 1)}" for t, (_, s) in serials.items())
        + f" (goal ≤ 0.70); plans identical: {verdict}")
    print(f"per candidate: {per_candidate:.3f} s in a worker (median); serial " + ", ".join(
        f"{s / max(evaluated, 1):.3f} s on {t} thread{'s' * (t > 1)}" for t, (_, s) in serials.items())
        + f" of evaluation part per plan measured ({evaluated} plans; finalists' confirmations in the time)")

    # the same search with a simulated pool of --project workers: the batches it asks for, as rounds
    made = {}

    def counting(self, space, fit, check, refs, per_batch, result):
        made["pool"] = CountingPool(space, fit, check, refs, self.metric, per_batch, ns.project)
        return made["pool"]
    real = joint.JointPlan._pool
    joint.JointPlan._pool = counting
    torch.set_num_threads(first)
    try:
        simulated = graphopt.compile(model, cal[0], calibration=cal,
                                     optimize=graphopt.Auto(ns.budget, metric, families=families))
    finally:
        joint.JointPlan._pool = real
    pool = made["pool"]
    rounds = sum(math.ceil(n / ns.project) for n in pool.batches)
    print(f"with {ns.project} workers (simulated; same plan: "
          f"{'yes' if simulated.plan.summary() == serial.plan.summary() else 'NO'}): the search asks for "
          f"{len(pool.batches)} batches, {sum(pool.batches)} candidates computed for {evaluated} plans measured, "
          f"largest batch {max(pool.batches)}; {rounds} rounds of one candidate each on {ns.project} workers")
    print(f"evaluation part projected at {per_candidate:.3f} s per candidate: {ns.project} workers "
          f"{rounds * per_candidate:.1f} s (rounds × seconds, before Ray's per-task overhead), against "
          f"{evaluated * per_candidate:.1f} s for {evaluated} candidates one by one")

if __name__ == "__main__":
    main()
