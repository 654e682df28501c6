"""Which of ONNX Runtime's own graph fusions pay off on this machine, decided by measurement.

ORT fuses patterns at session creation whether or not its fused kernel is faster. On this
project's x86-64 CI machine, SkipLayerNormalization runs ~6× slower than the Add +
LayerNormalization it replaces, so a fusion is kept only when its kernel measures faster than
the unfused ops on a transformer-sized problem; the verdicts are cached for the process."""
from __future__ import annotations

from functools import cache

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from .ort_timing import median_run_seconds

ROWS, HIDDEN = 128, 768   # one BERT-base sequence


def _model(nodes: list, inits: dict[str, np.ndarray]) -> bytes:
    used = {i for n in nodes for i in n.input}
    inits = {k: v for k, v in inits.items() if k in used}
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [ROWS, HIDDEN]) for n in ("x", "s")]
    graph = helper.make_graph(nodes, "probe", io, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=8)
    return model.SerializeToString()


def _median_us(model: bytes, feeds: dict) -> float:
    return median_run_seconds(model, feeds, optimize=False, calls=100, rounds=5, warmup=20) * 1e6


def _probes() -> dict[str, tuple[bytes, bytes]]:
    rng = np.random.default_rng(0)
    vec = {n: rng.standard_normal(HIDDEN).astype(np.float32) for n in ("g", "b")}
    skip_ln = _model([helper.make_node("SkipLayerNormalization", ["x", "s", "g", "b"], ["y"], domain="com.microsoft",
                                       epsilon=1e-12)], vec)
    add_ln = _model([helper.make_node("Add", ["x", "s"], ["a"]),
                     helper.make_node("LayerNormalization", ["a", "g", "b"], ["y"], epsilon=1e-12)], vec)
    bias_gelu = _model([helper.make_node("Add", ["x", "s"], ["a"]),
                        helper.make_node("BiasGelu", ["a", "b"], ["y"], domain="com.microsoft")], vec)
    add_gelu = _model([helper.make_node("Add", ["x", "s"], ["a"]), helper.make_node("Add", ["a", "b"], ["c"]),
                       helper.make_node("Gelu", ["c"], ["y"], domain="com.microsoft")], vec)
    return {"SkipLayerNormFusion": (skip_ln, add_ln), "BiasGeluFusion": (bias_gelu, add_gelu)}


@cache
def slow_fusions(margin: float = 1.1) -> tuple[tuple[str, float, float], ...]:
    """(ORT optimizer name, fused µs, unfused µs) for each fusion whose kernel is slower here."""
    rng = np.random.default_rng(1)
    feeds = {n: rng.standard_normal((ROWS, HIDDEN)).astype(np.float32) for n in ("x", "s")}
    slow = []
    for name, (fused, unfused) in _probes().items():
        t_fused, t_unfused = _median_us(fused, feeds), _median_us(unfused, feeds)
        if t_fused > margin * t_unfused:
            slow.append((name, t_fused, t_unfused))
    return tuple(slow)


@cache
def slow_int8_fusions(margin: float = 1.1) -> tuple[tuple[str, float, float], ...]:
    """The same verdict for fusions that change how ORT runs int8 (QDQ) matmuls: MatMulAddFusion turns
    DQ → MatMul → Add on 3-D activations into QGemm between two Reshapes; without it ORT runs
    MatMulIntegerToFloat. Timed on a BERT-sized QDQ linear, with and without the fusion."""
    rng = np.random.default_rng(2)
    w = rng.integers(-127, 128, (HIDDEN, HIDDEN)).astype(np.int8)
    inits = [numpy_helper.from_array(v, k) for k, v in {
        "xs": np.array(0.02, np.float32), "xz": np.array(128, np.uint8), "w": w,
        "ws": np.full(HIDDEN, 0.01, np.float32), "wz": np.zeros(HIDDEN, np.int8),
        "b": rng.standard_normal(HIDDEN).astype(np.float32)}.items()]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, ROWS, HIDDEN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()
    feeds = {"x": rng.standard_normal((1, ROWS, HIDDEN)).astype(np.float32)}
    fused, unfused = (median_run_seconds(model, feeds, calls=50, rounds=5, warmup=5, disabled=d) * 1e6
                      for d in ((), ("MatMulAddFusion",)))
    return (("MatMulAddFusion", fused, unfused),) if fused > margin * unfused else ()
