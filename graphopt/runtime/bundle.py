"""A compiled model as files: ONNX segments and a manifest.json (versions, inputs, outputs, exits and their
thresholds, a sha256 per file). No pickle: `load` needs onnxruntime and graphopt, not the model's code."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from torch.utils import _pytree as pytree

from ..artifacts import write_bytes_atomically
from ..backends.ort import OrtExecutable
from ..codegen.onnx import to_onnx
from ..cost import CostModel
from ..errors import InputError
from ..targets import get_target
from .build import quiet_threads
from .dispatch import EarlyExitExecutable

FORMAT = "graphopt-segments"
VERSION = 1


def export_bundle(compiled, directory: str | Path) -> Path:
    """Write `compiled` (a CompiledModule) to `directory`: segmentK.onnx files and manifest.json."""
    exe = compiled.executable
    if isinstance(exe, EarlyExitExecutable):
        models = [a if isinstance(a, onnx.ModelProto) else
                  to_onnx(g, ex, {}, tuple({0: torch.export.Dim.DYNAMIC} for _ in ex))
                  for a, g, ex in zip(exe.artifact(), exe.graphs, exe.examples)]
        routes, thresholds, labels = exe.routes, exe.thresholds, exe.labels
    else:
        model = exe.artifact()
        if not isinstance(model, onnx.ModelProto):
            raise InputError(f"export(dir) writes ONNX; backend {compiled.backend!r} built no ONNX model here: compile "
                             "with backend='ort', or use export_library for a TVM build")
        models, routes, thresholds, labels = [model], [list(range(len(compiled.inputs)))], [], []
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise InputError(f"export({str(directory)!r}): exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    segments = []
    for k, (model, route) in enumerate(zip(models, routes)):
        data = model.SerializeToString()
        name = f"segment{k}.onnx"
        write_bytes_atomically(directory / name, "export", data)
        segments.append({"file": name, "sha256": hashlib.sha256(data).hexdigest(), "hidden": k > 0,
                         "model_inputs": route, "onnx_inputs": [i.name for i in model.graph.input],
                         "onnx_outputs": [o.name for o in model.graph.output]})
    manifest = {
        "format": FORMAT, "format_version": VERSION,
        "versions": {"graphopt": _version(), "torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": ort.__version__},
        "target": str(compiled.target), "backend_at_compile": compiled.backend,
        "inputs": [{"name": s.name, "dtype": str(s.dtype).removeprefix("torch."), "shape": list(s.shape)}
                   for s in compiled.inputs],
        "in_spec": _dumps(compiled.graph.in_spec), "out_spec": _dumps(compiled.graph.out_spec),
        "segments": segments,
        "exits": [{"after": label, "threshold": t} for label, t in zip(labels, thresholds)],
        "confidence": "max softmax probability of the exit head's output (the segment's second output)",
    }
    write_bytes_atomically(directory / "manifest.json", "export", json.dumps(manifest, indent=1).encode())
    return directory


def _version() -> str:
    try:
        return importlib.metadata.version("graphopt")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


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


def load(directory: str | Path, target: str = "cpu") -> LoadedModule:
    """Run an exported bundle with ONNX Runtime on `target`, without the model's code. Each file is checked
    against the manifest's sha256 first."""
    directory = Path(directory)
    path = directory / "manifest.json"
    if not path.is_file():
        raise InputError(f"load({str(directory)!r}): no manifest.json there; give a directory written by "
                         "CompiledModule.export(dir)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("format_version") != VERSION:
        raise InputError(f"{path}: not a {FORMAT} v{VERSION} manifest")
    cost = CostModel(get_target(target))
    segments = []
    for seg in manifest["segments"]:
        data = (directory / seg["file"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != seg["sha256"]:
            raise InputError(f"{directory / seg['file']}: its sha256 differs from the manifest's (changed after export)")
        segments.append(quiet_threads(OrtExecutable(onnx.load_from_string(data), cost, len(seg["onnx_inputs"]))))
    exits = manifest["exits"]
    exe = EarlyExitExecutable(segments, [s["model_inputs"] for s in manifest["segments"]],
                              [e["threshold"] for e in exits], [e["after"] for e in exits], "ort")
    return LoadedModule(directory, manifest, exe)
