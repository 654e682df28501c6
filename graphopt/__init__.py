"""graphopt: a compiler-style graph optimizer for PyTorch models.

    cm = graphopt.compile(model, (x,), target="cpu", dump_dir="dumps/")
    y = cm(x); cm.export_onnx("model.onnx")
"""
from . import passes
from .api import compile
from .backends.tvm_tune import Tune
from .compiled import CompiledModule
from .errors import CaptureError, GraphoptError, InputError, UnsupportedError, VerificationError
from .targets import Target, get_target

__all__ = ["CaptureError", "CompiledModule", "GraphoptError", "InputError", "Target", "Tune", "UnsupportedError",
           "VerificationError", "compile", "get_target", "passes"]
