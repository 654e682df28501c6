"""What a user ships: the bundle folder (ONNX, .ort, TVM library, reference data, run.py, manifest.json), loading it
back, and running it where it is meant to run — natively, or an arm64 bundle under emulation."""
from .bundle import LoadedModule, export_bundle, load, read_manifest
from .emulate import verify_artifact

__all__ = ["LoadedModule", "export_bundle", "load", "read_manifest", "verify_artifact"]
