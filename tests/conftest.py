import pytest
import torch

from graphopt.passes.drift import drift, flat_tensors


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def assert_matches(compiled, model, inputs, tol=1e-4):
    """Compiled outputs equal eager's within `tol` relative to the output scale (fp32)."""
    with torch.no_grad():
        ref = flat_tensors(model(*inputs))
    d = drift(compiled(*inputs), ref)
    assert d.rel <= tol, f"relative error {d.rel:.3g} (max abs {d.max_abs:.3g}) on output {d.output}"
    return d
