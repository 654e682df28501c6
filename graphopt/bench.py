"""Side-by-side timing in one process: the systems graphopt is measured against, and a fair clock.

Systems are timed in interleaved rounds (A B C, B C A, C A B, …: each takes every position equally
often) after a warm-up, and each figure is the median over rounds, so drift in machine load and
the previous system's spinning threads hit every system alike; ratios are what to
read, absolute milliseconds on a shared machine are noise."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import onnxruntime as ort
import torch

from .quiet import quiet


def eager(model: torch.nn.Module) -> Callable:
    def run(*args):
        with torch.inference_mode():
            return model(*args)
    return run


def torch_compiled(model: torch.nn.Module) -> Callable:
    compiled = torch.compile(model)
    return eager(compiled)


def plain_ort(model: torch.nn.Module, args: tuple) -> Callable:
    """The baseline: torch.onnx's own export of the model, run by ONNX Runtime with default options."""
    with quiet(stdout=True):
        program = torch.onnx.export(model, args, dynamo=True, verbose=False)
    return ort_runner(program.model_proto.SerializeToString())


def ort_runner(model: bytes | str) -> Callable:
    """An ONNX model (bytes or a path) in an ONNX Runtime session with default options, called like the
    model: torch tensors in (in the model's input order), numpy arrays out."""
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(*inputs):
        return session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})
    return run


def time_side_by_side(systems: dict[str, Callable], args: tuple, rounds: int = 15, min_round_s: float = 0.2,
                      warmup: int = 3, settle_s: float = 0.05) -> dict[str, float]:
    """Median milliseconds per call of each system on the same inputs."""
    for fn in systems.values():
        for _ in range(warmup):
            fn(*args)
    calls = {}
    for name, fn in systems.items():   # calls per round so each round lasts about min_round_s
        t0 = time.perf_counter()
        fn(*args)
        calls[name] = max(1, int(min_round_s / max(time.perf_counter() - t0, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in systems}
    names = list(systems)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:   # rotate: no system always goes first
            fn = systems[name]
            time.sleep(settle_s)   # let the previous system's spinning worker threads go idle
            t0 = time.perf_counter()
            for _ in range(calls[name]):
                fn(*args)
            samples[name].append((time.perf_counter() - t0) / calls[name] * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


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


def format_table(title: str, ms: dict[str, float], subject: str = "graphopt") -> list[str]:
    """One line per system: median ms and the subject's speedup over it (>1: subject is faster)."""
    lines = [title]
    for name, t in ms.items():
        ratio = "" if name == subject else f"   {subject} speedup ×{t / ms[subject]:.2f}"
        lines.append(f"  {name:<16} {t:9.2f} ms{ratio}")
    return lines
