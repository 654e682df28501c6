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
