"""The systems graphopt is measured against in the benchmarks (eager, torch.compile, plain ONNX
Runtime), and the table they print. The clock is graphopt.cost.clock, the one every measured
decision uses too; ratios are what to read, absolute milliseconds on a shared machine are noise."""
from __future__ import annotations

from typing import Callable

import onnxruntime as ort
import torch

from .cost.clock import time_side_by_side, time_single_calls  # noqa: F401  (the benchmarks' clock)
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


def format_table(title: str, ms: dict[str, float], subject: str = "graphopt") -> list[str]:
    """One line per system: median ms and the subject's speedup over it (>1: subject is faster)."""
    lines = [title]
    for name, t in ms.items():
        ratio = "" if name == subject else f"   {subject} speedup ×{t / ms[subject]:.2f}"
        lines.append(f"  {name:<16} {t:9.2f} ms{ratio}")
    return lines


def kernel_profile(model: bytes, feeds: dict, disabled: tuple[str, ...] = (), runs: int = 30) -> dict[str, float]:
    """Milliseconds per run spent in each kernel type of an ONNX model as ONNX Runtime optimizes and runs it here
    (its profiler's node events, summed by op type, over `runs` runs after 5 warm-up runs): where two graphs of the same
    model differ in time, this says which kernels."""
    import json
    import os
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "profile")
        options.log_severity_level = 3
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"],
                                       disabled_optimizers=list(disabled))
        for _ in range(5 + runs):
            session.run(None, feeds)
        with open(session.end_profiling()) as f:
            events = json.load(f)
    # the runs after the 5 warm-up ones: node events from the 6th model_run's start on
    start = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")[5]
    events = [e for e in events if e["ts"] >= start]
    by_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e["args"].get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + e["dur"] / 1e3 / runs
    return dict(sorted(by_op.items(), key=lambda kv: -kv[1]))
