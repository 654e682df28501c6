"""graphopt.Auto: one budget across quantization, pruning and layer skipping.

The references are computed here, outside the planner: eager PyTorch's outputs and torch's own cosine
similarity on the batches the planner held out, and a count of what the compiled graph lost (blocks, channels,
float linears). The model is made so that every family has something cheap to take: two blocks whose branch is
scaled almost to nothing, FFN units with tiny weights; the rest costs quality."""
import json

import pytest
import torch
import torch.nn.functional as F

import graphopt
from graphopt.errors import InputError
from graphopt.ir import graph_text

torch.manual_seed(0)
WIDTH, HIDDEN, BLOCKS = 128, 512, 6


class Block(torch.nn.Module):
    def __init__(self, scale: float, width: int = WIDTH, hidden: int = HIDDEN):
        super().__init__()
        self.up, self.down = torch.nn.Linear(width, hidden), torch.nn.Linear(hidden, width)
        with torch.no_grad():
            self.down.weight.mul_(scale)
            self.up.weight[hidden // 2:].mul_(1e-4)   # half the units barely contribute: cheap to prune

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class ResidualMLP(torch.nn.Module):
    """`blocks` residual blocks, those at `near_identity` with their branch scaled almost to nothing (also the model
    of test_distributed.py, smaller)."""
    def __init__(self, inputs: int = 64, width: int = WIDTH, hidden: int = HIDDEN, blocks: int = BLOCKS,
                 outputs: int = 32, near_identity: tuple = (1, 4)):
        super().__init__()
        self.inp = torch.nn.Linear(inputs, width)
        self.blocks = torch.nn.Sequential(*[Block(1e-4 if i in near_identity else 1.0, width, hidden)
                                            for i in range(blocks)])
        self.head = torch.nn.Linear(width, outputs)

    def forward(self, x):
        return self.head(self.blocks(self.inp(x)))


def batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(128, 64, generator=g),) for _ in range(n)]


@pytest.fixture(scope="module")
def model():
    return ResidualMLP().eval()


@pytest.fixture(scope="module")
def calibration():
    return batches(4, 1)


def held_out_loss(cm, model, calibration) -> float:
    """1 − cosine to eager, the mean over the samples of the batches Auto held out (the budget's meaning),
    computed with torch alone."""
    return loss_on(cm, model, graphopt.Auto.split(calibration)[1])


def loss_on(cm, model, data) -> float:
    with torch.no_grad():
        return torch.cat([1 - F.cosine_similarity(cm(*b), model(*b), dim=1) for b in data]).mean().item()


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    return tmp_path_factory.mktemp("auto_dumps")


@pytest.fixture(scope="module")
def auto(model, calibration, dumps):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cm = graphopt.compile(model, calibration[0], calibration=calibration, dump_dir=dumps,
                          optimize=graphopt.Auto(budget=0.02))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the user's model was changed"
    return cm


def test_auto_fits_the_budget_on_held_out_batches_and_does_something(auto, model, calibration):
    plan = auto.plan
    assert not plan.empty, plan.search
    assert held_out_loss(auto, model, calibration) <= 0.02
    assert loss_on(auto, model, batches(2, 11)) <= 1.5 * 0.02     # and on batches it never saw
    assert plan.measured["ms"] < plan.measured["dense_ms"]
    ops = auto.graph.op_counts()
    if plan.quantize:       # what the plan says happened is on the compiled graph
        assert any("dynamic_linear" in op or "quantize" in op or "int4" in op for op in ops), ops
    if plan.prune or plan.drop:   # fewer weights: pruned units and dropped blocks are gone
        kept = sum(auto.graph.constant(n).numel() for n in auto.graph.fx.nodes if n.op == "get_attr")
        assert kept < sum(p.numel() for p in model.parameters())
    assert len(plan.search["evaluated"]) > 3


def test_a_plan_over_budget_is_caught_by_the_independent_check(model, calibration, monkeypatch):
    """Break the planner's loss measurement on purpose (every plan 'fits'): the check above then fails (dropping
    every block is then the fastest plan, and four of them are not near-identity)."""
    from graphopt.passes.auto import joint
    monkeypatch.setattr(joint.quality, "loss", lambda *a, **k: 0.0)
    cm = graphopt.compile(model, calibration[0], calibration=calibration,
                          optimize=graphopt.Auto(budget=0.02, families=("skip",), time_budget=30))
    assert held_out_loss(cm, model, calibration) > 0.02


def test_saved_plan_rebuilds_the_same_graph(auto, model, calibration, tmp_path):
    path = auto.plan.save(tmp_path / "plan.json")
    assert json.loads(path.read_text())["format"] == "graphopt-plan/1"
    again = graphopt.compile(model, calibration[0], calibration=calibration, optimize=str(path))
    assert graph_text(again.graph) == graph_text(auto.graph)
    x = batches(1, 7)[0][0]
    assert torch.equal(again(x), auto(x))
    bundle = auto.export(tmp_path / "bundle")
    assert json.loads((bundle / "plan.json").read_text())["quantize"] == auto.plan.quantize
    assert "evolution" in {e["origin"] for e in auto.plan.search["evaluated"]} or auto.plan.search["stopped"]


def quantized_where(cm) -> set[str]:
    return {r["where"] for r in cm.plan.layers if r["family"] == "quant" and r["level"] != "float"}


def test_a_metric_callable_decides(model, calibration):
    """A metric that forbids any visible change (relative error over 1e-3) rules out quantizing the layers that
    matter (int8 changes their outputs by ~1e-2); what it allows is dropping the two near-identity blocks, pruning
    the near-dead units and rounding inside the near-identity blocks."""
    calls = []

    def strict(outputs, reference):
        calls.append(len(outputs))
        return float(max(((o - r).abs().max() / r.abs().max()).item() for o, r in zip(outputs, reference)) > 1e-3)

    cm = graphopt.compile(model, calibration[0], calibration=calibration,
                          optimize=graphopt.Auto(budget=0.5, metric=strict))
    plan = cm.plan
    near_identity = ("blocks.1.", "blocks.4.")
    assert all(w.startswith(near_identity) for w in quantized_where(cm)), quantized_where(cm)
    assert plan.drop or plan.prune
    assert len(calls) > 3 and set(calls) == {len(graphopt.Auto.split(calibration)[1])}
    assert plan.metric.endswith("strict")
    x = batches(1, 9)[0][0]
    with torch.no_grad():
        ref = model(x)
    assert ((cm(x) - ref).abs().max() / ref.abs().max()).item() <= 1e-3


def test_the_report_draws_the_search(auto, dumps):
    """Every plan measured is a point of the report's scatter, with the budget line and the chosen plan circled;
    report.json holds the same rows."""
    page = (dumps / "report.html").read_text()
    assert "Joint search" in page and "budget 0.02" in page and ">chosen<" in page
    step = next(s for s in json.loads((dumps / "report.json").read_text())["steps"] if s["name"] == "auto")
    table = next(t for t in step["tables"] if "scatter" in t)
    assert len(table["rows"]) == len(auto.plan.search["evaluated"])
    assert page.count('r="3.5"') >= len(table["rows"])


def test_auto_layer_counts_match_eager_structure(auto):
    """Dropped blocks are gone from the graph: no node of their branch is left."""
    names = {n.name for n in auto.graph.fx.nodes}
    assert not set(auto.plan.drop) & names


@pytest.mark.parametrize("make, match", [
    (lambda: graphopt.Auto(budget=0), "budget"),
    (lambda: graphopt.Auto(budget=1.5), "budget"),
    (lambda: graphopt.Auto(metric="accuracy"), "metric"),
    (lambda: graphopt.Auto(metric=3), "metric"),
    (lambda: graphopt.Auto(time_budget=0), "time_budget"),
    (lambda: graphopt.Auto(time_budget=-5), "time_budget"),
    (lambda: graphopt.Auto(families=("fft",)), "families"),
    (lambda: graphopt.Auto(early_exit="yes"), "early_exit"),
    (lambda: graphopt.Auto(early_exit=True, metric=lambda o, r: 0.0), "not a callable"),
    (lambda: graphopt.LayerSkip(metric="accuracy"), "metric"),
    (lambda: graphopt.EarlyExit(metric=lambda o, r: 0.0), "metric"),
])
def test_bad_options(make, match):
    with pytest.raises(InputError, match=match):
        make()


def raising_metric(outputs, reference):
    raise ValueError("labels missing")


@pytest.mark.parametrize("kwargs, match", [
    (dict(optimize=graphopt.Auto()), "calibration"),
    (dict(optimize=graphopt.Auto(), calibration="one"), "at least 2|calibration"),
    (dict(optimize=graphopt.Auto(metric=raising_metric), calibration="two"), "raising_metric.*labels missing"),
    (dict(optimize=graphopt.Auto(metric=lambda o, r: "bad"), calibration="two"), "returned 'bad'"),
    (dict(optimize=42), "optimize="),
    (dict(optimize="{not json"), "not JSON"),
])
def test_bad_inputs_before_capture(model, kwargs, match, monkeypatch):
    import graphopt.api
    monkeypatch.setattr(graphopt.api, "capture", lambda *a, **k: pytest.fail("captured before the error"))
    cal = {"one": batches(1, 3), "two": batches(2, 3)}.get(kwargs.pop("calibration", None))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError, match=match):
        graphopt.compile(model, batches(1, 2)[0], calibration=cal, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
