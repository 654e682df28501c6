"""Measuring on the devices the model will run on, through TVM's RPC tracker: graphopt.RPC.

Boards run TVM's own server, registered with a tracker under a device key (`python -m tvm.exec.rpc_server
--tracker HOST:9190 --key rk3588`); graphopt asks the tracker for a free board of that key for each measurement.

Where the device lives (one design, so the target is resolved once and every measured decision goes through the
one cost seam): `graphopt.compile(..., rpc=graphopt.RPC(...))` — or `Tune(rpc=...)`, the same device given with the
tuning — puts it on the resolved `Target` (`Target.rpc`). Everything downstream reads it from there:
- MetaSchedule (`tune=`) builds each candidate here, cross-compiled for the target into a shared library
  (`export_shared`), and measures it on a board of the key (`BoardRunner`, MetaSchedule's RPC runner with the
  server of each measurement and every lost one counted): `tune=` on `arm64` works with a device given;
- the cost model's TVM timings (backend "tvm": FFT rates, conv epilogues, quantization and sparsity plans) run on
  a board (`BoardFunction` and its clock `board_side_by_side`), and its verdicts are cached under the device key,
  apart from local ones; the report says where each was measured;
- a module built for a target this machine cannot run (arm64) runs its calls on a board of the key.

What travels: built shared libraries (TVM's cross-compiled kernels or a whole Relax VM executable), the input
tensors of a timing or a call, and back timings and output tensors — never the user's model object, its Python
code, or a pickle read back here (MetaSchedule's runner workers are TVM's own processes on this machine).

Faults: every remote step has a timeout (`RPC.timeout` for a whole session: the tracker's wait for a free board,
connect, upload, run; `RPC.connect_timeout` for the tracker), so nothing hangs. An unreachable tracker, or one with
no server of the key, is an InputError at compile's start (`RPC.probe`). A board that dies mid-tuning loses the
measurement in flight: MetaSchedule records it as failed, the others go to the boards left, and the tuning report
counts what was lost. A cost-model timing whose board fails is retried on another board of the key once."""
from __future__ import annotations

import gc
import json
import math
import os
import re
import socket
import struct
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from . import first_line
from ..errors import GraphoptError, InputError, UnsupportedError

TRACKER_MAGIC = 0x2F271          # tvm.rpc.base.RPC_TRACKER_MAGIC
REQUEST, SUMMARY, SUCCESS = 4, 6, 0   # tvm.rpc.base.TrackerCode

START_TRACKER = "python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190"


class RemoteError(GraphoptError):
    """A remote measurement or call failed (its board died, or it ran past RPC.timeout)."""


@dataclass(frozen=True)
class RPC:
    """A kind of device reached through TVM's RPC tracker: `tracker` "host:port", `key` the device key its servers
    registered with. `timeout`: seconds one remote session may last (the wait for a free board, upload, run),
    `connect_timeout`: seconds to reach the tracker, `priority` of the requests in the tracker's queue. For
    example::

        rpc = graphopt.RPC(tracker="10.0.0.2:9190", key="rk3588")
        cm = graphopt.compile(model, (x,), target="arm64", backend="tvm", rpc=rpc, tune=graphopt.Tune(trials=64))"""
    tracker: str
    key: str
    timeout: float = 60.0
    connect_timeout: float = 5.0
    priority: int = 1

    def __post_init__(self):
        m = re.fullmatch(r"\[?([^\s\[\]]+?)\]?:(\d{1,5})", self.tracker) if isinstance(self.tracker, str) else None
        if m is None or not 0 < int(m[2]) < 65536:
            raise InputError(f"RPC(tracker={self.tracker!r}): give the tracker's address as \"host:port\" (e.g. "
                             f"\"10.0.0.2:9190\"), where `{START_TRACKER}` runs")
        if not isinstance(self.key, str) or not re.fullmatch(r"[\w.\-]+", self.key):
            raise InputError(f"RPC(key={self.key!r}): give the device key the boards' servers registered with "
                             "(letters, digits, '.', '-', '_'; e.g. \"rk3588\" for `python -m tvm.exec.rpc_server "
                             "--tracker HOST:9190 --key rk3588`)")
        for name in ("timeout", "connect_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise InputError(f"RPC({name}={value!r}): give a finite number of seconds > 0 (every remote call is "
                                 "bounded by it)")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise InputError(f"RPC(priority={self.priority!r}): give an int (higher is served first)")

    @property
    def host(self) -> str:
        return self.tracker.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.tracker.rsplit(":", 1)[1])

    def __str__(self) -> str:
        return f"rpc {self.tracker} key {self.key}"

    # --- the tracker ------------------------------------------------------------------------------
    def _tracker(self, timeout: float) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        try:
            sock.sendall(struct.pack("<i", TRACKER_MAGIC))
            if struct.unpack("<i", _recv(sock, 4))[0] != TRACKER_MAGIC:
                raise ConnectionError(f"{self.tracker} is not a TVM RPC tracker")
        except BaseException:
            sock.close()
            raise
        sock.settimeout(timeout)
        return sock

    def servers(self) -> list[str]:
        """The servers ("host:port") registered under this key now, from the tracker's summary."""
        with self._tracker(self.connect_timeout) as sock:
            code, summary = _ask(sock, [SUMMARY])
        return sorted(f"{s['addr'][0]}:{s['addr'][1]}" for s in summary["server_info"]
                      if s.get("key") == f"server:{self.key}")

    def probe(self) -> list[str]:
        """The servers of this key, or an InputError saying what to start or fix (bounded by connect_timeout)."""
        try:
            servers = self.servers()
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"rpc: no TVM RPC tracker answered at {self.tracker} ({type(e).__name__}: {e}; waited "
                             f"at most {self.connect_timeout:g} s): start one with `{START_TRACKER}` and the boards' "
                             f"servers with `python -m tvm.exec.rpc_server --tracker HOST:9190 --key {self.key}`, or fix "
                             f"RPC(tracker=...)") from e
        if not servers:
            raise InputError(f"rpc: the tracker at {self.tracker} has no server with key {self.key!r}: start one on "
                             f"each board with `python -m tvm.exec.rpc_server --tracker {self.tracker} --key "
                             f"{self.key}` (`python -m tvm.exec.query_rpc_tracker --host {self.host} --port "
                             f"{self.port}` lists the keys it has)")
        return servers

    def session(self):
        """(a tvm.rpc.RPCSession on a free board of this key, "host:port" of its server): the tracker's queue waited
        on for at most `timeout` seconds; the server ends the session after `timeout` seconds."""
        from tvm import rpc
        with self._tracker(self.timeout) as sock:
            try:
                code, (url, port, matchkey) = _ask(sock, [REQUEST, self.key, "", self.priority])
            except socket.timeout as e:
                raise RemoteError(f"{self}: no board of the key became free within {self.timeout:g} s") from e
        try:
            return rpc.connect(url, port, matchkey, session_timeout=self.timeout), f"{url}:{port}"
        except Exception as e:   # the board the tracker named is gone (killed, rebooted, unplugged)
            raise RemoteError(f"{url}:{port}: {type(e).__name__}: {first_line(e)}") from None


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the tracker closed the connection")
        data += chunk
    return data


def _ask(sock: socket.socket, message: list) -> tuple[int, Any]:
    """One request of the tracker's protocol (a length-prefixed JSON value each way)."""
    data = json.dumps(message).encode()
    sock.sendall(struct.pack("<i", len(data)) + data)
    size = struct.unpack("<i", _recv(sock, 4))[0]
    if not 0 < size <= 1 << 20:
        raise ConnectionError("the tracker sent a malformed reply")
    value = json.loads(_recv(sock, size))
    if not isinstance(value, list) or value[0] != SUCCESS or len(value) != 2:
        raise ConnectionError(f"the tracker refused: {str(value)[:200]}")
    return value[0], value[1]


def bounded(fn: Callable[[], Any], seconds: float, what: str) -> Any:
    """fn() in a helper thread, waited on for at most `seconds`: a board that stops answering cannot hang the
    caller (the thread is left to the session's own timeout, which the server enforces)."""
    box: dict[str, Any] = {}

    def call():
        try:
            box["value"] = fn()
        except BaseException as e:   # handed to the caller
            box["error"] = e
    thread = threading.Thread(target=call, daemon=True, name="graphopt-rpc")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise RemoteError(f"{what}: no answer within {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


# --- calls and timings of a built module on a board (the cost model's lower seam, and arm64 modules' calls) ------
class BoardFunction:
    """A TVM Relax executable as a function on a board of `rpc`'s key: exported once as a shared library
    (cross-compiled by `export`, the executable's export_library), uploaded for each session. Calling it runs
    once there and returns torch tensors; `bind(inputs)` gives a no-argument call the cost model's clock times
    on the board (board_side_by_side)."""

    def __init__(self, export: Callable[[str], Any], rpc: RPC):
        self._export, self.rpc, self._dir, self._path = export, rpc, None, None

    @property
    def library(self) -> str:
        if self._path is None:
            self._dir = tempfile.TemporaryDirectory(prefix="graphopt-rpc-")
            self._path = os.path.join(self._dir.name, "model.so")
            self._export(self._path)
        return self._path

    def __call__(self, inputs: list) -> list:
        library = self.library
        return _with_retry(self.rpc, lambda session: _run_once(session, library, inputs), "a call of the module")[0]

    def bind(self, inputs: list) -> "BoardCall":
        return BoardCall(self, [t.detach().cpu().contiguous().numpy() for t in inputs])


@dataclass
class BoardCall:
    function: BoardFunction
    inputs: list

    def __call__(self):
        return self.function([_torch(a) for a in self.inputs])


def _torch(a):
    import torch
    return torch.from_numpy(a)


def _run_once(session, library: str, inputs: list) -> list:
    import torch
    vm, dev = _load(session, library)
    vm.set_input("main", *[_remote(session, dev, t) for t in inputs])
    vm.invoke_stateful("main")
    out = vm.get_outputs("main")
    flat = _flatten(out)
    return [torch.from_numpy(o.numpy()) for o in flat]


def _flatten(out) -> list:
    import tvm
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flatten(o)]
    if isinstance(out, tvm.runtime.Tensor) or hasattr(out, "numpy"):
        return [out]
    raise UnsupportedError(f"a board returned {type(out).__name__}, not tensors")


def _remote(session, dev, t):
    import numpy as np
    import tvm
    a = t if isinstance(t, np.ndarray) else t.detach().cpu().contiguous().numpy()
    return tvm.runtime.tensor(a, dev)


def _load(session, library: str):
    from tvm import relax
    name = os.path.basename(os.path.dirname(library)) + ".so"   # unique: a session loads several libraries
    session.upload(library, name)
    dev = session.cpu()
    return relax.VirtualMachine(session.load_module(name), dev), dev


def _with_retry(rpc: RPC, work: Callable, what: str, attempts: int = 2):
    """(work(session), server) on a board of the key, tried on a second board if the first fails; each attempt
    bounded by rpc.timeout."""
    errors = []
    for _ in range(attempts):
        def attempt():
            session, server = rpc.session()
            try:
                return work(session), server
            except Exception as e:
                raise RemoteError(f"{server}: {type(e).__name__}: {first_line(e)}") from None
            finally:
                # the server serves one session at a time, until the client lets go of it: the remote VM's
                # objects hold the session in reference cycles, which only the collector frees
                del session
                gc.collect()
        try:
            return bounded(attempt, rpc.timeout + rpc.connect_timeout, f"{rpc}: {what}")
        except (RemoteError, OSError, RuntimeError) as e:
            errors.append(str(e))
    raise RemoteError(f"{rpc}: {what} failed on {attempts} attempts: {'; '.join(errors)}")


def board_side_by_side(calls: dict[str, BoardCall], rounds: int = 7, min_round_s: float = 0.1) -> dict[str, float]:
    """Median ms per call of each module on one board of the key, timed there by TVM's time_evaluator in
    interleaved rounds (each module in every position equally often: cost/clock.py's design), so the network is
    not in the figure. One session for all of them: the modules are compared on the same board."""
    from ..cost.clock import balanced_orders
    import statistics
    rpc = next(iter(calls.values())).function.rpc
    names = list(calls)
    libraries = {name: call.function.library for name, call in calls.items()}

    def work(session):
        timers = {}
        for name, call in calls.items():
            vm, dev = _load(session, libraries[name])
            vm.set_input("main", *[_remote(session, dev, a) for a in call.inputs])
            timers[name] = (vm, dev)
        def seconds(name, number):
            vm, dev = timers[name]
            return vm.time_evaluator("invoke_stateful", dev, number=number, repeat=1)("main").mean
        numbers = {name: max(1, int(min_round_s / max(seconds(name, 1), 1e-7))) for name in names}
        samples = {name: [] for name in names}
        orders = balanced_orders(len(names))
        for r in range(-(-rounds // len(orders)) * len(orders)):
            for name in (names[i] for i in orders[r % len(orders)]):
                samples[name].append(seconds(name, numbers[name]) * 1e3)
        return {name: statistics.median(s) for name, s in samples.items()}
    return _with_retry(rpc, work, f"timing {', '.join(names)}")[0]


# --- MetaSchedule: candidates built here, measured on boards of the key ---------------------------------------
def with_board_cores(target, rpc: RPC):
    """The TVM target with the cores of a board of the key ("num-cores", which MetaSchedule's search needs), asked
    of the board where the target does not say (a cross target: this machine's count says nothing of the board)."""
    import tvm
    config = target.export()
    if config.get("num-cores"):
        return target
    cores = _with_retry(rpc, lambda session: int(session.get_function("runtime.NumThreads")()), "asking its cores")[0]
    return tvm.target.Target({**config, "num-cores": cores})


def export_shared(mod, cc: str | None = None) -> str:
    """MetaSchedule's export step for a board: a shared library linked here (by the target's cross compiler),
    which the board's server loads as it is (TVM's default, a .tar, would be linked on the board by its compiler)."""
    from tvm.support import cc as tvm_cc
    path = os.path.join(tempfile.mkdtemp(prefix="graphopt-ms-"), "candidate.so")
    mod.export_library(path, fcompile=tvm_cc.cross_compiler(cc) if cc else tvm_cc.create_shared)
    return path


@dataclass
class Tally:
    """What the boards measured: successful measurements per server, and the lost ones with why."""
    servers: Counter = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)   # per measurement: session, upload, run, on the board

    def lines(self, rpc: RPC) -> list[str]:
        per = ", ".join(f"{s} {n}" for s, n in sorted(self.servers.items())) or "none"
        mean = f"; {sum(self.seconds) / len(self.seconds):.2f} s per measurement" if self.seconds else ""
        lines = [f"measured on {rpc}: {sum(self.servers.values())} measurements (per server: {per}){mean}"]
        if self.lost:
            why = Counter(self.lost)
            lines.append(f"{len(self.lost)} measurements lost (recorded as failed runs, their candidates not kept): "
                         + "; ".join(f"{n}× {w}" for w, n in why.most_common(3)))
        return lines


def _measure(rpc: RPC, evaluator_config, alloc_repeat: int, artifact_path: str, device_type: str,
             args_info) -> tuple[list[float] | None, str | None, str | None, float]:
    """In a runner worker: one candidate measured on a board of the key, as MetaSchedule's RPC runner does it,
    with the server that measured it: (seconds, server, None, wall s) or (None, server or None, why, wall s)."""
    import time
    from tvm.s_tir.meta_schedule.runner import rpc_runner as r
    server, session, remote_path, t0 = None, None, None, time.perf_counter()
    try:
        session, server = rpc.session()
        device = session.device(device_type, 0)
        remote_path = os.path.basename(artifact_path)
        module = r.default_upload_module(session, artifact_path, remote_path)
        args = r.default_alloc_argument(session, device, args_info, alloc_repeat)
        costs = r.default_run_evaluator(session, module, device, evaluator_config, args)
        return costs, server, None, time.perf_counter() - t0
    except Exception as e:   # the board died, refused, or its session expired: reported, not raised
        return None, server, f"{type(e).__name__}: {first_line(e)}", time.perf_counter() - t0
    finally:
        if session is not None and remote_path is not None:
            try:
                session.remove(remote_path)
            except Exception:   # a dead board has nothing left to clean
                pass


def board_runner(rpc: RPC, workers: int, tally: Tally, evaluator_config=None):
    """MetaSchedule's RPC runner, measuring on `workers` boards of the key at a time, each measurement's server
    and every lost measurement counted in `tally`; a worker past rpc.timeout (+ the tracker's connect) is killed
    and its measurement lost."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import PyRunner, PyRunnerFuture, RunnerResult
    from tvm.s_tir.meta_schedule.runner.config import EvaluatorConfig
    from tvm.support.popen_pool import PopenPoolExecutor

    @derived_object
    class BoardFuture(PyRunnerFuture):
        def __init__(self, future):
            super().__init__()
            self.future = future

        def done(self) -> bool:
            return self.future.done()

        def result(self) -> RunnerResult:
            try:
                costs, server, why, seconds = self.future.result()
            except TimeoutError:
                costs, server, why = None, None, f"no answer within {rpc.timeout:g} s"
            except Exception as e:
                costs, server, why = None, None, f"{type(e).__name__}: {first_line(e)}"
            if costs is None:
                tally.lost.append(why if server is None else f"{server}: {why}")
                return RunnerResult(None, error_msg=f"graphopt board runner ({rpc}): {why}")
            tally.servers[server] += 1
            tally.seconds.append(seconds)
            return RunnerResult(costs, None)

    @derived_object
    class BoardRunner(PyRunner):
        def __init__(self):
            super().__init__()
            self.config = EvaluatorConfig._normalized(evaluator_config)
            self.pool = PopenPoolExecutor(max_workers=workers, timeout=rpc.timeout + rpc.connect_timeout)

        def run(self, runner_inputs):
            return [BoardFuture(self.pool.submit(_measure, rpc, self.config, 1, str(i.artifact_path),
                                                 str(i.device_type), tuple(a.as_json() for a in i.args_info)))
                    for i in runner_inputs]

        def shutdown(self):
            self.pool.shutdown()

    return BoardRunner()
