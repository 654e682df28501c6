"""An ONNX model's weights kept outside its ModelProto, from lowering to ONNX Runtime's session.

Every lowered model's initializers of ≥ `TENSOR_BYTES` are ONNX external data (`data_location = EXTERNAL`,
`location` = `DATA_LOCATION`) whose arrays, numpy views of the IR graph's own weights, go into a dict beside a small
ModelProto. ONNX Runtime copies them in once through `SessionOptions.add_external_initializers` (graphopt/sessions.py);
nothing serializes them, and no transposed copy is made (`optimize`: a linear's weight stays [out, in], read by
FusedMatMul with transB). In the proto, BERT-base's compile held the weights five times over at its peak (the user's,
the folded transposes, the proto, its bytes, ORT's parse and packing: 2.56 GB for 0.41 GB); outside it, three.

What the user gets (`artifact`, export_onnx, bundles) is one self-contained ModelProto, built when asked, up to
`EXTERNAL_BYTES`; past it (protobuf cannot serialize past 2 GB: "EncodeError: Failed to serialize proto") the small
proto and the arrays, written as `NAME.onnx` plus `NAME.onnx.data` beside it (onnx's external data layout, one
tensor in memory at a time, offsets aligned for ORT to map them), both written atomically (`save_onnx`)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import save_external_data, set_external_data, uses_external_data

from ..artifacts import checked_path, write_atomically
from ..errors import GraphoptError, InputError, UnsupportedError

# total initializer bytes from which a model's artifact keeps its weights outside its proto (protobuf's limit is
# 2 GiB for the whole message; the graph itself needs room). Tests lower it to send small models down that path.
EXTERNAL_BYTES = 2 ** 31 - 2 ** 28
TENSOR_BYTES = 1024          # initializers of at least this many bytes go to the data file (onnx's own default)
DATA_LOCATION = "weights.data"   # the location in memory; a written file names its own data file
ALIGN = 4096                 # data file offsets, so ONNX Runtime can map the tensors instead of reading them


@dataclass(frozen=True)
class WeightedModel:
    """An ONNX model for `ort_session` whose initializers named in `weights` are external data held in memory."""
    proto: bytes
    weights: dict[str, np.ndarray] = field(repr=False)


def check_one_proto(nbytes: int) -> None:
    """A GraphoptError, before any work, for a caller that needs the whole model in one protobuf (no `weights`
    dict to keep them outside) when its `nbytes` of weights are past what one can hold."""
    if nbytes >= EXTERNAL_BYTES:
        raise UnsupportedError(f"the model's weights are {nbytes / 2 ** 30:.2f} GB, past what this step can hold in "
                               "one ONNX protobuf (2 GB): it does not take external data yet")


def kept_outside(weights: dict[str, np.ndarray]) -> bool:
    """Whether a model's artifact keeps these `weights` outside its proto (past EXTERNAL_BYTES), rather than in it."""
    return sum(a.nbytes for a in weights.values()) >= EXTERNAL_BYTES


def graph_bytes(graph) -> int:
    """Bytes of an IR graph's parameters and buffers (each storage once)."""
    seen = {}
    for t in list(graph.module.parameters()) + list(graph.module.buffers()):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def ir_bytes(ir_model) -> int:
    return sum(v.const_value.nbytes for v in ir_model.graph.initializers.values() if v.const_value is not None)


def optimize(ir_model) -> None:
    """torch.onnx's optimization (onnxscript's optimizer, then its ONNX fusions) without folding a Transpose of a
    weight, then each MatMul by a transposed weight as FusedMatMul(x, w, transB=1): folded, each linear's weight
    would be copied transposed (0.75 of a Llama's weights, held beside the model's own, and ORT packs it again).
    FusedMatMul packs the [out, in] weight as MatMul packs the transposed one, and measured as fast here: a
    2048×5504 linear at 1 / 4 / 128 rows 3.7 / 3.8 / 25.5 ms against 3.8 / 4.1 / 25.5 ms, BERT-base 205 vs 233 ms."""
    import onnxscript
    import onnxscript.rewriter.onnx_fusions
    from onnxscript.rewriter import pattern, rewrite

    def should_fold(node):
        if node.op_type == "Transpose" and node.domain == "" and any(
                v is not None and v.const_value is not None and v.const_value.nbytes >= TENSOR_BYTES
                for v in node.inputs):
            return False
        return None
    onnxscript.optimizer.optimize_ir(ir_model, should_fold=should_fold)
    onnxscript.rewriter.onnx_fusions.fuse(ir_model)
    rewrite(ir_model, pattern_rewrite_rules=[pattern.RewriteRule(_matmul_transposed, _fused_matmul,
                                                                 _weight_last_two_swapped)])
    if any(n.op_type == "FusedMatMul" for n in ir_model.graph):
        ir_model.opset_imports.setdefault("com.microsoft", 1)


def _matmul_transposed(op, x, w, perm):
    return op.MatMul(x, op.Transpose(w, perm=perm))


def _fused_matmul(op, x, w, perm):
    return op.FusedMatMul(x, w, transB=1, _domain="com.microsoft")


def _weight_last_two_swapped(context, x, w, perm, **_):
    """`w` a weight whose Transpose swaps only its last two axes, read by a MatMul whose `x` has at least 2."""
    order = list(perm.value)
    return (w.const_value is not None and x.shape is not None and len(x.shape) >= 2 and len(order) >= 2 and
            order == list(range(len(order) - 2)) + [len(order) - 1, len(order) - 2])


def split_weights(ir_model, weights: dict[str, np.ndarray]) -> None:
    """The exported `ir_model`'s (onnx_ir) initializers of ≥ TENSOR_BYTES become external references in place, their
    arrays (views of the exported tensors, not copies) go into `weights`."""
    import onnx_ir as ir
    for value in ir_model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or tensor.nbytes < TENSOR_BYTES:
            continue
        array = tensor.numpy()
        weights[value.name] = array if array.flags.c_contiguous else np.ascontiguousarray(array)
        value.const_value = ir.ExternalTensor(DATA_LOCATION, None, tensor.nbytes, tensor.dtype, shape=tensor.shape,
                                              name=value.name)


def check_model(model: onnx.ModelProto) -> bytes | None:
    """onnx.checker on `model`, and the bytes it checked where the model has no external data (serialized once here:
    ORT's session takes the same bytes; serializing BERT-base's 435 MB takes 2.4 s). External initializers (whose
    data is in memory, not in a file the checker could open) are checked as graph inputs of their type and shape,
    the rest of the model as it is; then None."""
    external = [t for t in model.graph.initializer if uses_external_data(t)]
    if not external:
        serialized = model.SerializeToString()
        onnx.checker.check_model(serialized)
        return serialized
    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    kept = [t for t in proto.graph.initializer if not uses_external_data(t)]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    proto.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in external)
    onnx.checker.check_model(proto)
    return None


def session_source(model: onnx.ModelProto, weights: dict[str, np.ndarray] | None) -> bytes | WeightedModel:
    """What `ort_session` takes for `model`: its bytes, with the external weights beside them where it has some."""
    return WeightedModel(model.SerializeToString(), weights) if weights else model.SerializeToString()


def checked_source(model: onnx.ModelProto, weights: dict[str, np.ndarray] | None) -> bytes | WeightedModel:
    """`model` through onnx.checker, and what `ort_session` takes for it (the bytes checked, where it has no external
    weights)."""
    checked = check_model(model)
    return checked if checked is not None else session_source(model, weights)


def inline(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A self-contained copy of `model`, its external initializers' bytes (from `weights`) put back in."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    for tensor in proto.graph.initializer:
        if uses_external_data(tensor):
            _put_back(tensor, weights[tensor.name])
    return proto


def _put_back(tensor: onnx.TensorProto, array: np.ndarray) -> None:
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT
    tensor.raw_data = np.ascontiguousarray(array).tobytes()


def write_inlined(model: onnx.ModelProto, weights: dict[str, np.ndarray], path: Path) -> None:
    """`model` as one self-contained file, its external initializers' bytes (from `weights`) in it, with one tensor
    in memory at a time: protobuf merges concatenated messages (a repeated field appends), so the model without
    them is written first, then each as a ModelProto of its own whose graph holds only it (BERT-base's export_onnx:
    +0.17 GB over the compiled module, against +0.44 GB for `inline` and its bytes)."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    outside = [t for t in proto.graph.initializer if uses_external_data(t)]
    kept = [t for t in proto.graph.initializer if not uses_external_data(t)]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
        for tensor in outside:
            one = onnx.ModelProto()
            held = one.graph.initializer.add()
            held.CopyFrom(tensor)
            _put_back(held, weights[tensor.name])
            f.write(one.SerializeToString())
            del one, held


def weights_of(executable) -> dict[str, np.ndarray]:
    """The weights an executable's artifact keeps outside its ONNX model (empty: the artifact is self-contained)."""
    lowered = _lowered(executable)
    return lowered.weights if getattr(lowered, "weights_outside", False) else {}


def _lowered(executable):
    """The executable that holds the ONNX model: backend="auto" on arm64 keeps both (`ort`); "chosen" delegates."""
    return getattr(executable, "ort", executable)


def data_name(onnx_name: str) -> str:
    return onnx_name + ".data"


def onnx_parts(executable) -> tuple[object, dict[str, np.ndarray], bool]:
    """(ONNX model, the arrays of its external initializers, whether its artifact keeps them outside) of an
    executable: its model as lowered where its weights are beside it (an OrtExecutable), else its artifact alone."""
    lowered = _lowered(executable)
    weights = getattr(lowered, "weights", None) or {}
    return (lowered.model, weights, lowered.weights_outside) if weights else (executable.artifact(), {}, False)


def save_onnx(model: onnx.ModelProto, weights: dict[str, np.ndarray] | None, path, what: str,
              outside: bool = True) -> Path:
    """Write `model` to `path`: one file where it holds its weights, or where they are `weights` but not kept
    `outside` (streamed in, `write_inlined`); else `path` and its data file `path.data` beside it (written first;
    each through a temporary file renamed into place, so a failed write leaves neither a partial file nor a model
    naming missing data)."""
    path = checked_path(path, what)
    if not weights:
        return write_atomically(path, what, lambda tmp: tmp.write_bytes(model.SerializeToString()))
    if not outside:
        return write_atomically(path, what, lambda tmp: write_inlined(model, weights, tmp))
    proto = onnx.ModelProto()
    proto.CopyFrom(model)            # small: the weights are not in it
    data = path.parent / data_name(path.name)
    if data.is_dir():
        raise InputError(f"{what}: {str(data)!r}, where the model's weights go, is a directory")

    def write_data(tmp: Path) -> None:
        offset = 0
        for tensor in proto.graph.initializer:
            if not uses_external_data(tensor):
                continue
            array = weights.get(tensor.name)
            if array is None:
                raise GraphoptError(f"{what}: no data for the external initializer {tensor.name!r}")
            offset = -(-offset // ALIGN) * ALIGN
            # one tensor in memory at a time, in a message of its own: bytes set on `proto` would stay in its
            # arena until it is freed, all the weights at once
            one = onnx.TensorProto(name=tensor.name, raw_data=array.tobytes())
            set_external_data(one, tmp.name, offset)
            save_external_data(one, str(tmp.parent))
            offset += array.nbytes
            written = {e.key: int(e.value) for e in one.external_data if e.key in ("offset", "length")}
            set_external_data(one, data.name, written["offset"], written["length"])
            del tensor.external_data[:]
            tensor.external_data.extend(one.external_data)    # with the name it will have once renamed into place
            del one
    write_atomically(data, what, write_data)
    return write_atomically(path, what, lambda tmp: tmp.write_bytes(proto.SerializeToString()))


def data_files(path: Path) -> list[Path]:
    """The external data files a written .onnx names (read without loading them), sorted by name."""
    model = onnx.load(str(path), load_external_data=False)
    names = {e.value for t in model.graph.initializer if uses_external_data(t) for e in t.external_data
             if e.key == "location"}
    return [path.parent / n for n in sorted(names)]


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    """A file's sha256 read in chunks (a data file can be many GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
