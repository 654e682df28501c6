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
                            calibration=cal, backend="ort"), classifier


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
    ex.single, _ = one_sample_graph(ex, plan, cm.target, Clock(dispatcher=1.0, If=0.5))
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
    kept, why = one_sample_graph(ex, plan, cm.target, Clock(dispatcher=1.0, If=0.5))
    assert kept is not None and "If kept" in why[0] and "0.500 ms" in why[0]
    kept, why = one_sample_graph(ex, plan, cm.target, Clock(dispatcher=0.5, If=1.0))
    assert kept is None and "dispatcher kept" in why[0]
    assert any("one sample per call" in line for line in cm.report[-1].notes)   # the compile's own decision
