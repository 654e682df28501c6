"""Passes over the IR. Importing this package registers every built-in pass by name."""
from . import (dce, fft_conv, fold_batchnorm, fold_constants, fuse_attention, fuse_epilogues, fuse_norms,  # noqa: F401
               quant_plan, quantize, remove_noops)
from .base import DEFAULT_PIPELINES, Pass, PassContext, PassResult, available, register, resolve
from .drift import Drift, drift
from .manager import PassManager, StepRecord

__all__ = ["DEFAULT_PIPELINES", "Drift", "Pass", "PassContext", "PassManager", "PassResult", "StepRecord",
           "available", "drift", "register", "resolve"]
