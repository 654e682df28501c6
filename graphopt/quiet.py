"""Keep torch's and the exporters' chatter (progress prints, warnings about optional packages, graph
dumps on failure) off the user's console: graphopt reports what matters in its own errors and dumps."""
from __future__ import annotations

import contextlib
import io
import logging
import warnings

_PREFIXES = ("torch", "onnxscript", "onnx_ir", "tvm")


@contextlib.contextmanager
def quiet(stdout: bool = False):
    """Silence library loggers below ERROR (and stdout/stderr prints too when `stdout`)."""
    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] in _PREFIXES] + list(_PREFIXES)
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.ExitStack() as stack:
            warnings.simplefilter("ignore")
            if stdout:
                stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
                stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
