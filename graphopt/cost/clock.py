"""The one clock behind every measured decision and benchmark.

`median_run_seconds` times an ONNX model in an ONNX Runtime session on the providers it is given
(the cost model passes the target's); `time_side_by_side` times callables in interleaved rounds
ordered by a Williams design (each system takes every position equally often and follows every
other system equally often) after a warm-up, each figure the median over rounds, so drift in
machine load and the previous system's spinning threads hit every system alike; a decision's clock
stops as soon as more rounds could not change the decision (`Apart`, `Decided`)."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..sessions import ort_session


def median_run_seconds(model: bytes, feeds: dict, *, providers: tuple[str, ...] = ("CPUExecutionProvider",),
                       optimize: bool = True, calls: int = 20, rounds: int = 3, warmup: int = 1,
                       disabled: tuple[str, ...] = (), round_s: float | None = None) -> float:
    """Seconds per `run`, median over `rounds` of `calls` runs (or, given `round_s`, as many as take about that long:
    a 16 ms rate probe ran 61 times, 1 s, at 20 a round); `optimize=False` times the kernels as written, `disabled`
    names ORT optimizers to leave out."""
    sess = ort_session(model, providers, optimize=optimize, disabled=disabled)
    for _ in range(warmup):
        sess.run(None, feeds)
    if round_s is not None:
        calls = max(1, min(calls, int(round_s / _seconds_per_call(lambda: sess.run(None, feeds), (), round_s / 4))))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            sess.run(None, feeds)
        times.append((time.perf_counter() - t0) / calls)
    return float(np.median(times))


def time_side_by_side(systems: dict[str, Callable], args: tuple, rounds: int = 15, min_round_s: float = 0.2,
                      warmup: int = 3, settle_s: float = 0.05,
                      stop: Callable[[dict[str, list[float]]], bool] | None = None) -> dict[str, float]:
    """Median milliseconds per call of each system on the same inputs. `stop` (a decision's clock, not a
    benchmark's: `Apart` or `Decided`) ends the rounds after any whole repetition of the design past the first
    once it holds of the samples so far, since more rounds would not change the decision (ResNet's conv epilogues:
    1.3× apart after 4 of 8 rounds)."""
    for fn in systems.values():
        for _ in range(warmup):
            fn(*args)
    calls = {}
    for name, fn in systems.items():   # calls per round so each round lasts about min_round_s
        calls[name] = max(1, int(min_round_s / _seconds_per_call(fn, args, min_round_s / 2)))
    samples: dict[str, list[float]] = {name: [] for name in systems}
    names = list(systems)
    orders = balanced_orders(len(names))
    for r in range(-(-rounds // len(orders)) * len(orders)):   # whole repetitions of the design
        if stop is not None and r >= 2 * len(orders) and r % len(orders) == 0 and stop(samples):
            break
        for name in (names[i] for i in orders[r % len(orders)]):
            fn = systems[name]
            time.sleep(settle_s)   # let the previous system's spinning worker threads go idle
            t0 = time.perf_counter()
            for _ in range(calls[name]):
                fn(*args)
            samples[name].append((time.perf_counter() - t0) / calls[name] * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


@dataclass(frozen=True)
class Apart:
    """Stop once every two systems' samples lie in disjoint ranges with medians more than `factor`× apart: which is
    faster is settled, whatever margin the decision then applies up to `factor`."""
    factor: float

    def __call__(self, samples: dict[str, list[float]]) -> bool:
        ranked = sorted(samples.values(), key=statistics.median)
        return all(max(a) < min(b) and statistics.median(b) > self.factor * statistics.median(a)
                   for a, b in zip(ranked, ranked[1:]))


@dataclass(frozen=True)
class Decided:
    """Stop once a two-way decision — `first` is kept where it runs under `margin` × `second` — reads the same from
    every pair of samples, each system's slowest left out: a decision near its margin runs every round, one far from
    it stops early even when the systems are near-equal (MobileNetV2's conv epilogues, 0.49 vs 0.47 ms against a 0.97
    margin), and one slow round (another process's burst: 0.8 ms among MobileNetV2's 0.45 ms) does not keep it going."""
    first: str
    second: str
    margin: float = 1.0

    def __call__(self, samples: dict[str, list[float]]) -> bool:
        a, b = _but_slowest(samples[self.first]), _but_slowest(samples[self.second])
        return max(a) < self.margin * min(b) or min(a) > self.margin * max(b)

    def keeps_first(self, ms: dict[str, float]) -> bool:
        """The decision on the timings the clock returned: `first` runs under `margin` × `second`."""
        return ms[self.first] < self.margin * ms[self.second]


def _but_slowest(samples: list[float]) -> list[float]:
    return sorted(samples)[:-1] if len(samples) >= 4 else samples


def balanced_orders(n: int) -> list[list[int]]:
    """Orders of n systems, one per round, where each system is in every position equally often and directly
    follows every other system equally often (a Williams Latin square: n rows for even n, 2n for odd n). A
    cyclic rotation (A B C, B C A, C A B) balances positions only: B always follows A, so A's spinning
    threads always slow B."""
    first = [0] + [(k + 1) // 2 if k % 2 else n - k // 2 for k in range(1, n)]
    rows = [[(v + r) % n for v in first] for r in range(n)]
    return rows + [row[::-1] for row in rows] if n % 2 and n > 1 else rows


def _seconds_per_call(fn: Callable, args: tuple, at_least_s: float) -> float:
    """Seconds per call over a loop of at least `at_least_s`. One call is no estimate: the first call after
    another system ran can take 100× longer (ONNX Runtime's spinning workers then own the cores), and a
    round sized from it was 10 calls where it should be 300, which made eager torch.fft 8.4 ms instead of 0.5."""
    n, t0 = 0, time.perf_counter()
    while n == 0 or time.perf_counter() - t0 < at_least_s:
        fn(*args)
        n += 1
    return (time.perf_counter() - t0) / n


def time_single_calls(fn: Callable, args: tuple, calls: int = 3) -> float:
    """Median ms of a few whole calls, after one warm-up: for systems too slow for interleaved rounds
    (ONNX Runtime is still planning its memory on a session's second run: 1.4 s against 0.22 s after)."""
    fn(*args)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn(*args)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
