"""graphopt: a compiler-style graph optimizer for PyTorch models.

    cm = graphopt.compile(model, (x,), target="cpu", dump_dir="dumps/")
    y = cm(x); cm.export_onnx("model.onnx")
"""
from . import passes
from .api import compile
from .backends.tvm_tune import Tune
from .compiled import CompiledModule
from .distributed.ray_cluster import Ray
from .distributed.rpc import RPC
from .errors import CaptureError, GraphoptError, InputError, UnsupportedError, VerificationError
from .options import Option
from .passes.auto import Auto, Plan
from .passes.quant.options import Quantization
from .passes.skip import EarlyExit, LayerSkip
from .passes.sparsity import Sparsity
from .package import load
from .targets import Target, get_target

__all__ = ["Auto", "CaptureError", "CompiledModule", "EarlyExit", "GraphoptError", "InputError", "LayerSkip", "Option", "Plan",
           "Quantization", "RPC", "Ray", "Sparsity", "Target", "Tune", "UnsupportedError", "VerificationError", "compile",
           "get_target", "load", "passes"]
