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

In parallel (`losses=`, a batch evaluator such as Ray tasks, `width` of them at once) the search is the same search:
it computes losses ahead of asking for them, and then asks in the serial order, so the plan is the serial plan
whatever order the results come back in. Ahead of the seeds, every seed's bisection is stepped in lockstep (each
probe depends only on its own earlier losses). Ahead of an evolution child, the next `width − 1` children are
drawn on a copy of the random generator as if each child before them did not fit (a child that does not fit
changes nothing the next draws read); where one does fit, the children drawn after it are not the ones the search
draws, their losses stay unused unless drawn again, and drawing resumes from the real state.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable, Generator

from .space import Genome, Space

POPULATION = 8
FINALISTS = 4
MAX_EVALUATIONS = 400
SPECULATION_TRIES = 200   # draws (most are not worth measuring) to find the next children to compute ahead


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
                 progress: Callable[[str], None] | None = None,
                 losses: Callable[[list[Genome]], list[float]] | None = None, width: int = 1):
        self.space, self._loss, self.budget, self.proxy = space, loss, budget, proxy
        self._losses, self.width = losses, (width if losses is not None else 1)
        self._ready: dict[Genome, float] = {}   # losses computed ahead, not asked for yet
        self.ahead = 0                            # how many the batch evaluator computed
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
            if self._losses is not None:
                self.prefetch([genome])
            if genome in self._ready:
                e = Evaluated(genome, self.space.estimate_ms(genome), self._ready.pop(genome), origin)
            else:
                t0 = time.perf_counter()
                e = Evaluated(genome, self.space.estimate_ms(genome), self._loss(genome), origin)
                self.eval_s.append(time.perf_counter() - t0)
            self.evaluated[genome] = e
            best = self.best()
            self.progress(f"{len(self.evaluated)} plans measured; best {best.ms:.3f} ms estimated, loss {best.loss:.4g}"
                          if best else f"{len(self.evaluated)} plans measured; none fits yet")
        return self.evaluated[genome]

    def prefetch(self, genomes: list[Genome]) -> None:
        """The losses of `genomes` (those not known yet) computed at once by the batch evaluator, kept until
        `evaluate` asks for them; nothing without one."""
        todo = list(dict.fromkeys(g for g in genomes if g not in self.evaluated and g not in self._ready))
        if self._losses is None or not todo:
            return
        t0 = time.perf_counter()
        self._ready.update(zip(todo, self._losses(todo)))
        self.eval_s += [(time.perf_counter() - t0) / len(todo)] * len(todo)
        self.ahead += len(todo)

    @property
    def unused(self) -> int:
        """Losses computed ahead that the search never asked for."""
        return len(self._ready)

    def _known(self, genome: Genome) -> float:
        return self.evaluated[genome].loss if genome in self.evaluated else self._ready[genome]

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
        """The family seed: the longest prefix of the ranked moves whose measured loss fits (bisection)."""
        probes = self._bisection(families)
        try:
            genome = next(probes)
            while True:
                genome = probes.send(self.evaluate(genome, origin).loss)
        except StopIteration as done:
            return self.evaluated[done.value] if done.value is not None else None

    def _seeds_ahead(self, seeds: list[set[str]], also: list[Genome]) -> None:
        """Every seed's bisection stepped in lockstep, each step's probes computed at once (module docstring)."""
        probes = [self._bisection(families) for families in seeds]
        pending = {}
        for i, p in enumerate(probes):
            try:
                pending[i] = next(p)
            except StopIteration:
                pass
        batch = list(also)
        while pending or batch:
            self.prefetch(batch + list(pending.values()))
            batch = []
            for i, genome in list(pending.items()):
                try:
                    pending[i] = probes[i].send(self._known(genome))
                except StopIteration:
                    del pending[i]

    def _bisection(self, families: set[str]) -> Generator[Genome, float, Genome | None]:
        """Yields the probes of `families`' seed, is sent each one's loss, returns the seed's genome (or None)."""
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
            genome = prefix(mid)
            loss = yield genome
            if loss <= self.budget:
                lo, best = mid, genome
            else:
                hi = mid - 1
        return best

    # --- 2. evolution --------------------------------------------------------------------------
    def mutate(self, parent: Genome, rng: random.Random | None = None, pop: list[Evaluated] | None = None) -> Genome:
        rng, g = rng or self.rng, list(parent)
        if rng.random() < 0.25:          # crossover with another good plan
            other = rng.choice(pop if pop is not None else self.population()).genome
            g = [a if rng.random() < 0.5 else b for a, b in zip(g, other)]
        for _ in range(rng.choice((1, 1, 2))):
            i = rng.randrange(len(g))
            up = [lvl for lvl in range(len(self.space.knobs[i].levels)) if self.saving[i, lvl] > self.saving[i, g[i]]]
            if up:
                g[i] = rng.choice(up)
        active = [i for i, lvl in enumerate(g) if lvl]
        if active and rng.random() < 0.5:   # the level switch: give some loss back elsewhere
            j = rng.choice(active)
            down = [lvl for lvl in range(len(self.space.knobs[j].levels)) if self.saving[j, lvl] < self.saving[j, g[j]]]
            g[j] = max(down, key=lambda lvl: self.saving[j, lvl]) if down else 0
        return tuple(g)

    def population(self) -> list[Evaluated]:
        fitting = sorted((e for e in self.evaluated.values() if self.fits(e)), key=lambda e: e.ms)
        return fitting[:POPULATION]

    def evolve(self) -> None:
        stale, attempts = 0, 0
        while True:
            self.stopped = self._stop(stale, len(self.evaluated), attempts)
            if self.stopped:
                return
            attempts += 1
            pop = self.population()
            child = self._child(self.rng, pop, self.evaluated)
            if child is None:
                continue
            if self.width > 1 and child not in self._ready:
                self._children_ahead(child, stale, attempts, pop)
            best = self.best()
            e = self.evaluate(child, "evolution")
            stale = 0 if self.fits(e) and (best is None or e.ms < best.ms * 0.999) else stale + 1

    def _stop(self, stale: int, measured: int, attempts: int) -> str:
        """Why evolution stops now ("" while it goes on)."""
        if self.out_of_time():
            return "the time budget ran out"
        if stale >= self.patience:
            return f"{self.patience} plans in a row measured nothing faster"
        if measured >= MAX_EVALUATIONS or attempts > 50 * MAX_EVALUATIONS:
            return f"{measured} plans measured, the most a search measures"
        return ""

    def _child(self, rng: random.Random, pop: list[Evaluated], seen) -> Genome | None:
        """One draw: a child worth measuring, or None (measured already, or it could not enter the population)."""
        parent = min(rng.sample(pop, min(2, len(pop))), key=lambda e: e.ms).genome
        child = self.mutate(parent, rng, pop)
        if child in seen:
            return None
        if len(pop) >= POPULATION and self.space.estimate_ms(child) >= pop[-1].ms:
            return None                        # could not enter the population: not worth a measurement
        return child

    def _children_ahead(self, first: Genome, stale: int, attempts: int, pop: list[Evaluated]) -> None:
        """`first` and the children the loop draws after it if none of them fits, computed at once."""
        rng = random.Random()
        rng.setstate(self.rng.getstate())
        seen, batch = set(self.evaluated) | {first}, [first]
        stale, measured = stale + 1, len(self.evaluated) + 1
        for _ in range(SPECULATION_TRIES):
            if len(batch) >= self.width or self._stop(stale, measured, attempts):
                break
            attempts += 1
            child = self._child(rng, pop, seen)
            if child is not None:
                batch.append(child)
                seen.add(child)
                stale, measured = stale + 1, measured + 1
        self.prefetch(batch)

    # --- the whole search ------------------------------------------------------------------------
    def run(self, measure_reserve_s: float = 0.0) -> list[Evaluated]:
        """Seeds, evolution, then the finalists (to be timed by the caller), best estimate first."""
        self.reserve_s = measure_reserve_s
        present = [f for f in ("quant", "prune", "skip") if any(k.family == f for k in self.space.knobs)]
        seeds = [{f} for f in present] + ([set(present)] if len(present) > 1 else [])
        if self.width > 1:
            self._seeds_ahead(seeds, also=[self.space.dense()])
        dense = self.evaluate(self.space.dense(), "dense")
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
