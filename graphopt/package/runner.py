"""Run a graphopt bundle on the machine it was copied to: `python run.py [--backend ort|tvm]`.

Copied into every exported folder as run.py. It needs numpy and the runtime it runs (onnxruntime, or TVM for the
library), not graphopt, torch or the model's code. Every file it loads is checked against the manifest's sha256
first, and the inputs against the manifest's signature. Inputs come from an .npz (one array per input, by name;
default: the example inputs saved at export); outputs go to an .npz (output_0, output_1, ...)."""
import argparse
import hashlib
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

FORMAT, VERSIONS = "graphopt-segments", (1, 2)


class BundleError(Exception):
    pass


def checked_bytes(folder: Path, entry: dict) -> bytes:
    data = (folder / entry["file"]).read_bytes()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise BundleError(f"{entry['file']}: its sha256 differs from the manifest's (changed or damaged after export)")
    return data


def read_inputs(folder: Path, manifest: dict, path: str | None) -> list:
    source = path if path is not None else io.BytesIO(checked_bytes(folder, manifest["reference"]["inputs"]))
    with np.load(source, allow_pickle=False) as npz:
        arrays = []
        for want in manifest["inputs"]:
            if want["name"] not in npz.files:
                raise BundleError(f"{path or 'the example inputs'}: no array named {want['name']!r} (has {', '.join(npz.files)})")
            a = npz[want["name"]]
            if str(a.dtype) != want["dtype"] or a.ndim != len(want["shape"]) or \
                    any(w is not None and w != d for w, d in zip(want["shape"], a.shape)):
                raise BundleError(f"input {want['name']}: expected {want['dtype']}{want['shape']} (None: any size), "
                                  f"got {a.dtype}{list(a.shape)}")
            arrays.append(np.ascontiguousarray(a))
    return arrays


def ort_runner(folder: Path, manifest: dict, threads: int, prefer_ort_format: bool):
    import onnxruntime as ort
    (segment,) = manifest["segments"]
    entry = segment.get("ort_format") if prefer_ort_format and segment.get("ort_format") else segment
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # explicit: ORT pins its workers to cores otherwise, which fails where the cores it sees are not its own
    options.intra_op_num_threads = threads
    # workers stop spinning when a run returns, as in graphopt's own sessions (graphopt/sessions.py: this file
    # runs alone)
    options.add_session_config_entry("session.force_spinning_stop", "1")
    if entry is not segment:       # already optimized at export for this target; ORT must not redo it
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.add_session_config_entry("session.load_model_format", "ORT")
    providers = ["CPUExecutionProvider"]
    if manifest["target"] == "cuda":   # on the GPU or not at all: ORT would fall back to its CPU provider silently
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BundleError("this bundle was built for cuda and this onnxruntime has no CUDAExecutionProvider: "
                              "pip install onnxruntime-gpu")
        providers = ["CUDAExecutionProvider"] + providers   # CPU for the few ops the CUDA provider lacks
    model = checked_bytes(folder, entry)
    for data in entry.get("external_data", ()):   # weights past 2 GB: a data file beside the model, checked in chunks
        if Path(data["file"]).name != data["file"] or not (folder / data["file"]).is_file():
            raise BundleError(f"{data['file']}: missing (the manifest lists it)")
        digest = hashlib.sha256()
        with open(folder / data["file"], "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
        if digest.hexdigest() != data["sha256"]:
            raise BundleError(f"{data['file']}: its sha256 differs from the manifest's (changed or damaged after "
                              "export)")
    # with external data ORT opens the model from the folder, where its data file is
    session = ort.InferenceSession(str(folder / entry["file"]) if entry.get("external_data") else model, options,
                                   providers=providers)
    names = [i.name for i in session.get_inputs()]
    return entry["file"], lambda arrays: session.run(None, dict(zip(names, arrays)))


def tvm_runner(folder: Path, manifest: dict, threads: int):
    os.environ.setdefault("TVM_NUM_THREADS", str(threads))
    import tvm
    from tvm import relax
    library = manifest["library"]
    here = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
    if manifest.get("arch") and manifest["arch"] != here:     # TVM's loader would only say it cannot load it
        raise BundleError(f"the TVM library is built for {manifest['arch']} and this machine is {here}: run it "
                          "there" + (", or use --backend ort (its ONNX model)" if manifest.get("segments") else ""))
    checked_bytes(folder, library)
    device = tvm.cuda() if manifest["target"] == "cuda" else tvm.cpu()
    if not device.exist:
        raise BundleError("this bundle was built for cuda and TVM finds no CUDA GPU here")
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(folder / library["file"])), device)

    def run(arrays):
        out = vm["main"](*[tvm.runtime.tensor(a, device) for a in arrays])
        return [o.numpy() for o in ([out] if hasattr(out, "numpy") else out)]
    return library["file"], run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Run a graphopt bundle with onnxruntime or the TVM runtime.")
    ap.add_argument("--backend", choices=("ort", "tvm"), help="default: ort when the bundle has ONNX, else tvm")
    ap.add_argument("--onnx", action="store_true", help="ORT: load the .onnx file instead of the ORT-format one")
    ap.add_argument("--inputs", help=".npz with one array per input, keyed by input name (default: the examples)")
    ap.add_argument("--outputs", help="write the outputs to this .npz")
    ap.add_argument("--repeat", type=int, default=1, help="calls to time (the outputs are the last call's)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ns = ap.parse_args(argv)
    folder = Path(__file__).resolve().parent
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        if manifest.get("format") != FORMAT or manifest.get("format_version") not in VERSIONS:
            raise BundleError("manifest.json: not a graphopt bundle this runner reads")
        if manifest.get("exits"):
            raise BundleError("this bundle has early exits: run it with graphopt.load(folder), which dispatches them")
        backend = ns.backend or ("ort" if manifest["segments"] else "tvm")
        if backend == "ort" and not manifest["segments"]:
            raise BundleError("this bundle has no ONNX model (it was compiled with backend='tvm'): use --backend tvm")
        if backend == "tvm" and not manifest.get("library"):
            raise BundleError("this bundle has no TVM library: use --backend ort")
        arrays = read_inputs(folder, manifest, ns.inputs)
        loaded, run = (ort_runner(folder, manifest, ns.threads, not ns.onnx) if backend == "ort"
                       else tvm_runner(folder, manifest, ns.threads))
        times = []
        for _ in range(max(ns.repeat, 1)):
            t0 = time.perf_counter()
            outs = run(arrays)
            times.append(time.perf_counter() - t0)
    except (BundleError, OSError, KeyError, ValueError) as e:
        print(f"run.py: error: {e}", file=sys.stderr)
        return 2
    if ns.outputs:
        np.savez(ns.outputs, **{f"output_{i}": np.asarray(o) for i, o in enumerate(outs)})
    print(f"ran {loaded} with {backend}: {len(outs)} output(s) "
          f"{', '.join(str(list(np.shape(o))) for o in outs)}; median {sorted(times)[len(times) // 2] * 1e3:.2f} ms "
          f"over {len(times)} call(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
