"""Probe graphs: the small ONNX models the cost model times to decide a rewrite.

Each is one problem at a representative size (a BERT-base sequence, a ResNet conv shape), built
directly in ONNX so what is timed is exactly the kernel ORT will choose."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

ROWS, HIDDEN = 128, 768   # one BERT-base sequence
SHIFT = -1   # the int8 GEMM path's weight zero point: q − 1 stays in int8 for |q| ≤ 127


def _model(nodes: list, inits: dict[str, np.ndarray]) -> bytes:
    used = {i for n in nodes for i in n.input}
    inits = {k: v for k, v in inits.items() if k in used}
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [ROWS, HIDDEN]) for n in ("x", "s")]
    graph = helper.make_graph(nodes, "probe", io, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=8)
    return model.SerializeToString()


# ORT optimizer name → the ops (any one) whose presence lets it fuse: BiasGelu fuses an Add into a Gelu, which ORT's
# GeluFusion makes of an Erf pattern first
FUSED_OPS = {"SkipLayerNormFusion": frozenset({"LayerNormalization", "SimplifiedLayerNormalization"}),
             "BiasGeluFusion": frozenset({"Gelu", "Erf", "FastGelu"})}


def fusion_pairs() -> dict[str, tuple[bytes, bytes]]:
    """ORT optimizer name → (its fused kernel, the ops it replaces), on a BERT-base-sized problem."""
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


def same_conv(conv, x: np.ndarray) -> tuple[bytes, dict]:
    """A torch Conv1d/Conv2d with padding="same" (stride and dilation 1) as one ONNX Conv, and its feeds: the
    direct-conv rate probes are what ORT runs for a Conv node, so no exporter is needed to build them (each
    torch.onnx export of a probe cost ~0.7 s)."""
    kernel = list(conv.weight.shape[2:])
    pads = [(k - 1) // 2 for k in kernel] + [k - 1 - (k - 1) // 2 for k in kernel]     # torch's "same": more after
    w = numpy_helper.from_array(conv.weight.detach().numpy(), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=conv.groups, pads=pads, kernel_shape=kernel)
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()
    return model, {"x": x}


def fft_op(op, args: tuple, x: np.ndarray) -> tuple[bytes, dict]:
    """graphopt's fft_conv1d or fft_conv2d with constant arguments (the spectrum first) as one ONNX model, written from
    the op's own lowering as plain nodes (ops/fft_conv.ProtoOps), and its feeds: no exporter to build it."""
    import torch
    from ..ops.fft_conv import ProtoOps, monarch_conv
    from ..ops.fft_conv2d import dft2_conv
    lowering = {torch.ops.graphopt.fft_conv1d: monarch_conv, torch.ops.graphopt.fft_conv2d: dft2_conv}[op]
    ops = ProtoOps()
    spec, *rest = args
    y = lowering(ops, "x", ops.const(spec.numpy()), *rest)
    graph = helper.make_graph(ops.nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)], ops.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8).SerializeToString()
    return model, {"x": x}


def qdq_linear() -> tuple[bytes, dict]:
    """A BERT-sized QDQ linear (DQ → MatMul → Add on 3-D activations) and its feeds: with ORT's
    MatMulAddFusion it runs as QGemm between two Reshapes, without it as MatMulIntegerToFloat."""
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
    return model, {"x": rng.standard_normal((1, ROWS, HIDDEN)).astype(np.float32)}


def qdq_conv(shape, c_out, kh, kw, stride, padding, dilation, groups, w_zp: int, w_max: int = 127,
             output_scale: float = 0.05) -> bytes:
    """One QDQ conv + ReLU as ORT's QLinearConv sees it, its weights given zero point `w_zp`."""
    c_in = shape[1]
    rng = np.random.default_rng(1)
    w = rng.integers(-w_max, w_max + 1, (c_out, c_in // groups, kh, kw)).astype(np.int16) + w_zp
    inits = [numpy_helper.from_array(v, k) for k, v in {
        "xs": np.array(0.02, np.float32), "xz": np.array(128, np.uint8), "w": w.astype(np.int8),
        "ws": np.full(c_out, 0.01, np.float32), "wz": np.full(c_out, w_zp, np.int8), "b": np.zeros(c_out, np.int32),
        "bs": np.full(c_out, 0.0002, np.float32), "bz": np.zeros(c_out, np.int32),
        "ys": np.array(output_scale, np.float32), "yz": np.array(0, np.uint8)}.items()]
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
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return model.SerializeToString()


# --- sparsity: a linear as dense, as graphopt's block-sparse op, and as ORT's sparse matmul ------------
def sparse_linear_modules(rows: int, in_f: int, out_f: int, k: int, block: tuple[int, int]):
    """(dense module, block-sparse module, input) for one linear [out_f, in_f] keeping `k` blocks per block
    row, at random columns (the time depends on the shapes only), applied to [1, rows, in_f]."""
    import torch
    from ..ops.sparse import pack_bsr
    g = torch.Generator().manual_seed(0)
    bh, bw = block
    mask = torch.zeros(out_f // bh, in_f // bw, dtype=torch.bool)
    for r in range(mask.shape[0]):
        mask[r, torch.randperm(mask.shape[1], generator=g)[:k]] = True
    w = torch.randn(out_f, in_f, generator=g) * mask.repeat_interleave(bh, 0).repeat_interleave(bw, 1)
    b = torch.randn(out_f, generator=g)
    blocks, cols, _ = pack_bsr(w, block)

    class Dense(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.linear(x, w, b)

    class Sparse(torch.nn.Module):
        def forward(self, x):
            return torch.ops.graphopt.bsr_linear(x, blocks, cols, b, in_f, bw)
    return Dense(), Sparse(), torch.randn(1, rows, in_f, generator=g)


def sparse_to_dense_matmul(rows: int, in_f: int, out_f: int, n: int, m: int) -> tuple[bytes, bytes, dict]:
    """(dense MatMul, ORT's com.microsoft.SparseToDenseMatMul on an N:M weight kept as a sparse initializer,
    feeds): y = x·Wᵀ for x [rows, in_f]."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    w.reshape(out_f, -1, m)[..., n:] = 0
    x = rng.standard_normal((rows, in_f)).astype(np.float32)
    io = ([helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, in_f])],
          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    dense = helper.make_graph([helper.make_node("MatMul", ["x", "wt"], ["y"])], "dense", *io,
                              [numpy_helper.from_array(np.ascontiguousarray(w.T), "wt")])
    nz = np.flatnonzero(w)
    sp = helper.make_sparse_tensor(numpy_helper.from_array(w.reshape(-1)[nz], "w"),
                                   numpy_helper.from_array(nz.astype(np.int64), "w_idx"), [out_f, in_f])
    sparse = helper.make_graph([helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0]),
                                helper.make_node("SparseToDenseMatMul", ["w", "xt"], ["yt"], domain="com.microsoft"),
                                helper.make_node("Transpose", ["yt"], ["y"], perm=[1, 0])], "sparse", *io,
                               sparse_initializer=[sp])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return (helper.make_model(dense, opset_imports=opsets, ir_version=8).SerializeToString(),
            helper.make_model(sparse, opset_imports=opsets, ir_version=8).SerializeToString(), {"x": x})
