import importlib
import os
import shutil
import subprocess
from collections.abc import Mapping

import pytest
import torch

from graphopt.numerics import drift, flat_tensors


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    """Each test its own cache directory: the verdicts one test measured on disk never decide another's (within a
    worker process they are shared in memory, as in any process), and nothing lands in the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))


def assert_matches(compiled, model, inputs, tol=1e-4):
    """Compiled outputs equal eager's within `tol` relative to the output scale (fp32)."""
    with torch.no_grad():
        ref = flat_tensors(model(*inputs))
    d = drift(compiled(*inputs), ref)
    assert d.rel <= tol, f"relative error {d.rel:.3g} (max abs {d.max_abs:.3g}) on output {d.output}"
    return d


def output_tensors(out) -> list[torch.Tensor]:
    """The float tensors of a model's output, in order: a tensor, tuples and lists, dicts (transformers' outputs)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in output_tensors(o)]
    return []


def held_out_cosine_error(compiled, model, inputs) -> float:
    """Mean (1 − cosine similarity) of the compiled module's outputs to the EAGER model's, each output flattened per
    sample, in float64, over `inputs` (argument tuples; pass batches that were not calibration data). Plain torch
    on purpose: lossy features are checked against this, not against the measurements their planners budget
    with (graphopt.numerics.cosine_error, a plan's own loss), so a planner that mismeasures cannot pass itself."""
    errors = []
    with torch.no_grad():
        for args in inputs:
            got, want = output_tensors(compiled(*args)), output_tensors(model(*args))
            assert got and len(got) == len(want), (len(got), len(want))
            for g, w in zip(got, want):
                assert g.shape == w.shape, (g.shape, w.shape)
                cos = torch.nn.functional.cosine_similarity(g.reshape(len(g), -1).double(),
                                                            w.reshape(len(w), -1).double(), dim=1)
                errors.append((1 - cos).mean().item())
    return sum(errors) / len(errors)


ON_CI = os.environ.get("GRAPHOPT_CI") == "1"     # set by .ci/run, which installs every tool the tests need


def need_module(name: str):
    """The module, or a skip where it does not import; on CI a failure (CI installs everything, so a missing
    or broken TVM there is a defect, not a reason to skip)."""
    try:
        return importlib.import_module(name)
    except Exception as e:
        if ON_CI:
            raise
        pytest.skip(f"{name} does not import: {e}", allow_module_level=True)


def need_tool(command: str, why: str) -> None:
    """Skip where `command` is not installed; on CI fail."""
    if shutil.which(command) is None:
        (pytest.fail if ON_CI else pytest.skip)(f"{command} is not installed ({why})")


def chromium(url: str, why: str = "the headless browser pages are checked in") -> tuple[str, str]:
    """The DOM after scripts ran, and the browser's log (console messages included): report.html and the docs are
    checked in Debian's chromium."""
    need_tool("chromium", why)
    done = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", "--virtual-time-budget=5000", "--dump-dom", url],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, done.stderr


def fake_clock(monkeypatch, ms: dict[str, float]) -> list[dict[str, float]]:
    """The cost model's clock (graphopt.cost.model.time_side_by_side) faked for a timing of exactly the systems
    named in `ms`: each is called once (a candidate must still run), and `ms` (milliseconds per call) is the
    answer, so a measured choice can be checked both ways. Other timings go to the real clock. Returns the
    list of answers given: a test checks that the choice asked the clock. The process's verdicts are set aside
    meanwhile, so no verdict measured before answers instead and no faked one decides a later test."""
    import graphopt.cost.model as cost_model
    real, answered = cost_model.time_side_by_side, []
    monkeypatch.setattr(cost_model, "_VERDICTS", {})

    def clock(systems, args, *a, **k):
        if set(systems) != set(ms):
            return real(systems, args, *a, **k)
        for fn in systems.values():
            fn(*args)
        answered.append(dict(ms))
        return dict(ms)
    monkeypatch.setattr(cost_model, "time_side_by_side", clock)
    return answered
