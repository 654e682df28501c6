"""Layer skipping, second step (issue 34): early exit for one sample per call as ONNX `If` nodes, chosen by the
cost model; blocks replaced by fitted maps instead of removed."""
import pytest
import torch

import graphopt
from graphopt import zoo
from graphopt.runtime.build import one_sample_graph


@pytest.fixture(scope="module")
def digits():
    return zoo.digits()


@pytest.fixture(scope="module")
def exiting(digits):
    classifier = zoo.train_digits(blocks=4, width=8, epochs=6)
    xc = digits["calibration"][0]
    cal = [(xc[i:i + 100],) for i in range(0, 400, 100)]
    return graphopt.compile(classifier, (xc[:32],), early_exit=graphopt.EarlyExit(budget=0.03, metric="top1"),
                            calibration=cal), classifier      # the default backend, "auto"


class Clock:
    """The cost model's comparison, faked: each system's ms as given."""
    def __init__(self, **ms):
        self.ms = ms

    def compare(self, systems, args):
        assert set(systems) == set(self.ms)
        for run in systems.values():
            run()
        return dict(self.ms)


def test_one_sample_per_call_takes_the_same_exits_as_the_batched_dispatcher(exiting, digits):
    cm, _ = exiting
    ex, plan = cm.executable, cm.plans["early_exit"]
    ex.single, _ = one_sample_graph(ex, plan, cm.target, Clock(dispatcher=1.0, If=0.5, **{"If, 1 thread": 0.6}))
    assert ex.single is not None
    x = digits["test"][0][:80]
    batched, batched_exits = cm(x), cm.last_exits.clone()
    assert len(set(batched_exits.tolist())) > 1, "the test needs samples leaving at different exits"
    for i in range(len(x)):
        y = cm(x[i:i + 1])
        assert int(cm.last_exits[0]) == int(batched_exits[i])
        torch.testing.assert_close(y, batched[i:i + 1], rtol=1e-4, atol=1e-4)


def test_the_one_sample_graph_is_kept_only_where_timed_faster(exiting):
    cm, _ = exiting
    ex, plan = cm.executable, cm.plans["early_exit"]
    one = "If, 1 thread"
    kept, why = one_sample_graph(ex, plan, cm.target, Clock(dispatcher=1.0, If=0.5, **{one: 0.6}))
    assert kept is not None and "If kept" in why[0] and "0.500 ms" in why[0]
    assert kept[1].get_session_options().intra_op_num_threads != 1
    kept, why = one_sample_graph(ex, plan, cm.target, Clock(dispatcher=1.0, If=0.5, **{one: 0.4}))
    assert kept is not None and f"{one} kept" in why[0] and kept[1].get_session_options().intra_op_num_threads == 1
    kept, why = one_sample_graph(ex, plan, cm.target, Clock(dispatcher=0.5, If=1.0, **{one: 0.9}))
    assert kept is None and "dispatcher kept" in why[0]
    assert any("one sample per call" in line for line in cm.report[-1].notes)   # the compile's own decision


class Block(torch.nn.Module):
    """x + W2·gelu(W1·x): near-linear when W1 is small (GELU's linear part dominates), strongly not otherwise."""
    def __init__(self, d, linear):
        super().__init__()
        self.up, self.down = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)
        with torch.no_grad():
            self.up.weight.mul_(0.05 if linear else 3.0)
            self.down.weight.mul_(40.0 if linear else 1.0)
            if linear:                       # no constant part: a fit that ignores x (shuffled targets) cannot pass
                self.up.bias.zero_()
                self.down.bias.zero_()

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


def _tokens(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 12, 16, generator=g),) for _ in range(n)]


def test_a_fitted_map_reproduces_its_block_better_than_removal():
    """The map g fitted on calibration activations, against the block's own branch f computed by the eager module
    on held-out inputs: ‖g(x) − f(x)‖ far below ‖f(x)‖ (what removal leaves)."""
    from graphopt.capture import capture
    from graphopt.passes.skip.blocks import find_blocks
    from graphopt.passes.skip.maps import fit_maps
    torch.manual_seed(0)
    model = torch.nn.Sequential(Block(16, linear=True), Block(16, linear=False)).eval()
    graph = capture(model, _tokens(1, 0)[0], {}, None)
    blocks = find_blocks(graph)
    maps = fit_maps(graph, [(b, {}) for b in _tokens(6, 1)], blocks)
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, (args[0], out - args[0])))
             for i, m in enumerate(model)]
    ratios = []
    with torch.no_grad():
        for (x,) in _tokens(3, 2):
            model(x)
            for i, b in enumerate(blocks):
                inp, branch = seen[i]
                g = maps[b.index][0](inp)                                  # the full-rank map
                ratios.append((i, ((g - branch).norm() / branch.norm()).item()))
    for h in hooks:
        h.remove()
    assert max(r for i, r in ratios if i == 0) < 0.05, ratios            # near-linear: reproduced
    assert max(r for i, r in ratios if i == 1) < 1.0, ratios             # still better than removal (1.0)


def test_layer_skip_replaces_a_near_linear_block_within_the_budget():
    torch.manual_seed(0)
    model = torch.nn.Sequential(Block(16, True), Block(16, False), Block(16, True), Block(16, False)).eval()
    cal, held = _tokens(6, 1), _tokens(4, 2)
    cm = graphopt.compile(model, cal[0], layer_skip=graphopt.LayerSkip(budget=0.01), calibration=cal,
                          backend="ort")
    removed_only = graphopt.compile(model, cal[0], layer_skip=graphopt.LayerSkip(budget=0.01, replace=False),
                                    calibration=cal, backend="ort")
    step = next(r for r in cm.report if r.name == "layer_skip")
    assert any(n.startswith("replaced block") for n in step.notes), step.notes
    alone = next(r for r in removed_only.report if r.name == "layer_skip")
    assert not any(n.startswith(("dropped block", "replaced block")) for n in alone.notes)   # removal fits nothing
    with torch.no_grad():
        ref = torch.cat([model(x) for (x,) in held]).flatten(0, 1)
        got = torch.cat([cm(x) for (x,) in held]).flatten(0, 1)
    loss = 1 - torch.nn.functional.cosine_similarity(got.double(), ref.double(), dim=-1).mean().item()
    assert 1e-7 < loss < 0.02, loss                     # something changed, within about the budget on held-out data
    widths = sorted(n.meta["val"].shape[0] for n in cm.graph.fx.nodes
                    if n.op == "get_attr" and n.meta["val"].dim() == 2)
    assert widths.count(64) < 4, widths                 # a 16 → 64 → 16 branch is gone (its 64-row weight)


def test_the_joint_planner_replaces_a_near_linear_block_by_a_map(tmp_path):
    """graphopt.Auto's skip knobs have a map level between kept and dropped: on a model whose near-linear blocks
    cost too much to drop, the plan replaces one (its 64-row weights gone from the graph), within the budget
    against eager on inputs the planner never saw; the saved plan rebuilds the same graph (its maps refitted on the
    same batches)."""
    from graphopt.ir import graph_text
    torch.manual_seed(0)
    model = torch.nn.Sequential(Block(16, True), Block(16, False), Block(16, True), Block(16, False)).eval()
    cal, held = _tokens(6, 1), _tokens(4, 2)
    cm = graphopt.compile(model, cal[0], calibration=cal, backend="ort",
                          optimize=graphopt.Auto(budget=0.01, families=("skip",), time_budget=60))
    plan = cm.plan
    assert plan.replace and not plan.drop, plan.summary()
    assert set(plan.replace.values()) <= {"linear map", "low-rank map"}
    with torch.no_grad():
        ref = torch.cat([model(x) for (x,) in held]).flatten(0, 1)
        got = torch.cat([cm(x) for (x,) in held]).flatten(0, 1)
    loss = 1 - torch.nn.functional.cosine_similarity(got.double(), ref.double(), dim=-1).mean().item()
    assert 1e-7 < loss < 0.02, loss
    widths = [n.meta["val"].shape[0] for n in cm.graph.fx.nodes if n.op == "get_attr" and n.meta["val"].dim() == 2]
    assert widths.count(64) == 4 - len(plan.replace), widths     # each replaced branch's 16 → 64 weight is gone
    again = graphopt.compile(model, cal[0], calibration=cal, backend="ort", optimize=str(plan.save(tmp_path / "p.json")))
    assert graph_text(again.graph) == graph_text(cm.graph)
