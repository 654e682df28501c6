"""The joint search: the fastest plan whose loss, measured end to end on held-out batches, fits the budget.

Why this search. Layer errors do not add (EvoPress: "error monotonicity does not hold"), so a plan's loss is
always measured on the whole graph, never summed; a measurement costs a build and a run over the held-out
batches, so the search spends them where they can pay:

1. Seeds, one per family and one across all: the family's moves ranked by loss alone (a proxy: cosine on one
   held-out batch, measured once per move) per millisecond saved, and the longest prefix of that ranking whose
   measured loss fits, found by bisection (log₂ of the moves in measurements). The family seeds are also each
   family's own best plan, the baseline the joint plan must beat.
2. Evolution (EvoPress's level switch): a parent from the best plans found, one or two knobs moved to a level
   that saves more, and often one other knob moved back, so the child stays near the budget; sometimes a
   crossover of two parents first. A child is measured only if its estimated latency would place it among the
   best — most children cost nothing but an estimate. Until the time budget, or `patience` measurements in a
   row that found nothing faster.
3. The finalists (the best plans by estimate and every seed) are built and timed side by side with the dense
   graph on the cost model; the fastest measured one wins, and no plan is kept that measures slower than dense.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable

from .space import Genome, Space

POPULATION = 8
FINALISTS = 4
MAX_EVALUATIONS = 400


@dataclass
class Evaluated:
    genome: Genome
    ms: float               # estimated
    loss: float             # measured end to end on the held-out batches
    origin: str
    measured_ms: float | None = None


class Search:
    def __init__(self, space: Space, loss: Callable[[Genome], float], budget: float, proxy: dict,
                 deadline: float | None, seed: int = 0, patience: int | None = None,
                 progress: Callable[[str], None] | None = None):
        self.space, self._loss, self.budget, self.proxy = space, loss, budget, proxy
        self.deadline, self.rng = deadline, random.Random(seed)
        self.patience = patience or max(24, len(space.knobs) // 2)
        self.progress = progress or (lambda line: None)
        self.evaluated: dict[Genome, Evaluated] = {}
        self.eval_s: list[float] = []      # seconds per measurement, for what the finalists will take
        self.families: dict[str, Evaluated | None] = {}
        self.stopped = ""
        self.reserve_s = 0.0
        self.saving = {(i, lvl): space.saving(i, lvl) for i, k in enumerate(space.knobs) for lvl in range(len(k.levels))}

    # --- measuring -----------------------------------------------------------------------------
    def evaluate(self, genome: Genome, origin: str) -> Evaluated:
        if genome not in self.evaluated:
            t0 = time.perf_counter()
            e = Evaluated(genome, self.space.estimate_ms(genome), self._loss(genome), origin)
            self.eval_s.append(time.perf_counter() - t0)
            self.evaluated[genome] = e
            best = self.best()
            self.progress(f"{len(self.evaluated)} plans measured; best {best.ms:.3f} ms estimated, loss {best.loss:.4g}"
                          if best else f"{len(self.evaluated)} plans measured; none fits yet")
        return self.evaluated[genome]

    def fits(self, e: Evaluated | None) -> bool:
        return e is not None and e.loss <= self.budget

    def best(self) -> Evaluated | None:
        return min((e for e in self.evaluated.values() if self.fits(e) and any(e.genome)), key=lambda e: e.ms,
                   default=None)

    def out_of_time(self) -> bool:
        """Past the deadline less what the finalists still take: timing them (`reserve_s`, as long as the rate
        probes took) and confirming each on every batch (twice a held-out measurement)."""
        if self.deadline is None:
            return False
        mean = sum(self.eval_s) / len(self.eval_s) if self.eval_s else 0.0
        return time.perf_counter() >= self.deadline - self.reserve_s - 2 * (FINALISTS + 4) * mean

    # --- 1. seeds ------------------------------------------------------------------------------
    def seed(self, families: set[str], origin: str) -> Evaluated | None:
        knobs = self.space.knobs
        moves = [(i, lvl) for i, k in enumerate(knobs) if k.family in families for lvl in range(1, len(k.levels))
                 if self.saving[i, lvl] > 0]
        moves.sort(key=lambda m: self.proxy[m] / self.saving[m])

        def prefix(n: int) -> Genome:
            g = [0] * len(knobs)
            for i, lvl in moves[:n]:
                if self.saving[i, lvl] > self.saving[i, g[i]]:
                    g[i] = lvl
            return tuple(g)

        lo, hi, best = 0, len(moves), None
        while lo < hi and not self.out_of_time():
            mid = (lo + hi + 1) // 2
            e = self.evaluate(prefix(mid), origin)
            if self.fits(e):
                lo, best = mid, e
            else:
                hi = mid - 1
        return best

    # --- 2. evolution --------------------------------------------------------------------------
    def mutate(self, parent: Genome) -> Genome:
        g = list(parent)
        if self.rng.random() < 0.25:          # crossover with another good plan
            other = self.rng.choice(self.population()).genome
            g = [a if self.rng.random() < 0.5 else b for a, b in zip(g, other)]
        for _ in range(self.rng.choice((1, 1, 2))):
            i = self.rng.randrange(len(g))
            up = [lvl for lvl in range(len(self.space.knobs[i].levels)) if self.saving[i, lvl] > self.saving[i, g[i]]]
            if up:
                g[i] = self.rng.choice(up)
        active = [i for i, lvl in enumerate(g) if lvl]
        if active and self.rng.random() < 0.5:   # the level switch: give some loss back elsewhere
            j = self.rng.choice(active)
            down = [lvl for lvl in range(len(self.space.knobs[j].levels)) if self.saving[j, lvl] < self.saving[j, g[j]]]
            g[j] = max(down, key=lambda lvl: self.saving[j, lvl]) if down else 0
        return tuple(g)

    def population(self) -> list[Evaluated]:
        fitting = sorted((e for e in self.evaluated.values() if self.fits(e)), key=lambda e: e.ms)
        return fitting[:POPULATION]

    def evolve(self) -> None:
        stale, attempts = 0, 0
        while True:
            if self.out_of_time():
                self.stopped = "the time budget ran out"
                return
            if stale >= self.patience:
                self.stopped = f"{self.patience} plans in a row measured nothing faster"
                return
            if len(self.evaluated) >= MAX_EVALUATIONS or attempts > 50 * MAX_EVALUATIONS:
                self.stopped = f"{len(self.evaluated)} plans measured, the most a search measures"
                return
            attempts += 1
            pop = self.population()
            parent = min(self.rng.sample(pop, min(2, len(pop))), key=lambda e: e.ms).genome
            child = self.mutate(parent)
            if child in self.evaluated:
                continue
            if len(pop) >= POPULATION and self.space.estimate_ms(child) >= pop[-1].ms:
                continue                       # could not enter the population: not worth a measurement
            best = self.best()
            e = self.evaluate(child, "evolution")
            stale = 0 if self.fits(e) and (best is None or e.ms < best.ms * 0.999) else stale + 1

    # --- the whole search ------------------------------------------------------------------------
    def run(self, measure_reserve_s: float = 0.0) -> list[Evaluated]:
        """Seeds, evolution, then the finalists (to be timed by the caller), best estimate first."""
        self.reserve_s = measure_reserve_s
        dense = self.evaluate(self.space.dense(), "dense")
        present = [f for f in ("quant", "prune", "skip") if any(k.family == f for k in self.space.knobs)]
        for family in present:
            self.families[family] = self.seed({family}, f"{family} alone")
        if len(present) > 1:
            self.seed(set(present), "greedy, all families")
        if self.population():
            self.evolve()
        else:
            self.stopped = "no plan but the dense one fits the budget"
        finalists = {e.genome: e for e in self.population()[:FINALISTS]}
        finalists |= {e.genome: e for e in self.families.values() if e is not None}
        finalists |= {e.genome: e for e in self.evaluated.values() if e.origin.startswith("greedy") and self.fits(e)}
        finalists.pop(dense.genome, None)
        return sorted(finalists.values(), key=lambda e: e.ms)
