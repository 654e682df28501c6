"""The documentation site (docs/, built by `make docs`) rendered in a real headless browser (Chromium): the home page
shows the quick start, the search page lists results for a query, and neither logs a console error. The README's
quick start runs as printed, and its links into docs/ point at pages that exist.

The browser tests are slow-marked: CI installs the docs extra (Sphinx, MyST, furo) in `make docs`, after `make test`
and before `make test-slow`, so there they open the build `make docs` just made. Elsewhere they build the HTML first
(a few seconds; the doctests are `make docs`' job) unless the build is newer than every page and every module."""
import fcntl
import html
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import chromium, need_module

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BUILD = DOCS / "_build"
HTML = BUILD / "html"
CONSOLE_ERROR = re.compile(r"CONSOLE.*(Error|Uncaught)|Uncaught")


def text(dom: str) -> str:
    """What a reader sees: the DOM without its tags (code is split into highlighted spans)."""
    return html.unescape(re.sub(r"<[^>]+>", "", dom))


def built_html() -> Path:
    """docs/_build/html, built now unless it is newer than every page, the Sphinx config and graphopt's modules
    (the API pages come from their docstrings). One builder at a time (pytest-xdist runs tests side by side)."""
    for module in ("sphinx", "myst_parser", "furo"):
        need_module(module)
    BUILD.mkdir(exist_ok=True)
    with open(BUILD / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        sources = [p for p in DOCS.rglob("*") if p.is_file() and BUILD not in p.parents]
        sources += list((ROOT / "graphopt").rglob("*.py"))
        index = HTML / "index.html"
        if not index.exists() or index.stat().st_mtime < max(p.stat().st_mtime for p in sources):
            done = subprocess.run([sys.executable, "-m", "sphinx", "-E", "-W", "--keep-going", "-n", "-q", "-b", "html",
                                   "-d", str(BUILD / "doctrees"), str(DOCS), str(HTML)],
                                  capture_output=True, text=True, timeout=600, cwd=ROOT)
            assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return HTML


@pytest.mark.slow
def test_docs_home_page_renders_the_quick_start_without_console_errors():
    dom, log = chromium((built_html() / "index.html").as_uri())
    assert not CONSOLE_ERROR.search(log), log[-2000:]
    assert re.search(r"<title>graphopt</title>", dom)
    seen = text(dom)
    assert "Quick start" in seen and "compiler-style graph optimizer for PyTorch models" in seen
    assert 'cm = graphopt.compile(model, (x,), dump_dir="dumps/quickstart")' in seen
    assert "fuse_epilogues %linear + relu → graphopt.linear_act" in seen      # the doctest's output, shown
    for page in ("quantization", "sparsity", "skipping", "auto", "tuning", "cpu", "cuda", "arm64", "report", "cli",
                 "errors", "passes", "operators", "architecture", "benchmarks", "api"):
        assert f'href="{page}.html"' in dom, page                              # every page in the navigation


@pytest.mark.slow
def test_docs_search_lists_results_without_console_errors():
    dom, log = chromium((built_html() / "search.html").as_uri() + "?q=quantize")
    assert not CONSOLE_ERROR.search(log), log[-2000:]
    results = re.search(r'<ul[^>]*class="search"[^>]*>(.*?)</ul>', dom, re.S)
    assert results, "the search script rendered no result list"
    links = re.findall(r'<li[^>]*>\s*<a href="([^"#]+)', results.group(1))
    assert "quantization.html" in links, links
    assert all((HTML / link).is_file() for link in links), links


def readme() -> str:
    return (ROOT / "README.md").read_text()


def test_readme_quick_start_runs_as_printed(tmp_path, monkeypatch, capsys):
    code = re.search(r"## Quick start\s+```python\n(.*?)```", readme(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md (quick start)", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "True", lines[:3]                                 # compiled outputs match eager
    assert any("fold_batchnorm 1" in line for line in lines), lines       # the report says what each pass did
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "bundle" / "manifest.json").is_file()
    assert (tmp_path / "dumps" / "quickstart" / "report.html").is_file()


def test_readme_first_60_lines_hold_the_set_up_and_every_docs_link():
    lines = readme().splitlines()
    assert lines[3].startswith("make demo") and lines[4].startswith("make test")
    head = "\n".join(lines[:60])
    links = re.findall(r"\]\((docs/[^)#]+)", readme())
    assert links and all(link in head for link in links)
    missing = [link for link in links if not (ROOT / link).is_file()]
    assert not missing, missing
    pages = {p.name for p in DOCS.glob("*.md")}
    assert pages <= {Path(link).name for link in links}, pages - {Path(link).name for link in links}
