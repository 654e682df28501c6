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


@contextlib.contextmanager
def native_quiet():
    """Keep native libraries' log lines (TVM's C++ LOG(WARNING), written straight to file descriptor 2: "Fast mode
    segfaults when there are out-of-bounds indices…" for every gather it lowers) off the user's console. Errors
    still reach the user as exceptions, with their messages."""
    import os
    import sys
    import tempfile
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
