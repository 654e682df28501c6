"""Measuring on remote devices through TVM's RPC tracker (graphopt.RPC), on loopback only: a tracker and servers
started by the tests on 127.0.0.1 — two native x86 servers under one key, one aarch64 server under qemu-user in the
arm64 root the edge tests use — then MetaSchedule tuning measured on both x86 servers, an arm64 compile whose
measured decisions are timed on the emulated board (and whose module runs there), a server killed mid-tuning, and
an unreachable tracker. Every process the fixtures start is killed at teardown (its whole process group)."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

import graphopt
from graphopt import RPC, InputError
from conftest import assert_matches, need_module, need_tool

# the user's cache directory, read before conftest gives each test an empty one: where the arm64 root is kept
USER_CACHE = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")


# --- fast: the option, the probe, the verdict keys ---------------------------------------------------------------
@pytest.mark.parametrize("kwargs, words", [
    (dict(tracker="localhost", key="x86"), "\"host:port\""),
    (dict(tracker="h:70000", key="x86"), "\"host:port\""),
    (dict(tracker="h:9190", key="two words"), "device key"),
    (dict(tracker="h:9190", key="x86", timeout=0), "timeout=0"),
    (dict(tracker="h:9190", key="x86", timeout=float("inf")), "finite"),
])
def test_rpc_checks_itself(kwargs, words):
    with pytest.raises(InputError, match=re.escape(words)):
        RPC(**kwargs)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracker_is_an_input_error_before_capture(monkeypatch):
    need_module("tvm")
    monkeypatch.setattr(graphopt.api, "capture", lambda *a, **k: pytest.fail("captured before the error"))
    model, x = torch.nn.Linear(4, 4).eval(), torch.randn(1, 4)
    rpc = RPC(tracker=f"127.0.0.1:{_closed_port()}", key="rk3588", connect_timeout=2)
    t0 = time.perf_counter()
    with pytest.raises(InputError, match=r"no TVM RPC tracker answered at 127\.0\.0\.1:\d+ .*rpc_tracker"):
        graphopt.compile(model, (x,), target="arm64", backend="tvm", tune=graphopt.Tune(trials=8, rpc=rpc))
    with pytest.raises(InputError, match="no TVM RPC tracker"):
        graphopt.compile(model, (x,), target="cpu", backend="tvm", rpc=rpc)
    assert time.perf_counter() - t0 < 10
    with pytest.raises(InputError, match="name different devices"):
        graphopt.compile(model, (x,), target="cpu", backend="tvm", rpc=rpc,
                         tune=graphopt.Tune(rpc=RPC(tracker=rpc.tracker, key="other")))


def test_rpc_verdicts_are_keyed_by_the_device_key():
    """A verdict measured on boards of one key is never read back for another key, nor for this machine."""
    from graphopt.cost import CostModel
    lower = lambda *a: None   # noqa: E731 (never called)
    here = CostModel(graphopt.get_target("cpu"), "tvm", lower)
    a = CostModel(graphopt.get_target("cpu", RPC("127.0.0.1:9190", "x86")), "tvm", lower)
    b = CostModel(graphopt.get_target("cpu", RPC("10.0.0.2:9190", "x86")), "tvm", lower)
    c = CostModel(graphopt.get_target("cpu", RPC("127.0.0.1:9190", "epyc")), "tvm", lower)
    assert len({here.key, a.key, c.key}) == 3 and a.key == b.key     # the device key, not the tracker's address
    assert a.on == "TVM on cpu, measured on rpc 127.0.0.1:9190 key x86" and a.unmeasurable is None
    arm = CostModel(graphopt.get_target("arm64", RPC("127.0.0.1:9190", "rk3588")), "tvm", lower)
    assert arm.unmeasurable is None and CostModel(graphopt.get_target("arm64"), "tvm", lower).unmeasurable
    with pytest.raises(graphopt.UnsupportedError, match="CPU targets"):
        graphopt.get_target("cuda", RPC("127.0.0.1:9190", "x86"))


# --- the fleet: a tracker, two x86 servers, one emulated aarch64 board ---------------------------------------------
class Fleet:
    def __init__(self, workdir: Path):
        self.dir, self.procs, self.logs = workdir, {}, {}
        self.port = _closed_port()
        self.tracker = f"127.0.0.1:{self.port}"
        self._start("tracker", [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1",
                                "--port", str(self.port), "--port-end", str(self.port + 1), "--silent"])

    def _start(self, name: str, command: list[str], env=None) -> None:
        log = self.dir / f"{name}.log"
        self.logs[name] = log
        self.procs[name] = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True, cwd=self.dir)

    def server(self, name: str, key: str) -> None:
        port = _closed_port()
        self._start(name, [sys.executable, "-m", "tvm.exec.rpc_server", "--tracker", self.tracker, "--key", key,
                           "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)])

    def arm64_server(self, name: str, key: str) -> None:
        """TVM's server in the arm64 root under qemu-user. qemu-user (without binfmt_misc) cannot exec aarch64
        children, so the server runs in the emulated process itself (TVM's rpc_server would start it in a child
        Python); TVM's popen worker needs cloudpickle, pure Python, taken from this machine."""
        from graphopt.package import emulate
        saved = os.environ.get("XDG_CACHE_HOME")
        os.environ["XDG_CACHE_HOME"] = USER_CACHE      # the root, made once in the user's cache and reused
        try:
            python = emulate._python("aarch64", None, emulate.CPU)
        finally:
            if saved is None:
                del os.environ["XDG_CACHE_HOME"]
            else:
                os.environ["XDG_CACHE_HOME"] = saved
        import cloudpickle
        site = self.dir / "pure-site"
        shutil.copytree(Path(cloudpickle.__file__).parent, site / "cloudpickle", dirs_exist_ok=True)
        env = {**python.env, "PYTHONPATH": f"{python.env['PYTHONPATH']}:{site}"}
        port = _closed_port()
        code = ("from tvm.rpc.server import PopenRPCServerState as S\n"
                f"S('127.0.0.1', {port}, {port + 1}, tracker_addr=('127.0.0.1', {self.port}), key={key!r}, "
                "custom_addr='127.0.0.1').thread.join()")
        self._start(name, python.command + ["-c", code], env)

    def wait(self, key: str, count: int, seconds: float) -> list[str]:
        deadline = time.monotonic() + seconds
        while True:
            try:
                servers = RPC(self.tracker, key).servers()
            except OSError:
                servers = []
            if len(servers) >= count:
                return servers
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                tails = {n: self.logs[n].read_text(errors="replace")[-800:] for n in self.procs}
                pytest.fail(f"{count} servers of key {key} not registered within {seconds} s (exited: {dead}): {tails}")
            time.sleep(0.5)

    def wait_tracker(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            try:
                RPC(self.tracker, "any").servers()
                return
            except OSError:
                if time.monotonic() > deadline or self.procs["tracker"].poll() is not None:
                    pytest.fail(f"the tracker did not start: {self.logs['tracker'].read_text(errors='replace')[-800:]}")
                time.sleep(0.3)

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        try:
            os.killpg(proc.pid, signal.SIGKILL)    # the server and its children (TVM's popen worker, sessions)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def close(self) -> None:
        for name in list(self.procs):
            self.kill(name)


@pytest.fixture(scope="module")
def fleet():
    need_module("tvm")
    need_module("tornado")      # TVM's tracker runs on tornado
    with tempfile.TemporaryDirectory(prefix="graphopt-fleet-") as tmp:
        fleet = Fleet(Path(tmp))
        try:
            fleet.wait_tracker(30)
            fleet.server("x86-a", "x86")
            fleet.server("x86-b", "x86")
            fleet.wait("x86", 2, 120)
            yield fleet
        finally:
            fleet.close()


@pytest.fixture(scope="module")
def board(fleet):
    """An emulated aarch64 board under key arm64 in the fleet."""
    for tool, why in [("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"), ("qemu-aarch64-static", "qemu-user-static"),
                      ("debootstrap", "debootstrap")]:
        need_tool(tool, why)
    fleet.arm64_server("arm64-board", "arm64")
    fleet.wait("arm64", 1, 300)
    return RPC(fleet.tracker, "arm64", timeout=120)


def mlp():
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32)).eval(), \
        (torch.randn(4, 64),)


def backend_notes(cm) -> list[str]:
    return next(r for r in cm.report if r.name.startswith("backend")).notes


PER_SERVER = re.compile(r"measured on rpc \S+ key (\S+): (\d+) measurements \(per server: ([^)]*)\)")


def per_server(notes: list[str]) -> dict[str, int]:
    line = next(n for n in notes if PER_SERVER.search(n))
    return {s: int(n) for s, n in (part.rsplit(" ", 1) for part in PER_SERVER.search(line)[3].split(", "))}


@pytest.mark.slow
def test_tuning_measures_on_both_x86_servers(fleet, tmp_path):
    model, args = mlp()
    rpc = RPC(fleet.tracker, "x86", timeout=60)
    t0 = time.perf_counter()
    cm = graphopt.compile(model, args, target="cpu", backend="tvm",
                          tune=graphopt.Tune(trials=8, time_budget=30, db=tmp_path / "db", progress=False, rpc=rpc))
    seconds = time.perf_counter() - t0
    notes = backend_notes(cm)
    print("\n".join(notes), f"\ncompile with tuning: {seconds:.0f} s")
    counts = per_server(notes)
    servers = set(RPC(fleet.tracker, "x86").servers())
    assert set(counts) == servers and all(n > 0 for n in counts.values()), counts   # both measured
    # 8 trials per task the time budget reaches (the MLP's second task too, on a quiet machine)
    trials = cm.executable.tune_report.trials
    assert sum(counts.values()) == trials and trials in (8, 16), (counts, trials)
    assert not any("lost" in n for n in notes)
    assert_matches(cm, model, args)


@pytest.mark.slow
def test_arm64_decisions_are_measured_on_the_emulated_board(board, tmp_path):
    """The FFT and conv-epilogue decisions of an arm64 compile are timed on the board (the numbers mean nothing under
    emulation: the path is what is tested), MetaSchedule tunes there, and the module's calls run there."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = torch.nn.Conv1d(8, 8, 65, padding=32, groups=8)     # depthwise, long: an FFT candidate
            self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)                  # conv + relu: an epilogue to fuse

        def forward(self, x, y):
            return self.dw(x).relu(), torch.relu(self.conv(y))
    model, args = Net().eval(), (torch.randn(1, 8, 256), torch.randn(1, 4, 16, 16))
    cm = graphopt.compile(model, args, target="arm64", backend="tvm", rpc=board,
                          tune=graphopt.Tune(trials=8, time_budget=20, db=tmp_path / "db", progress=False))
    notes = {r.name: r.notes for r in cm.report}
    where = f"TVM on arm64, measured on rpc {board.tracker} key arm64"
    assert any(f"cost model rates measured with {where}" in n for n in notes["fft_conv"]), notes["fft_conv"]
    epilogues = re.compile(r"conv epilogues (fused|left to the backend): the model measured .* with " + re.escape(where))
    assert any(epilogues.search(n) for n in notes["fuse_epilogues"]), notes["fuse_epilogues"]
    assert any(f"measured on {where}" in n for n in notes["fuse_epilogues"] if n.startswith("cost model verdicts"))
    backend = backend_notes(cm)
    print("\n".join(n for r in cm.report for n in r.notes))
    assert f"calls run on a board of rpc {board.tracker} key arm64" in backend[0]
    counts = per_server(backend)
    assert list(counts) == RPC(board.tracker, "arm64").servers() and sum(counts.values()) > 0
    assert cm.runs_here                         # on the board, through RPC
    assert_matches(cm, model, args)


@pytest.mark.slow
def test_a_server_killed_mid_tuning_loses_its_measurement_only(fleet, tmp_path):
    """Two servers under their own key; the one serving a measurement is killed during it. MetaSchedule records the
    lost run as failed, the rest go to the other server, the report counts what was lost, the outputs match eager."""
    fleet.server("victim-a", "victim")
    fleet.server("victim-b", "victim")
    fleet.wait("victim", 2, 120)
    killed: list[str] = []

    def kill_one_serving():
        deadline = time.monotonic() + 600
        while not killed and time.monotonic() < deadline:
            for name in ("victim-a", "victim-b"):
                text = fleet.logs[name].read_text(errors="replace")
                if text.count("start serving") > text.count("finish serving"):   # a session in progress
                    fleet.kill(name)
                    killed.append(name)
                    return
            time.sleep(0.02)
    killer = threading.Thread(target=kill_one_serving, daemon=True)
    killer.start()
    model, args = mlp()
    rpc = RPC(fleet.tracker, "victim", timeout=30)
    cm = graphopt.compile(model, args, target="cpu", backend="tvm",
                          tune=graphopt.Tune(trials=8, time_budget=30, db=tmp_path / "db", progress=False, rpc=rpc))
    killer.join(5)
    notes = backend_notes(cm)
    print("\n".join(notes))
    assert killed, "no measurement was in progress to kill"
    lost = next(n for n in notes if "measurements lost" in n)
    assert int(lost.split()[0]) >= 1
    counts = per_server(notes)
    assert sum(counts.values()) + int(lost.split()[0]) == cm.executable.tune_report.trials in (8, 16)
    assert_matches(cm, model, args)
