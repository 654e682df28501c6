"""Which int8 conv kernel ONNX Runtime should run, decided by measurement on this machine.

ORT's QLinearConv takes one of two MLAS paths on x86: a "symmetric" conv kernel when the weight
zero point is 0, or im2col + the int8 GEMM (which has AMX kernels) otherwise. Which is faster
depends on the shape: on this Sapphire Rapids machine the GEMM path wins on most of ResNet-50's
convs (3×3: 200 → 140 µs) and loses on a few. The same int8 weights can be given either way — q with
zero point 0, or q − 1 with zero point −1 are the same numbers — so per conv shape graphopt times
one QDQ conv both ways (once per shape and process) and keeps the faster encoding."""
from __future__ import annotations

from functools import cache

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from ..backends.ort_timing import median_run_seconds

SHIFT = -1   # the GEMM path's weight zero point: q − 1 stays in int8 for |q| ≤ 127


@cache
def gemm_path_faster(n: int, c_in: int, h: int, w: int, c_out: int, kh: int, kw: int, stride: tuple, padding: tuple,
                     dilation: tuple, groups: int) -> bool:
    """True when this conv runs faster in ORT with a nonzero weight zero point (im2col + QGEMM)."""
    x = np.random.default_rng(0).standard_normal((n, c_in, h, w)).astype(np.float32)
    times = {zp: median_run_seconds(_qdq_conv(x.shape, c_out, kh, kw, stride, padding, dilation, groups, zp),
                                    {"x": x}, calls=10, rounds=3) for zp in (0, SHIFT)}
    return times[SHIFT] < 0.95 * times[0]


def _qdq_conv(shape, c_out, kh, kw, stride, padding, dilation, groups, w_zp: int) -> bytes:
    c_in = shape[1]
    rng = np.random.default_rng(1)
    w = rng.integers(-127, 128, (c_out, c_in // groups, kh, kw)).astype(np.int16) + w_zp
    inits = [numpy_helper.from_array(v, k) for k, v in {
        "xs": np.array(0.02, np.float32), "xz": np.array(128, np.uint8), "w": w.astype(np.int8),
        "ws": np.full(c_out, 0.01, np.float32), "wz": np.full(c_out, w_zp, np.int8), "b": np.zeros(c_out, np.int32),
        "bs": np.full(c_out, 0.0002, np.float32), "bz": np.zeros(c_out, np.int32),
        "ys": np.array(0.05, np.float32), "yz": np.array(0, np.uint8)}.items()]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("DequantizeLinear", ["b", "bs", "bz"], ["bd"], axis=0),
             helper.make_node("Conv", ["xd", "wd", "bd"], ["c"], strides=list(stride), dilations=list(dilation),
                              pads=[padding[0], padding[1], padding[0], padding[1]], group=groups),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("QuantizeLinear", ["r", "ys", "yz"], ["y"])]
    graph = helper.make_graph(nodes, "qconv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    return model.SerializeToString()
