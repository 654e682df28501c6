"""The systems graphopt is measured against in the benchmarks (eager, torch.compile, plain ONNX
Runtime), and the table they print. The clock is graphopt.cost.clock, the one every measured
decision uses too; ratios are what to read, absolute milliseconds on a shared machine are noise."""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Callable

import onnx
import torch

from .cost.clock import time_side_by_side, time_single_calls  # noqa: F401  (the benchmarks' clock)
from .numerics import flat_tensors
from .quiet import quiet
from .sessions import ort_session


def eager(model: torch.nn.Module) -> Callable:
    def run(*args):
        with torch.inference_mode():
            return model(*args)
    return run


def torch_compiled(model: torch.nn.Module) -> Callable:
    """torch.compile at its documented best for CPU inference: inductor with freezing (weights folded in as
    constants, so it can pre-pack them and fold conv + batch norm), called under inference mode."""
    compiled = torch.compile(model, options={"freezing": True})
    return eager(compiled)


def plain_ort(model: torch.nn.Module, args: tuple) -> Callable:
    """The baseline: torch.onnx's own export of the model, run by ONNX Runtime with default options."""
    with quiet(stdout=True):
        program = torch.onnx.export(model, args, dynamo=True, verbose=False)
    return ort_runner(program.model_proto.SerializeToString())


def ort_runner(model: bytes | str, threads: int | None = None) -> Callable:
    """An ONNX model (bytes or a path) in an ONNX Runtime session with default options but graphopt's one
    setting (workers stop spinning when a run returns, so no system is slowed by another's threads), called like the
    model: torch tensors in (in the model's input order), numpy arrays out. `threads`: ORT's intra-op workers
    (default one per core; one sample of a small model can run faster on one, without the hand-offs)."""
    session = ort_session(model, threads=threads)
    names = [i.name for i in session.get_inputs()]

    def run(*inputs):
        return session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})
    return run


def main_output(out) -> torch.Tensor:
    """The first output tensor of any system: ONNX Runtime's runners return a list of numpy arrays, the others
    tensors or (nested) model outputs, whose first leaf is the last hidden state or the logits."""
    tensors = flat_tensors(out)
    return tensors[0] if tensors else torch.as_tensor(out[0])


def format_table(title: str, ms: dict[str, float], subject: str = "graphopt") -> list[str]:
    """One line per system: median ms and the subject's speedup over it (>1: subject is faster)."""
    lines = [title]
    for name, t in ms.items():
        ratio = "" if name == subject else f"   {subject} speedup ×{t / ms[subject]:.2f}"
        lines.append(f"  {name:<16} {t:9.2f} ms{ratio}")
    return lines


@dataclass
class NodeTime:
    """One node of a graph as ONNX Runtime optimized it here: milliseconds per run in its kernel, and for an int8
    conv or matmul its multiply-accumulates per run and its kind (depthwise, 1×1, k×k conv; matmul)."""
    name: str
    op: str
    ms: float
    macs: int = 0
    kind: str = ""


# int8 ops that multiply-accumulate: the input index of their constant weight
INT8_MAC_OPS = {"QLinearConv": 3, "DynamicQuantizeMatMul": 1, "MatMulIntegerToFloat": 1, "MatMulInteger": 1,
                "QLinearMatMul": 3}


def node_profile(model: bytes, feeds: dict, disabled: tuple[str, ...] = (), runs: int = 30) -> list[NodeTime]:
    """Each kernel of an ONNX model as ONNX Runtime optimizes and runs it here (its profiler's node events over `runs`
    runs after 5 warm-up runs), with the work of its int8 convs and matmuls read off the optimized graph: where two
    graphs of the same model differ in time this says which kernels, and their MAC rate says how near each kernel
    runs to what the machine's int8 units can do."""
    with tempfile.TemporaryDirectory() as tmp:
        session = ort_session(model, disabled=disabled, save_optimized=os.path.join(tmp, "optimized.onnx"),
                              profile_prefix=os.path.join(tmp, "profile"))
        for _ in range(5 + runs):
            session.run(None, feeds)
        with open(session.end_profiling()) as f:
            events = json.load(f)
        optimized = onnx.load(os.path.join(tmp, "optimized.onnx"))
    # the runs after the 5 warm-up ones: node events from the 6th model_run's start on
    start = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")[5]
    nodes: dict[str, NodeTime] = {}
    outputs: dict[str, list[int]] = {}
    for e in events:
        if e["ts"] >= start and e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            name = e["name"].removesuffix("_kernel_time")
            node = nodes.setdefault(name, NodeTime(name, e["args"].get("op_name", "?"), 0.0))
            node.ms += e["dur"] / 1e3 / runs
            outputs[name] = next(iter(e["args"]["output_type_shape"][0].values()), [])
    weights = {i.name: list(i.dims) for i in optimized.graph.initializer}
    for n in optimized.graph.node:
        if n.name in nodes and n.op_type in INT8_MAC_OPS and n.input[INT8_MAC_OPS[n.op_type]] in weights:
            w, out = weights[n.input[INT8_MAC_OPS[n.op_type]]], outputs[n.name]
            if n.op_type == "QLinearConv":   # weight (out channels, in channels / group, kh, kw)
                nodes[n.name].macs = math.prod(out) * math.prod(w[1:])
                group = next((a.i for a in n.attribute if a.name == "group"), 1)
                nodes[n.name].kind = ("depthwise conv" if group > 1 and w[1] == 1 else
                                      "1×1 conv" if math.prod(w[2:]) == 1 else "k×k conv")
            else:                            # weight (K, N)
                nodes[n.name].macs, nodes[n.name].kind = math.prod(out) * w[0], "matmul"
    return list(nodes.values())
