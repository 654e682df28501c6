"""Models with torch.cond: compiled as a host program of straight-line segments (runtime/control.py)."""
import pytest
import torch

import graphopt
from graphopt.errors import UnsupportedError
from graphopt.passes import Pass, PassResult


class TwoWays(torch.nn.Module):
    """relu(a(x)), then b(h) where the sum of x is positive, else 2·c(h); a nested cond in the false branch."""

    def __init__(self, nested: bool = False):
        super().__init__()
        self.a, self.b, self.c, self.d = (torch.nn.Linear(8, 8) for _ in range(4))
        self.nested = nested

    def forward(self, x):
        h = torch.relu(self.a(x))

        def otherwise(h, x):
            if not self.nested:
                return self.c(h) * 2
            return torch.cond(x.mean() < -0.5, lambda h: self.d(h) - 1, lambda h: self.c(h) * 2, (h,))
        return torch.cond(x.sum() > 0, lambda h, x: self.b(h), otherwise, (h, x)) + 1


class Seen(Pass):
    """Records the graphs the pipeline ran on (by their op counts)."""
    name, phase, summary = "seen", "cleanup", "records the graphs it sees"

    def __init__(self):
        self.graphs = []

    def run(self, graph, ctx):
        self.graphs.append(graph.op_counts())
        return PassResult()


def inputs():
    x = torch.randn(4, 8)
    return {"true": x.abs(), "false": -x.abs() * 0.1, "nested": -x.abs() - 1}


def ops(model) -> list[str]:
    return [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("nested", [False, True])
def test_each_branch_matches_eager_and_no_if_is_left(nested):
    model = TwoWays(nested).eval()
    xs = inputs()
    cm = graphopt.compile(model, (xs["true"],))
    for name, x in xs.items():
        with torch.no_grad():
            torch.testing.assert_close(cm(x), model(x), rtol=1e-5, atol=1e-5, msg=f"{name} branch")
    flat = []
    stack = list(cm.executable.artifact())
    while stack:
        a = stack.pop()
        stack.extend(a) if isinstance(a, list) else flat.append(a)
    assert flat and all("If" not in ops(m) for m in flat)
    backend = next(r for r in cm.report if r.name == "backend-ort")
    assert backend.notes[0] == (f"host program (ort): {6 if nested else 4} straight-line segments, "
                                f"{2 if nested else 1} torch.cond run on the host")


def test_passes_run_inside_the_branches():
    seen = Seen()
    model = TwoWays().eval()
    graphopt.compile(model, (inputs()["true"],), passes=["fold_constants", seen, "dce"])
    assert len(seen.graphs) == 3                       # the whole graph, then each branch
    assert seen.graphs[1] == {"aten.linear": 1}        # b(h)
    assert seen.graphs[2] == {"aten.linear": 1, "aten.mul.Tensor": 1}     # c(h) * 2


def test_runs_on_tvm():
    model = TwoWays(nested=True).eval()
    xs = inputs()
    cm = graphopt.compile(model, (xs["true"],), backend="tvm")
    for x in xs.values():
        with torch.no_grad():
            torch.testing.assert_close(cm(x), model(x), rtol=1e-5, atol=1e-5)


def test_options_that_cannot_reach_the_branches_are_refused():
    model = TwoWays().eval()
    x = inputs()["true"]
    with pytest.raises(UnsupportedError, match="without dynamic_shapes"):
        graphopt.compile(model, (x,), dynamic_shapes="batch")
    with pytest.raises(UnsupportedError, match="quantize cannot yet be applied inside"):
        graphopt.compile(model, (x,), quantize="int8", calibration=[(x,)])
