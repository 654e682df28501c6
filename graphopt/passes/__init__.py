"""Passes over the IR, one subpackage per family. Importing this package registers every built-in pass."""
from . import auto, cleanup, fft, fusion, quant, skip, sparsity  # noqa: F401  (registers the families' passes)
from .base import PHASES, Pass, PassContext, PassResult, available, family, register
from .manager import Instrument, PassManager, Step, StepRecord
from .pipelines import DEFAULT_PIPELINES, default_pipeline, place, resolve, with_options

__all__ = ["DEFAULT_PIPELINES", "Instrument", "PHASES", "Pass", "PassContext", "PassManager", "PassResult", "Step",
           "StepRecord", "available", "default_pipeline", "family", "place", "register", "resolve", "with_options"]
