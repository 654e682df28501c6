"""A compiled model as files a user ships: the ONNX segment(s) and their ORT-format `.ort`, the TVM library where
TVM built it (cross-compiled for arm64), the example inputs with the outputs this machine computed from them,
run.py (runs the folder with onnxruntime or the TVM runtime, without graphopt or torch) and manifest.json
(versions, passes, target, input/output signature, exits and their thresholds, a sha256 per file). No pickle:
`load` needs onnxruntime and graphopt, not the model's code; what is read back is checked first."""
from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch.utils import _pytree as pytree

from ..artifacts import write_atomically, write_bytes_atomically, writable_dir
from ..backends.ort import OrtExecutable
from ..codegen.external import data_files, inline, kept_outside, save_onnx, sha256_file, weights_of
from ..codegen.onnx import to_onnx
from ..errors import InputError
from ..numerics import flat_tensors
from ..runtime.dispatch import EarlyExitExecutable
from ..sessions import ort_session
from ..targets import get_target, host_arch

FORMAT = "graphopt-segments"
VERSION = 2                  # 2: .ort files, the TVM library, reference data, run.py, the output signature
READS = (1, 2)
LIBRARY = "model.so"


def export_bundle(compiled, directory: str | Path) -> Path:
    """Write `compiled` (a CompiledModule) to `directory`; manifest.json last, so a folder with a manifest is whole."""
    exe = compiled.executable
    models, routes, thresholds, labels, weights = _onnx_segments(compiled)
    library = getattr(exe, "export_library", None)
    if not models and library is None:
        raise InputError(f"export(dir): backend {compiled.backend!r} built neither ONNX nor a library here; compile "
                         "with backend='ort' (or 'tvm' for a TVM library)")
    directory = writable_dir(directory, "export")
    segments = []
    for k, (model, route, held) in enumerate(zip(models, routes, weights)):
        entry = _write_model(directory, f"segment{k}.onnx", model, held)
        entry.update(hidden=k > 0, model_inputs=route, onnx_inputs=[i.name for i in model.graph.input],
                     onnx_outputs=[o.name for o in model.graph.output],
                     disabled_optimizers=list(getattr(exe, "disabled_optimizers", ())))
        if compiled.target.device == "cpu" and not held:   # ORT's format is one flatbuffer: 2 GB at most too
            entry["ort_format"] = _write_ort_format(directory, f"segment{k}.ort", model, compiled.target,
                                                    getattr(exe, "disabled_optimizers", ()))
        segments.append(entry)
    manifest = {
        "format": FORMAT, "format_version": VERSION,
        "versions": {"graphopt": _version(), "torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": ort.__version__, **({"tvm": _tvm_version()} if library else {})},
        "target": str(compiled.target), "arch": compiled.target.arch, "backend_at_compile": compiled.backend,
        "passes": [{"name": name, "phase": phase} for name, phase in compiled.passes],
        "inputs": [{"name": s.name, "dtype": str(s.dtype).removeprefix("torch."), "shape": list(s.shape)}
                   for s in compiled.inputs],
        "in_spec": _dumps(compiled.graph.in_spec), "out_spec": _dumps(compiled.graph.out_spec),
        "segments": segments,
        "exits": [{"after": label, "threshold": t} for label, t in zip(labels, thresholds)],
        "confidence": "max softmax probability of the exit head's output (the segment's second output)",
    }
    if library is not None:
        manifest["library"] = {**_write_with(directory, LIBRARY, library), "runtime": "tvm",
                               "triple": f"{compiled.target.arch}-linux-gnu"}
    manifest.update(_reference(compiled, directory))
    if getattr(compiled, "plan", None) is not None:      # the joint plan it was built with (optimize=)
        manifest["plan"] = _write(directory, "plan.json", compiled.plan.to_json().encode())
    manifest["runner"] = _write(directory, "run.py", (Path(__file__).parent / "runner.py").read_bytes())
    write_bytes_atomically(directory / "manifest.json", "export", json.dumps(manifest, indent=1).encode())
    return directory


def _onnx_segments(compiled) -> tuple[list[onnx.ModelProto], list[list[int]], list[float], list[str], list[dict]]:
    """The ONNX model of each segment, its inputs, the exits, and each model's external weights (a model past 2 GB;
    codegen/external.py)."""
    exe = compiled.executable
    if isinstance(exe, EarlyExitExecutable):
        models, weights = [], []
        for a, seg, g, ex in zip(exe.artifact(), exe.segments, exe.graphs, exe.examples):
            if isinstance(a, onnx.ModelProto):
                models.append(a)
                weights.append(weights_of(seg))
                continue
            held = {}          # a TVM segment: lowered to ONNX here
            lowered = to_onnx(g, ex, {}, tuple({0: torch.export.Dim.DYNAMIC} for _ in ex), weights=held).model
            outside = kept_outside(held)
            models.append(lowered if outside else inline(lowered, held))
            weights.append(held if outside else {})
        return models, exe.routes, exe.thresholds, exe.labels, weights
    model = exe.artifact()
    if isinstance(model, onnx.ModelProto):
        return [model], [list(range(len(compiled.inputs)))], [], [], [weights_of(exe)]
    if isinstance(model, list):       # segments around TVM kernels, or torch.cond's branches
        raise InputError(f"export(dir) needs one backend; backend {compiled.backend!r} built a program of "
                         "several: compile with backend='ort' or backend='tvm'")
    return [], [], [], [], []


def _write_model(directory: Path, name: str, model: onnx.ModelProto, weights: dict) -> dict:
    """`name` (self-contained), or `name` and its external data file where the model has weights outside it; the
    manifest entry lists the data file with its own sha256."""
    if not weights:
        return _write(directory, name, model.SerializeToString())
    path = save_onnx(model, weights, directory / name, "export")
    data = [{"file": p.name, "sha256": sha256_file(p)} for p in data_files(path)]
    return {"file": name, "sha256": sha256_file(path), "external_data": data}


def _write(directory: Path, name: str, data: bytes) -> dict:
    write_bytes_atomically(directory / name, "export", data)
    return {"file": name, "sha256": hashlib.sha256(data).hexdigest()}


def _write_with(directory: Path, name: str, writer) -> dict:
    path = write_atomically(directory / name, "export", writer)
    return {"file": name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def _write_ort_format(directory: Path, name: str, model: onnx.ModelProto, target, disabled) -> dict:
    """The model optimized by ONNX Runtime and saved in its ORT format, as its convert_onnx_models_to_ort tool
    does: level 'all', without the NCHWc layout transformer when the target is not x86-64 (its blocked layout
    is x86-specific), and without the fusions graphopt measured slower on this target."""
    disabled = list(disabled) + ([] if target.arch == "x86_64" else ["NchwcTransformer"])

    def save(tmp: Path) -> None:
        ort_session(model.SerializeToString(), disabled=disabled, save_optimized=tmp, save_format="ORT")
    return _write_with(directory, name, save)


def _reference(compiled, directory: Path) -> dict:
    """The example inputs, this machine's outputs from them, and the model's own (eager) outputs: what a run
    elsewhere is compared with (`graphopt verify-artifact`)."""
    inputs, model_outputs = compiled.example_inputs, compiled.model_outputs
    if compiled.target.arch == host_arch() and compiled.runs_here:
        outputs, ran_on = flat_tensors(compiled.executable.run(inputs)), f"{host_arch()}, {compiled.backend}"
    else:   # another ISA's kernels (an arm64 int8 model on x86's saturating int8 path) would not say what it means
        outputs, ran_on = flat_tensors(compiled.graph.run(*inputs)), f"{host_arch()}, graphopt's IR in PyTorch"
    arrays = lambda ts, key: {key(i): t.detach().cpu().numpy() for i, t in enumerate(ts)}
    entries = {}
    for name, data in (("inputs", arrays(inputs, lambda i: compiled.inputs[i].name)),
                       ("outputs", arrays(outputs, "output_{}".format)),
                       ("model_outputs", arrays(model_outputs, "output_{}".format))):
        buf = io.BytesIO()
        np.savez(buf, **data)
        entries[name] = _write(directory, f"{'example_' if name == 'inputs' else 'reference_'}{name}.npz",
                               buf.getvalue())
    entries["outputs"]["ran_on"] = ran_on
    return {"outputs": [{"name": f"output_{i}", "dtype": str(t.dtype).removeprefix("torch."),
                         "shape": list(t.shape)} for i, t in enumerate(outputs)],
            "reference": entries}


def _version() -> str:
    try:
        return importlib.metadata.version("graphopt")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _tvm_version() -> str:
    import tvm
    return tvm.__version__


def _dumps(spec) -> str | None:
    try:
        return pytree.treespec_dumps(spec)
    except Exception:   # output types pytree cannot serialize (a library's dataclass): outputs come back flat
        return None


class LoadedModule:
    """A bundle loaded for ONNX Runtime: called with the model's inputs, returns its outputs."""

    def __init__(self, directory: Path, manifest: dict, executable: EarlyExitExecutable):
        self.directory, self.manifest, self.executable = directory, manifest, executable
        self.inputs = manifest["inputs"]
        self.out_spec = pytree.treespec_loads(manifest["out_spec"]) if manifest["out_spec"] else None

    @property
    def last_exits(self) -> torch.Tensor | None:
        """The exit each sample of the last call took (len(exits): it ran to the end)."""
        return self.executable.last_exits

    def __call__(self, *args):
        if len(args) != len(self.inputs):
            raise InputError(f"expected {len(self.inputs)} positional inputs "
                             f"({', '.join(i['name'] for i in self.inputs)}), got {len(args)}")
        for value, want in zip(args, self.inputs):
            dtype = getattr(torch, want["dtype"])
            if not isinstance(value, torch.Tensor) or value.dtype != dtype or value.dim() != len(want["shape"]) or \
                    any(w is not None and w != d for w, d in zip(want["shape"], value.shape)):
                got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
                raise InputError(f"input {want['name']}: expected {want['dtype']}{want['shape']} (None: any size), "
                                 f"got {got}")
        outs = self.executable.run(list(args))
        if self.out_spec is not None:
            return pytree.tree_unflatten(outs, self.out_spec)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def __repr__(self) -> str:
        return (f"LoadedModule({str(self.directory)!r}, {len(self.manifest['segments'])} segment(s), "
                f"{len(self.manifest['exits'])} exit(s))")


def read_manifest(directory: str | Path) -> tuple[Path, dict]:
    """A bundle folder's manifest, checked to be one this version reads (an InputError says what is wrong)."""
    directory = Path(directory)
    path = directory / "manifest.json"
    if not path.is_file():
        raise InputError(f"{str(directory)!r}: no manifest.json there; give a directory written by "
                         "CompiledModule.export(dir)")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e}); export the bundle again") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("format_version") not in READS:
        raise InputError(f"{path}: not a {FORMAT} manifest of version {' or '.join(map(str, READS))}")
    missing = [k for k in ("inputs", "segments", "exits", "out_spec") if k not in manifest]
    if missing:
        raise InputError(f"{path}: lacks {', '.join(missing)}; export the bundle again")
    return directory, manifest


def checked_file(directory: Path, entry: dict) -> bytes:
    """A file the manifest lists, after checking its sha256 (an InputError where it is missing or changed); the
    external data files it lists too (read in chunks, not kept: ONNX Runtime reads them from the folder)."""
    for data in entry.get("external_data", ()):
        _check_streamed(directory, data)
    path = directory / entry["file"]
    if not path.is_file():
        raise InputError(f"{path}: missing (the manifest lists it)")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise InputError(f"{path}: its sha256 differs from the manifest's (changed or damaged after export)")
    return data


def _check_streamed(directory: Path, entry: dict) -> Path:
    path = directory / entry["file"]
    if Path(entry["file"]).name != entry["file"] or not path.is_file():
        raise InputError(f"{path}: missing (the manifest lists it)")
    if sha256_file(path) != entry["sha256"]:
        raise InputError(f"{path}: its sha256 differs from the manifest's (changed or damaged after export)")
    return path


def load(directory: str | Path, target: str = "cpu") -> LoadedModule:
    """Run an exported bundle's ONNX with ONNX Runtime on `target` (an arm64 bundle's ONNX runs here too), without
    the model's code. Each file is checked against the manifest's sha256 first."""
    directory, manifest = read_manifest(directory)
    if not manifest["segments"]:
        raise InputError(f"{str(directory)!r} holds only a TVM library for {manifest.get('arch')}: run it there with "
                         "its run.py")
    target = get_target(target)   # nothing is measured: the ORT fusions the compile found slower stay disabled
    # a model with external data is opened by ORT from the folder, its data file beside it (checked above)
    segments = [OrtExecutable(onnx.load_from_string(checked_file(directory, seg)), target, len(seg["onnx_inputs"]),
                              disabled=seg.get("disabled_optimizers", ()),
                              path=directory / seg["file"] if seg.get("external_data") else None)
                for seg in manifest["segments"]]
    exits = manifest["exits"]
    exe = EarlyExitExecutable(segments, [s["model_inputs"] for s in manifest["segments"]],
                              [e["threshold"] for e in exits], [e["after"] for e in exits], "ort")
    return LoadedModule(directory, manifest, exe)
