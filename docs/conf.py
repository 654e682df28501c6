"""Sphinx configuration: Markdown pages (MyST), the furo theme, an API reference from graphopt's docstrings,
and the pages' examples run as doctests (`make docs`: sphinx-build -b doctest, then -b html, warnings as errors)."""
import dataclasses
import inspect
import re
import sys

project = "graphopt"
author = "graphopt contributors"
copyright = "graphopt contributors"

# no sphinx.ext.napoleon: graphopt's docstrings are prose, not Google/NumPy sections, and napoleon reads the first
# line of every property's docstring as "type: text" (CompiledModule.last_exits would cite a type "With early_exit=")
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.doctest"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
root_doc = "index"

# every internal link must resolve: `-n` makes unresolved references warnings (and `-W` errors); MyST gives each
# heading down to level 3 an anchor, so `[text](page.md#heading)` is checked too
nitpicky = True
myst_heading_anchors = 3

html_theme = "furo"
html_title = "graphopt"
# the site is read from disk (docs/_build/html/index.html): search results without summaries, which the search
# script would fetch from each page, a request browsers refuse for file:// pages (a console error per result)
html_show_search_summary = False

# API reference: signatures with their type hints. External types (torch, pathlib, typing...) have no pages here
# (no intersphinx: the docs build offline), nor do graphopt's internal classes that appear in the signatures of
# constructors users do not call (Graph, Executable, StepRecord, CostModel): references to them are not errors
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_inherit_docstrings = False
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|pathlib|typing|collections|onnx|numpy|tvm|abc|dataclasses)(\..*)?"),
    (r"py:.*", r"(Path|Any|Callable|Sequence|ClassVar|Iterator|Metric|quality\.Metric)"),
    (r"py:class", r"graphopt\.(ir|backends|runtime|cost|passes\.manager|progress)\..*"),
    (r"py:class", r"list\[tuple\[tuple.*"),   # PassContext's calibration batches, split by the signature cleanup
]

# the examples: every page's doctests run in a fresh temporary folder, their cache directory in it (the files they
# write vanish with it), with torch seeded so printed results are stable
doctest_global_setup = """
import importlib.util, os, shutil, tempfile
import torch
import graphopt
torch.manual_seed(0)
_docs_cwd, _docs_cache = os.getcwd(), os.environ.get("XDG_CACHE_HOME")
_docs_tmp = tempfile.mkdtemp(prefix="graphopt-docs-")
os.chdir(_docs_tmp)
os.environ["XDG_CACHE_HOME"] = os.path.join(_docs_tmp, "cache")   # nothing lands in the user's ~/.cache
ON_CI = os.environ.get("GRAPHOPT_CI") == "1"
ARM64_TOOLS = ON_CI or (shutil.which("aarch64-linux-gnu-gcc") is not None and importlib.util.find_spec("tvm") is not None)
"""
doctest_global_cleanup = """
os.chdir(_docs_cwd)
if _docs_cache is None:
    os.environ.pop("XDG_CACHE_HOME", None)
else:
    os.environ["XDG_CACHE_HOME"] = _docs_cache
shutil.rmtree(_docs_tmp, ignore_errors=True)
"""
doctest_test_doctest_blocks = ""   # only the {doctest}/{testcode} directives run, not every `>>>` block


def _module_docstring_for_undocumented_classes(app, what, name, obj, options, lines):
    """Option classes document themselves in their module's docstring (graphopt/passes/*/options.py) rather than
    in a class docstring; show that text for a class without one of its own (a dataclass's generated docstring,
    its signature, counts as none). Indented lines (the modules' tables of calls) become a literal block."""
    if what != "class" or not inspect.isclass(obj):
        return
    own = obj.__dict__.get("__doc__") or ""
    if own and not own.startswith(f"{obj.__name__}("):
        return
    module_doc = inspect.getdoc(sys.modules[obj.__module__]) or ""
    if not module_doc:
        return
    lines[:] = _literal_indented(module_doc.splitlines())


def _literal_indented(text: list[str]) -> list[str]:
    """reST from plain text whose indented runs are tables meant to be read as written: each run becomes a
    literal block (`::`), so neither its layout nor a following unindented line breaks the build."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i].startswith(" ") and text[i].strip():
            run = []
            while i < len(text) and (text[i].startswith(" ") or not text[i].strip()):
                run.append(text[i])
                i += 1
            while run and not run[-1].strip():
                run.pop()
            if out and out[-1].strip():
                out.append("")
            out += ["::", ""] + ["    " + line for line in run] + [""]
        else:
            out.append(text[i])
            i += 1
    return out


def _dataclass_signature(app, what, name, obj, options, signature, return_annotation):
    """A dataclass's generated __init__ carries its annotations as strings (`from __future__ import annotations`)
    and shows a default made by a factory as `<factory>`, which is not Python, so Sphinx would split the signature
    at every comma: show `budget: float | None` and the factory's value (`{}`, `()`) instead."""
    if signature and dataclasses.is_dataclass(obj):
        signature = re.sub(r": '([^']*)'", r": \1", signature)
        for f in dataclasses.fields(obj):
            if f.init and f.default_factory is not dataclasses.MISSING:
                signature = signature.replace("<factory>", repr(f.default_factory()), 1)
    return signature, return_annotation


def setup(app):
    app.connect("autodoc-process-docstring", _module_docstring_for_undocumented_classes)
    app.connect("autodoc-process-signature", _dataclass_signature)
