"""The cost model: every measured decision for one (target, backend), made on that target's device with
that backend.

compile() builds one per compile (`Backend.cost_model`) and hands it to the passes (`ctx.cost`) and the
backend (`BuildInputs.cost`); passes never time anything themselves. Graphs and probe modules are timed as
the backend will run them: lowered to ONNX Runtime on the target's providers for "ort", built by TVM (the
backend's own `lower`) for "tvm", so a decision for `backend="tvm"` is measured on TVM and one for `cuda` on
the GPU; one it cannot measure from this machine (`arm64`, or `cuda` without a GPU) is refused by
`unmeasurable` rather than made on the wrong device — unless the target carries an RPC device (`Target.rpc`): then
TVM builds are timed on a board of its key, by TVM's time_evaluator there (distributed/rpc.py), whatever the target,
and those verdicts are keyed by the device key, apart from this machine's. Verdicts — probe results and graph timings — are cached for
the process and on disk (cost/verdicts.py), keyed by target, backend, ISA, library versions and what was measured;
`ledger` lists each verdict a compile asked for, measured or from the cache, for the report."""
from __future__ import annotations

import hashlib
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch

from ..sessions import ort_session
from ..targets import Target
from . import probes
from .clock import Apart, median_run_seconds, time_side_by_side
from .fft import RATE_KINDS, Conv2dShape, ConvShape, Decision, decide, rate_probes
from .verdicts import MISSING, VerdictStore, default_path, graph_signature, key_of, lowering_key

_VERDICTS: dict[str, object] = {}          # this process's verdicts, by key
_STORES: dict[str, VerdictStore] = {}      # one open store per path


@dataclass
class Lowering:
    """An IR graph's ONNX lowering as the ORT backend runs it: the model, what ORT's session takes for it, its
    external weights (views of the graph's tensors), the example inputs' feeds and the ORT fusions to disable."""
    model: onnx.ModelProto
    source: Any
    weights: dict
    feeds: dict
    disabled: tuple[str, ...]


LOWERINGS_KEPT = 2    # a two-way decision's graphs: the backend builds the one kept from its lowering


@dataclass
class Entry:
    """One verdict a compile asked for: measured now (and how long that took) or read from the cache."""
    name: str
    seconds: float
    cached: bool


BACKEND_NAMES = {"ort": "ONNX Runtime", "tvm": "TVM"}
# a decision's timing stops early once its systems are this far apart, every sample of one beyond every sample of the
# other (clock.Apart): past every margin a decision applies (sparse kernels 1/0.9, fusions 1.1, 1/0.97); a decision
# that states its own margin (clock.Decided) gives its own rule to graphs_ms
CLEARLY_APART = Apart(1.15)

# (graph, args, kwargs) → a callable taking the graph's flat inputs: how a backend other than ORT builds a graph
Lower = Callable[[Any, tuple, dict], Callable[[list], Any]]


class CostModel:
    def __init__(self, target: Target, backend: str = "ort", lower: Lower | None = None):
        if backend not in BACKEND_NAMES or (backend != "ort" and lower is None):
            raise ValueError(f"a cost model measures on 'ort', or on 'tvm' given its lowering; got {backend!r}")
        self.target, self.backend, self._lower = target, backend, lower
        self.providers = target.providers
        isa = hashlib.sha1(" ".join(sorted(target.features)).encode()).hexdigest()[:8]
        versions = (ort.__version__, torch.__version__) + ((_tvm_version(),) if backend == "tvm" else ())
        remote = ("rpc", self.remote.key) if self.remote else ()    # boards' verdicts apart from this machine's
        self.key = (target.name, backend, target.arch, isa, *versions, *remote)
        self.ledger: list[Entry] = []   # every verdict asked for, in order
        # compile(measure=s): the seconds this compile may spend measuring (None: no limit); once spent, decisions
        # take their stated defaults, as for a target nothing can be timed on (`unmeasurable` says why)
        self.measure_budget: float | None = None
        self.spent_s = 0.0              # measuring wall time so far (nested verdicts counted once)
        self._measuring = 0
        self._asked: set[str] = set()
        self.on_measure: Callable[[str], None] = lambda text: None   # progress: what is being timed now
        self._kept: dict[str, Lowering] = {}   # the last graphs lowered to time them, for the backend (`lowering`)

    @property
    def store(self) -> VerdictStore:
        path = str(default_path())
        return _STORES.setdefault(path, VerdictStore(path))

    def __repr__(self) -> str:
        return f"CostModel(target={self.target}, backend={self.backend})"

    @property
    def remote(self):
        """The RPC device TVM builds are timed on (distributed.rpc.RPC), or None: here."""
        return self.target.rpc if self.backend == "tvm" else None

    @property
    def on(self) -> str:
        """Where decisions are timed, in words: the backend and the target ("TVM on cpu"; "TVM on arm64, measured on
        rpc 10.0.0.2:9190 key rk3588")."""
        where = f", measured on {self.remote}" if self.remote else ""
        return f"{BACKEND_NAMES[self.backend]} on {self.target}{where}"

    @property
    def unmeasurable(self) -> str | None:
        """Why nothing can be timed for this target and backend from this machine or its RPC device, or why nothing
        more may be timed in this compile (None: it can)."""
        if self.measure_budget is not None and self.spent_s >= self.measure_budget:
            return (f"compile's measure budget of {self.measure_budget:g} s is spent ({self.spent_s:.1f} s measured); "
                    "give a larger measure= to measure more")
        if self.backend == "ort":
            why = self.target.ort_unavailable()
            return why and why + (" (an RPC device times TVM builds: give backend='tvm')" if self.target.rpc else "")
        return None if self.remote else self.target.unmeasurable

    def _verdict(self, name: str, args: tuple, compute: Callable[[], object]):
        """The verdict `name` for `args`: from this process, else from the store on disk, else measured (and
        kept in both)."""
        key = key_of(self.key, name, args)
        self._asked.add(name)
        value = _VERDICTS.get(key, MISSING)
        if value is MISSING:
            value = self.store.get(key)
        if value is MISSING:
            self.on_measure(f"measuring {name.replace('_', ' ')}")
            t0 = time.perf_counter()
            self._measuring += 1
            try:
                value = compute()
            finally:
                self._measuring -= 1
            seconds = time.perf_counter() - t0
            self.spent_s += seconds if not self._measuring else 0.0
            self.ledger.append(Entry(name, seconds, False))
            self.store.put(key, value)
        else:
            self.ledger.append(Entry(name, 0.0, True))
        _VERDICTS[key] = value
        return value

    def measured(self, name: str) -> bool:
        """Whether verdict `name` is known in this process (its notes cite the rates then)."""
        return name in self._asked

    # --- the clock, on this target --------------------------------------------------------------
    def seconds(self, model: bytes, feeds: dict, **options) -> float:
        """Median seconds per run of an ONNX model on the target's providers."""
        return median_run_seconds(model, feeds, providers=self.providers, **options)

    def module_seconds(self, module: torch.nn.Module, x: torch.Tensor) -> float:
        """A torch module with graphopt ops (a probe), built as the backend builds it and timed on the target."""
        if self.backend == "ort":
            model = _exported(module, x)
            return self.seconds(model.SerializeToString(), {model.graph.input[0].name: x.numpy()})
        return _alone_ms(self._module_runner(module, x)) / 1e3

    def modules_seconds(self, modules: dict[str, torch.nn.Module], x: torch.Tensor) -> dict[str, float]:
        """Probe modules built and timed side by side in interleaved rounds (see graphs_ms)."""
        runners = {name: self._module_runner(module, x) for name, module in modules.items()}
        return {name: us / 1e6 for name, us in self._interleaved_us(runners).items()}

    def _module_runner(self, module: torch.nn.Module, x: torch.Tensor) -> Callable[[], Any]:
        if self.backend == "ort":
            model = _exported(module, x)
            return self._runner(model.SerializeToString(), {model.graph.input[0].name: x.numpy()})
        from ..capture import capture
        return self._graph_runner(capture(module.eval(), (x,), {}, None), (x,), {})

    def _runner(self, model: bytes, feeds: dict, disabled: tuple[str, ...] = (), optimize: bool = True) -> Callable:
        session = ort_session(model, self.providers, optimize=optimize, disabled=disabled)
        return lambda: session.run(None, feeds)

    def _interleaved_us(self, runners: dict[str, Callable[[], Any]], stop: Callable = CLEARLY_APART
                        ) -> dict[str, float]:
        """µs per call of each runner, timed side by side in interleaved rounds until `stop` holds: a decision
        between two kernels timed one after the other follows the machine's load instead of the kernels."""
        return {name: ms * 1e3 for name, ms in _clock(runners, rounds=7, min_round_s=0.1, stop=stop).items()}

    def _graph_runner(self, graph, args: tuple, kwargs: dict | None, lowered: Lowering | None = None
                      ) -> Callable[[], Any]:
        """A no-argument call of an IR graph as the backend runs it (on ORT, from `lowered` where given)."""
        if self.backend == "ort":
            lowered = lowered or self._lowered(graph, args, kwargs)
            return self._runner(lowered.source, lowered.feeds, lowered.disabled)
        run, flat = self._lower(graph, args, kwargs or {}), graph.flat_inputs(args, kwargs or {})
        bind = getattr(run, "bind", None)     # a build on a board: a call the board's clock times
        return bind(flat) if bind is not None else (lambda: run(flat))

    def graph_ms(self, graph, args: tuple, kwargs: dict | None = None) -> float:
        """Milliseconds per call of an IR graph as the backend runs it."""
        def measure():
            if self.backend == "ort":
                lowered = self._lowered(graph, args, kwargs)
                return self.seconds(lowered.source, lowered.feeds, disabled=lowered.disabled) * 1e3
            return _alone_ms(self._graph_runner(graph, args, kwargs))
        return self._verdict("graph_ms", (graph_signature(graph, args, kwargs),), measure)

    def graphs_ms(self, graphs: dict[str, object], args: tuple, kwargs: dict | None = None,
                  stop: Callable = CLEARLY_APART, derived: dict[str, Callable] | None = None) -> dict[str, float]:
        """Milliseconds per call of IR graphs as the backend runs them, timed side by side in interleaved
        rounds until `stop` holds (a two-way decision gives its margin: clock.Decided): a choice between near-equal
        graphs timed one after the other followed the machine's load (the digits ResNet's conv epilogues: 51 vs
        53 ms measured apart, 59 vs 56 ms side by side). `derived`: graph name → an ONNX rewrite that makes that
        graph's ORT lowering from the first graph's, one export for both (each a second or more)."""
        derived = (derived or {}) if self.backend == "ort" else {}

        def measure():
            lowered = self._lowered_all(graphs, args, kwargs, derived) if self.backend == "ort" else {}
            runners = {name: self._graph_runner(graph, args, kwargs, lowered.get(name))
                       for name, graph in graphs.items()}
            return {name: us / 1e3 for name, us in self._interleaved_us(runners, stop).items()}
        signature = _signatures(graphs, args, kwargs) + ((repr(stop),) if stop != CLEARLY_APART else ()) + \
            ((("derived", *sorted(derived)),) if derived else ())
        return self._verdict("graphs_ms", signature, measure)

    def compiled_alike(self, graphs: dict[str, object], args: tuple, kwargs: dict | None = None,
                       derived: dict[str, Callable] | None = None) -> bool:
        """Whether the backend compiles these graphs (`derived`: as in graphs_ms) to the same program, so that timing
        them could only measure noise: on ONNX Runtime, whether its optimizer makes the same kernels of each (the
        nodes of the optimized models, with their attributes). MobileNetV2's conv epilogues as FusedConv or as Conv +
        Clip: the same 52 NCHWc convs, 35 with a Clip in them, timed 0.48 against 0.65 ms in one process and 0.48
        against 0.47 in the next. On TVM: False, not compared."""
        if self.backend != "ort":
            return False

        def compare():
            lowered = self._lowered_all(graphs, args, kwargs, derived or {})
            return len({_ort_program(low, self.providers) for low in lowered.values()}) == 1
        signature = _signatures(graphs, args, kwargs) + (("derived", *sorted(derived or {})),)
        return self._verdict("compiled_alike", signature, compare)

    def summary(self, since: int = 0) -> str | None:
        """The ledger from entry `since` in one line for a step's notes (None: nothing was asked)."""
        entries = self.ledger[since:]
        if not entries:
            return None
        measured = [e for e in entries if not e.cached]
        cached = len(entries) - len(measured)
        parts = ([f"{len(measured)} measured on {self.on} ({sum(e.seconds for e in measured):.1f} s: "
                  f"{', '.join(sorted({e.name for e in measured}))})"] if measured else []) + \
                ([f"{cached} from the cache ({self.store.path})"] if cached else [])
        return "cost model verdicts: " + "; ".join(parts)

    def _lowered_all(self, graphs: dict[str, object], args: tuple, kwargs: dict | None,
                   derived: dict[str, Callable]) -> dict[str, Lowering]:
        """The ORT lowerings of `graphs`, those named in `derived` rewritten from the first one's."""
        first = self._lowered(next(iter(graphs.values())), args, kwargs)
        return {name: self._lowered(graph, args, kwargs, (first, derived[name]) if name in derived else None)
                for name, graph in graphs.items()}

    def _lowered(self, graph, args: tuple, kwargs: dict | None, derive=None) -> Lowering:
        """An IR graph as the ORT backend runs it: exported, or with `derive` = (the lowering of another graph, an
        ONNX rewrite of it), that rewrite (the same weights). The last LOWERINGS_KEPT are kept for the backend."""
        from ..codegen.external import checked_source
        from ..codegen.onnx import to_onnx
        key = lowering_key(graph, args, kwargs)
        if key in self._kept:
            return self._kept[key]
        if derive is None:
            weights = {}                  # its weights beside its bytes (codegen/external.py)
            model, source = to_onnx(graph, args, kwargs or {}, weights=weights)
        else:
            base, rewrite = derive
            model, weights = rewrite(base.model) or base.model, base.weights
            source = checked_source(model, weights)
        flat = graph.flat_inputs(args, kwargs or {})
        feeds = {i.name: t.detach().numpy() for i, t in zip(model.graph.input, flat)}
        lowered = Lowering(model, source, weights, feeds, tuple(name for name, *_ in self.slow_fusions(model)))
        self._kept = {**dict(list(self._kept.items())[1 - LOWERINGS_KEPT:]), key: lowered}
        return lowered

    def lowering(self, graph, args: tuple, kwargs: dict | None, dynamic_shapes=None) -> Lowering | None:
        """The lowering a measurement made of exactly this graph (its ops, and its weights the same tensors, unchanged
        since), for the ORT backend to build from instead of exporting again; None where there is none. Taking one
        lets go of the rest."""
        if not self._kept or dynamic_shapes is not None:
            return None
        found = self._kept.get(lowering_key(graph, args, kwargs))
        self._kept = {}
        return found

    def compare(self, systems: dict[str, Callable], args: tuple) -> dict[str, float]:
        """Median ms per call of each callable on the same inputs (interleaved rounds of at least 0.2 s:
        with 0.05 s rounds tuned TVM measured 0.66-0.75 ms per call on bench_tvm's chain workload against
        0.33-0.35 ms with 0.2 s rounds, its thread pool waking after each pause)."""
        return time_side_by_side(systems, args, rounds=7, min_round_s=0.2)

    # --- FFT convolution: direct vs matmul-FFT ---------------------------------------------------
    def fft_rates(self, kinds: tuple[str, ...] | None = None) -> dict[str, float]:
        """Multiply-adds per second of the convolution forms `kinds` (default: every form), each probed once on the
        target: a decision needs only its own two, so a model of depthwise 2-D convs never pays for the 1-D probes
        (each a session and a timing; on TVM a build too). On ORT each probe is written directly in ONNX, the FFT ones
        from their op's own lowering (probes.fft_op), so no probe waits on torch.onnx's exporter."""
        def measure(kind):
            module, x, macs = rate_probes()[kind]       # built only when a rate is not known yet
            if self.backend != "ort":
                return macs / self.module_seconds(module, x)
            model = probes.same_conv(module, x.numpy()) if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d)) \
                else probes.fft_op(module.op, module.args, x.numpy())
            return macs / self.seconds(*model, round_s=0.05)
        return {kind: self._verdict("fft_rate", (kind,), lambda kind=kind: measure(kind))
                for kind in (kinds or RATE_KINDS)}

    def fft_decision(self, shape: ConvShape | Conv2dShape) -> Decision:
        """The cheaper form at the rates probed on the backend. TVM runs 1-D FFT convs as graphopt's fused kernel
        (what its "fft" probe times) only for depthwise convs of period ≥ 64; the rest would take the Monarch form,
        whose rate is not probed there, so they stay direct rather than be priced at another kernel's rate."""
        d = decide(shape, self.fft_rates((shape.direct_rate, shape.fft_rate)))
        if self.backend == "tvm" and isinstance(shape, ConvShape) and not (
                shape.depthwise and math.prod(shape.fft_size()[1]) >= 64 and not self.target.gpu):
            return Decision("direct", d.direct_ms, float("inf"), d.period)
        return d

    # --- int8 conv kernels: symmetric conv vs im2col + int8 GEMM ---------------------------------
    def int8_conv_gemm_path(self, n: int, c_in: int, h: int, w: int, c_out: int, kh: int, kw: int, stride: tuple,
                            padding: tuple, dilation: tuple, groups: int, w_max: int = 127) -> tuple[bool, str]:
        """(use it, why): whether this conv should run in ORT with a nonzero weight zero point (im2col + QGEMM,
        which has AMX kernels) rather than zero point 0 (MLAS's symmetric conv kernel). The same int8 weights
        can be given either way (q with zero point 0, or q − 1 with zero point −1), so it is timed both ways,
        and kept only if both give the same integers: a path
        could compute different numbers (int16 saturation), so a wrong kernel is never chosen for being fast."""
        if self.backend != "ort":
            return False, f"{BACKEND_NAMES[self.backend]} does not run ONNX Runtime's int8 conv kernels"

        def measure():
            x = np.random.default_rng(0).standard_normal((n, c_in, h, w)).astype(np.float32)
            models = {zp: probes.qdq_conv(x.shape, c_out, kh, kw, stride, padding, dilation, groups, zp, w_max)
                      for zp in (0, probes.SHIFT)}
            outs = {zp: ort_session(m, self.providers).run(None, {"x": x})[0]
                    for zp, m in models.items()}
            wrong = np.abs(outs[0].astype(np.int32) - outs[probes.SHIFT].astype(np.int32)).max()
            if wrong > 1:
                return False, (f"ORT's int8 GEMM path (weight zero point {probes.SHIFT}) computed outputs up to "
                               f"{wrong} steps away from its conv kernel on the same numbers here: not used")
            times = self._interleaved_us({zp: self._runner(m, {"x": x}) for zp, m in models.items()})
            use = times[probes.SHIFT] < 0.95 * times[0]
            return use, (f"ORT's int8 GEMM path {times[probes.SHIFT]:.0f} µs vs its symmetric conv kernel "
                         f"{times[0]:.0f} µs for this shape")
        return self._verdict("int8_conv_gemm_path", (n, c_in, h, w, c_out, kh, kw, stride, padding, dilation, groups,
                                                     w_max), measure)

    def int8_weight_max(self) -> tuple[int, str | None]:
        """(largest |int8 weight| to emit, why when not 127). On x86 without VNNI, ORT's u8×s8 kernels add
        pairs of products in int16 (vpmaddubsw), which saturates for |w| > 63 (ORT documents it and recommends
        `reduce_range`); a probe conv in ORT is compared with ONNX's reference evaluator, exact in numpy,
        rather than trusting an ISA list (measured here, AVX2: 10 steps off on the probe at 127, exact at 63)."""
        def check():
            if self.backend != "ort" or not self.target.host:   # TVM accumulates int8 products in int32
                return 127, None
            from onnx.reference import ReferenceEvaluator
            x = np.random.default_rng(3).uniform(-2.5, 2.5, (1, 64, 8, 8)).astype(np.float32)
            model = probes.qdq_conv(x.shape, 16, 3, 3, (1, 1), (1, 1), (1, 1), 1, 0, output_scale=1.0)
            got = ort_session(model, self.providers).run(None, {"x": x})[0].astype(np.int32)
            want = ReferenceEvaluator(onnx.load_from_string(model)).run(None, {"x": x})[0].astype(np.int32)
            off = int(np.abs(got - want).max())
            if off <= 1:
                return 127, None
            return 63, (f"int8 weights in [-63, 63]: ONNX Runtime's u8×s8 kernels on this CPU computed a probe conv "
                        f"{off} steps off with full-range weights (int16 saturation without VNNI; ORT's reduce_range)")
        return self._verdict("int8_weight_max", (), check)

    # --- ORT's own fusions: kept only where their kernel is faster -------------------------------
    def fusion_timings(self, model: onnx.ModelProto) -> tuple[tuple[str, float, float], ...]:
        """(ORT optimizer name, fused µs, unfused µs) for each ORT fusion that can apply to `model` (it holds an op
        the fusion rewrites), measured on this target's probes: ORT fuses patterns at session creation whether or
        not its fused kernel is faster (on this project's x86-64 machine SkipLayerNormalization runs ~6× slower
        than the Add + LayerNormalization it replaces). A CNN holds neither pattern and is spared both probes."""
        if self.backend != "ort" or not self.target.host or self.unmeasurable:
            return ()           # ORT's fusions as ORT applies them
        present = {n.op_type for n in model.graph.node} | {n.op_type for f in model.functions for n in f.node}
        timings = tuple((name, *self._verdict("fusion_timing", (name,), lambda name=name: self._fusion_timing(name)))
                        for name, ops in probes.FUSED_OPS.items() if ops & present)
        return timings + (self._verdict("int8_fusion_timings", (), self._int8_fusion_timings)
                          if _has_int8_matmul(model) else ())

    def slow_fusions(self, model: onnx.ModelProto, margin: float = 1.1) -> tuple[tuple[str, float, float], ...]:
        """The fusions to disable for `model`: their fused kernel measured over `margin` × the unfused ops."""
        return tuple(t for t in self.fusion_timings(model) if t[1] > margin * t[2])

    def _fusion_timing(self, name: str) -> tuple[float, float]:
        """(fused µs, unfused µs) of ORT fusion `name` on its probe pair."""
        rng = np.random.default_rng(1)
        feeds = {n: rng.standard_normal((probes.ROWS, probes.HIDDEN)).astype(np.float32) for n in ("x", "s")}
        fused, unfused = probes.fusion_pairs()[name]
        us = self._interleaved_us({"fused": self._runner(fused, feeds, optimize=False),
                                   "unfused": self._runner(unfused, feeds, optimize=False)})
        return us["fused"], us["unfused"]

    def _int8_fusion_timings(self) -> tuple:
        model, feeds = probes.qdq_linear()
        us = self._interleaved_us({"fused": self._runner(model, feeds),
                                   "unfused": self._runner(model, feeds, disabled=("MatMulAddFusion",))})
        return (("MatMulAddFusion", us["fused"], us["unfused"]),)

    # --- sparsity: block-sparse and N:M linears against dense ------------------------------------
    def sparse_linear_choice(self, rows: int, in_f: int, out_f: int, k: int, block: tuple[int, int]) -> tuple[float, float]:
        """(block-sparse seconds, dense seconds) on the target for a linear [out_f, in_f] applied to `rows` rows
        whose weight keeps `k` (bh × bw) blocks per block row, each form exported as graphopt lowers it."""
        def measure():
            dense, sparse, x = probes.sparse_linear_modules(rows, in_f, out_f, k, block)
            s = self.modules_seconds({"sparse": sparse, "dense": dense}, x)
            return s["sparse"], s["dense"]
        return self._verdict("sparse_linear", (rows, in_f, out_f, k, tuple(block)), measure)

    def nm_linear_choice(self, rows: int, in_f: int, out_f: int, n: int, m: int) -> tuple[float | None, float, str]:
        """(sparse seconds or None, dense seconds, why) for an N:M linear: ORT's only sparse matmul
        (com.microsoft.SparseToDenseMatMul, the weight as a sparse initializer) against a dense MatMul."""
        def measure():
            if self.backend != "ort":
                dense = torch.nn.Linear(in_f, out_f)
                return None, self.module_seconds(dense, torch.randn(1, rows, in_f)), \
                    f"{BACKEND_NAMES[self.backend]} has no sparse matmul"
            dense, sparse, feeds = probes.sparse_to_dense_matmul(rows, in_f, out_f, n, m)
            try:
                sparse_run = self._runner(sparse, feeds)
                sparse_run()
            except Exception as e:   # ORT rejects the model: it turns sparse initializers into dense ones
                msg = str(e).splitlines()[0]
                return None, self.seconds(dense, feeds), "ONNX Runtime refused it: " + msg[msg.find("Type Error"):][:110]
            us = self._interleaved_us({"sparse": sparse_run, "dense": self._runner(dense, feeds)})
            return us["sparse"] / 1e6, us["dense"] / 1e6, "SparseToDenseMatMul ran"
        return self._verdict("nm_linear", (rows, in_f, out_f, n, m), measure)


def _exported(module: torch.nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    from ..codegen.registry import reused
    from ..ops import onnx_translation_table
    from ..quiet import quiet
    with quiet(stdout=True), reused():
        return torch.onnx.export(module.eval(), (x,), dynamo=True,
                                 custom_translation_table=onnx_translation_table()).model_proto


def _signatures(graphs: dict[str, object], args: tuple, kwargs: dict | None) -> tuple:
    return tuple((name, graph_signature(graph, args, kwargs)) for name, graph in graphs.items())


def _ort_program(lowered: Lowering, providers) -> tuple:
    """What ONNX Runtime's optimizer makes of a lowering: its optimized model's nodes (domain, op, inputs given,
    attributes), sorted. ORT writes the model only to a file: a directory of its own, deleted after."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "optimized.onnx"
        ort_session(lowered.source, providers, disabled=lowered.disabled, save_optimized=path)
        model = onnx.load(str(path), load_external_data=False)
    return tuple(sorted((n.domain, n.op_type, sum(bool(i) for i in n.input),
                         tuple(sorted((a.name, str(onnx.helper.get_attribute_value(a))) for a in n.attribute)))
                        for n in model.graph.node))


def _alone_ms(run: Callable[[], Any]) -> float:
    """Median ms per call of one no-argument runner (a backend build without ORT's own clock)."""
    return _clock({"run": run}, rounds=3, min_round_s=0.1)["run"]


def _clock(runners: dict[str, Callable[[], Any]], rounds: int, min_round_s: float, stop: Callable = CLEARLY_APART
           ) -> dict[str, float]:
    """Median ms per call of no-argument runners in interleaved rounds: here (clock.time_side_by_side), or, for
    builds on a board of an RPC device, by TVM's clock on that board (distributed.rpc.board_side_by_side)."""
    from ..distributed.rpc import BoardCall, board_side_by_side
    if any(isinstance(r, BoardCall) for r in runners.values()):
        return board_side_by_side(runners, rounds=rounds, min_round_s=min_round_s)
    return time_side_by_side(runners, (), rounds=rounds, min_round_s=min_round_s, stop=stop)


def _tvm_version() -> str:
    import tvm
    return tvm.__version__


def _has_int8_matmul(model: onnx.ModelProto) -> bool:
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return any(n.op_type == "MatMul" and dequantized & set(n.input) for n in model.graph.node)
