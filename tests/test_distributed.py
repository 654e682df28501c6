"""graphopt.Auto's candidates evaluated as Ray tasks (issue 31): the same plan as the serial search, an unreachable
cluster refused before capture, a worker killed mid-search survived and reported. MetaSchedule's candidates built as
Ray tasks (Tune(workers=)): built there, measured here, the tuned model matches eager, a killed builder is retried.

One local Ray of two worker processes serves the module (its start takes seconds); Auto(workers=2) finds it
initialized and uses it as it is. The model is small and built so that every family has something to take (as in
test_auto.py), so a search measures a few dozen plans in seconds."""
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import graphopt
from graphopt.errors import InputError
from test_auto import ResidualMLP

pytest.importorskip("ray")

WIDTH, HIDDEN, BLOCKS, BUDGET = 32, 64, 3, 0.02
# pruning's statistics and the skip family's fitted maps travel differently: all three families at once, and quant +
# skip alone (slow), are compared with the serial search
FAMILIES = ("quant", "prune", "skip")


def residual_mlp():
    """test_auto.py's model, smaller: 3 blocks 32 → 64 → 32, the second near identity."""
    torch.manual_seed(0)
    return ResidualMLP(inputs=16, width=WIDTH, hidden=HIDDEN, blocks=BLOCKS, outputs=8, near_identity=(1,))


def batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(64, 16, generator=g),) for _ in range(n)]


@pytest.fixture(scope="module")
def model():
    return residual_mlp().eval()


@pytest.fixture(scope="module")
def calibration():
    return batches(4, 1)


@pytest.fixture(scope="module")
def cluster():
    """A local Ray of two worker processes for the module, shut down after it."""
    import logging
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
             _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


def compile_auto(model, calibration, families=FAMILIES, **kw):
    return graphopt.compile(model, calibration[0], calibration=calibration,
                            optimize=graphopt.Auto(budget=BUDGET, seed=3, families=families, **kw))


def auto_notes(cm) -> list[str]:
    return next(r for r in cm.report if r.name == "auto").notes


_SERIAL = {}


def serial_compile(model, calibration, families=FAMILIES):
    """The serial search's compile (and its seconds), once per family set."""
    if families not in _SERIAL:
        t0 = time.perf_counter()
        cm = compile_auto(model, calibration, families)
        _SERIAL[families] = cm, time.perf_counter() - t0
    return _SERIAL[families]


@pytest.fixture(scope="module")
def serial(model, calibration):
    return serial_compile(model, calibration)


def held_out_loss(cm, model, calibration) -> float:
    """1 − cosine to eager on the batches Auto held out, computed with torch alone."""
    _, check = graphopt.Auto.split(calibration)
    with torch.no_grad():
        return max((1 - F.cosine_similarity(cm(*b), model(*b), dim=1)).mean().item() for b in check)


@pytest.mark.parametrize("families", [FAMILIES, pytest.param(("quant", "skip"), marks=pytest.mark.slow)],
                         ids=["quant+prune", "quant+skip"])
def test_two_ray_workers_give_the_serial_plan(cluster, model, calibration, capfd, families):
    cm_serial, serial_s = serial_compile(model, calibration, families)
    capfd.readouterr()
    t0 = time.perf_counter()
    cm = compile_auto(model, calibration, families, workers=2)
    parallel_s = time.perf_counter() - t0
    out, err = capfd.readouterr()
    assert out == "" and err == "", f"graphopt printed what nobody asked for: {out!r} {err!r}"
    a, b = cm_serial.plan, cm.plan
    assert not a.empty, "the search found nothing to do: the test model lost its cheap moves"
    assert (a.summary(), a.quantize, a.prune, a.drop) == (b.summary(), b.quantize, b.prune, b.drop)
    assert [(r["where"], r["level"]) for r in a.layers] == [(r["where"], r["level"]) for r in b.layers]
    # every plan the search measured, in the same order, from the same origin, with the same loss
    assert [(e["origin"], e["estimated_ms"]) for e in a.search["evaluated"]] == \
        [(e["origin"], e["estimated_ms"]) for e in b.search["evaluated"]]
    assert [e["loss"] for e in a.search["evaluated"]] == pytest.approx([e["loss"] for e in b.search["evaluated"]],
                                                                       rel=1e-5, abs=1e-9)
    notes = auto_notes(cm)
    ray_note = next(n for n in notes if n.startswith("candidates evaluated as Ray tasks"))
    assert "2 worker processes" in ray_note, ray_note
    assert not any(n.startswith(("retried:", "lost:")) for n in notes)
    # the compiled model against eager, on the held-out batches, within the budget
    assert held_out_loss(cm, model, calibration) <= BUDGET
    print(f"serial {serial_s:.1f} s, 2 Ray workers {parallel_s:.1f} s (whole compiles); {ray_note}")


def test_an_unreachable_ray_address_is_an_input_error_before_capture(monkeypatch, model, calibration):
    import graphopt.api

    def no_capture(*a, **k):
        raise AssertionError("captured before the Ray address was checked")
    monkeypatch.setattr(graphopt.api, "capture", no_capture)
    with socket_closed_port() as port:
        t0 = time.perf_counter()
        with pytest.raises(InputError, match=f"127.0.0.1:{port}.*unreachable"):
            compile_auto(model, calibration, ray_address=f"127.0.0.1:{port}")
        assert time.perf_counter() - t0 < 10
    with pytest.raises(InputError, match="host:port"):
        graphopt.Auto(ray_address="nowhere")
    with pytest.raises(InputError, match="workers"):
        graphopt.Auto(workers=0)
    with pytest.raises(InputError, match="Ray\\(address="):
        graphopt.Auto(workers=graphopt.Ray(), ray_address="127.0.0.1:6379")
    # the tuner's builders too: checked with the backend, before capture
    pytest.importorskip("tvm")
    with socket_closed_port() as port:
        with pytest.raises(InputError, match=f"127.0.0.1:{port}.*unreachable"):
            graphopt.compile(model, calibration[0], backend="tvm",
                             tune=graphopt.Tune(trials=8, ray_address=f"127.0.0.1:{port}"))
    with pytest.raises(InputError, match="Tune\\(workers=0\\)"):
        graphopt.Tune(workers=0)


class socket_closed_port:
    """A loopback port nothing listens on (bound, then closed)."""
    def __enter__(self):
        import socket
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        return self.port

    def __exit__(self, *exc):
        return False


def test_the_graph_travels_as_plain_data_and_comes_back_the_same(model, calibration):
    """graphopt.ir.wire: what a worker rebuilds is the same graph (names, shapes, weights, outputs), and a graph with
    a dynamic batch is refused (its candidates stay in the compiling process)."""
    import pickle
    from graphopt.capture import batch_dynamic_shapes, capture
    from graphopt.errors import UnsupportedError
    from graphopt.ir import graph_text
    from graphopt.ir.wire import from_wire, to_wire
    from graphopt.passes.calibration import run_batches
    graph = capture(model, calibration[0])
    back = from_wire(pickle.loads(pickle.dumps(to_wire(graph))))
    assert graph_text(back) == graph_text(graph)
    assert [n.meta["val"].shape for n in back.ops()] == [n.meta["val"].shape for n in graph.ops()]
    pairs = [(b, {}) for b in calibration]
    assert all(torch.equal(a, b) for a, b in zip(run_batches(graph, pairs), run_batches(back, pairs)))
    dynamic = capture(model, calibration[0], dynamic_shapes=batch_dynamic_shapes(model, calibration[0], None))
    with pytest.raises(UnsupportedError, match="symbolic"):
        to_wire(dynamic)


def test_ray_is_not_imported_unless_asked():
    code = ("import sys, graphopt; graphopt.Auto(budget=0.01); graphopt.Ray(workers=2); "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


class WorkerKiller(threading.Thread):
    """Kills (SIGKILL) the first `times` Ray worker processes seen running `task` (evaluating a candidate)."""

    def __init__(self, times: int = 1, task: bytes = b"ray::_evaluate"):
        super().__init__(daemon=True)
        self.times, self.killed, self.stop, self.task = times, [], threading.Event(), task

    def run(self):
        while not self.stop.is_set() and len(self.killed) < self.times:
            for pid in os.listdir("/proc"):
                if not pid.isdigit() or int(pid) in self.killed:
                    continue
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        title = f.read()
                except OSError:
                    continue
                if title.startswith(self.task):
                    os.kill(int(pid), signal.SIGKILL)
                    self.killed.append(int(pid))
                    break
            time.sleep(0.002)


@pytest.mark.parametrize("retries", [2, pytest.param(0, marks=pytest.mark.slow)], ids=["retried", "lost"])
def test_a_worker_killed_mid_search_is_retried_or_reported_lost(cluster, serial, model, calibration, retries):
    killer = WorkerKiller()
    killer.start()
    try:
        cm = compile_auto(model, calibration, workers=graphopt.Ray(workers=2, retries=retries, task_timeout_s=120))
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed, "no worker was seen evaluating a candidate"
    notes = auto_notes(cm)
    if retries:
        retried = [n for n in notes if n.startswith("retried:")]
        assert retried and "submitted again" in retried[0], notes
        assert not any(n.startswith("lost:") for n in notes)
        assert cm.plan.summary() == serial[0].plan.summary()     # nothing lost: still the serial plan
    else:
        lost = [n for n in notes if n.startswith("lost:")]
        assert lost and "counted as over the budget" in lost[0], notes
    assert held_out_loss(cm, model, calibration) <= BUDGET


def tune_on_ray(tmp_path, **ray):
    """A 64 → 128 linear + ReLU (one MetaSchedule task) tuned with 8 trials, its candidates built as Ray tasks."""
    pytest.importorskip("tvm")
    torch.manual_seed(0)
    mlp, x = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU()).eval(), (torch.randn(4, 64),)
    tune = graphopt.Tune(trials=8, time_budget=600, db=tmp_path / "db", progress=False,
                         workers=graphopt.Ray(workers=2, task_timeout_s=120, **ray))
    cm = graphopt.compile(mlp, x, backend="tvm", tune=tune)
    with torch.no_grad():
        torch.testing.assert_close(cm(*x), mlp(*x), rtol=1e-5, atol=1e-5)   # the tuned build against eager
    return cm.executable.tune_report


def builder_folders() -> set:
    import tempfile
    return {p.name for p in Path(tempfile.gettempdir()).glob("graphopt-ray-build-*")}


def test_tuning_builds_its_candidates_as_ray_tasks(cluster, tmp_path):
    before = builder_folders()
    report = tune_on_ray(tmp_path)
    assert report.trials == 8 and report.tuned == ["fused_matmul_add_relu"], report.lines()
    built = re.match(r"built (\d+) candidates as Ray tasks in \d+ batches", report.built[0])
    assert built and 1 <= int(built[1]) <= 8, report.built        # MetaSchedule sends up to 8, the trials asked
    tally = re.search(r"on the Ray this process had started, 2 at once: (\d+) tasks on (\d+) worker processes",
                      report.built[1])
    assert tally and int(tally[1]) == int(built[1]) and int(tally[2]) >= 1, report.built
    assert builder_folders() == before     # the built libraries are removed with the tuning


@pytest.mark.slow
def test_a_builder_killed_mid_tuning_is_retried(cluster, tmp_path):
    killer = WorkerKiller(task=b"ray::_build")
    killer.start()
    try:
        report = tune_on_ray(tmp_path, retries=2)
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed, "no worker was seen building a candidate"
    retried = [n for n in report.built if n.startswith("retried:")]
    assert retried and "submitted again" in retried[0], report.built
    assert not any(n.startswith("lost:") for n in report.built) and report.trials == 8
