"""Median run time of an ONNX model in ONNX Runtime on the CPU: the one clock behind graphopt's
measured decisions (which ORT fusions to keep, the FFT-conv cost model's rates)."""
from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort


def median_run_seconds(model: bytes, feeds: dict, *, optimize: bool = True, calls: int = 20, rounds: int = 3,
                       warmup: int = 1, disabled: tuple[str, ...] = ()) -> float:
    """Seconds per `run`, median over `rounds` of `calls` runs; `optimize=False` times the kernels as written,
    `disabled` names ORT optimizers to leave out."""
    opts = ort.SessionOptions()
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled))
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            sess.run(None, feeds)
        times.append((time.perf_counter() - t0) / calls)
    return float(np.median(times))
