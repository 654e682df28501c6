"""The TVM backend (untuned default schedules): real models match eager through Relax; libraries
export for the host (loadable by the TVM runtime alone), cross-compile for arm64, and build for CUDA
without a GPU."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import graphopt
from graphopt import zoo
from conftest import assert_matches, fake_clock, need_module, need_tool

tvm = need_module("tvm")
from graphopt.backends import tvm as tvm_backend  # noqa: E402
from graphopt.backends.tvm import host_cores, tvm_target  # noqa: E402
from graphopt.backends.tvm_tune import target_folder  # noqa: E402
from graphopt.targets import get_target  # noqa: E402


@pytest.mark.parametrize("name", ["bert", "gpt2", "vit", "llama", "resnet", "mobilenet_v2"])
def test_model_matches_eager_on_tvm(name):
    model, inputs = zoo.build(name, size="tiny", batch=2)
    cm = graphopt.compile(model, inputs, backend="tvm")
    assert_matches(cm, model, inputs)


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_dynamic_batch_and_sequence_on_tvm(name):
    """TVM's import lost these models' shapes at a dynamic length (BERT's positions sliced to min(s, 512), GPT-2's
    mask: a cumsum of bools kept as bool, an index without a shape, then a segfault in R.where): compiled now, and
    a length beyond the bound torch.export proved (TVM plans memory for it) is refused, not read out of bounds."""
    from torch.export import Dim
    model, (x,) = zoo.build(name, size="tiny", batch=2)
    cm = graphopt.compile(model, (x,), dynamic_shapes=({0: Dim.DYNAMIC, 1: Dim.DYNAMIC},), backend="tvm")
    longer = x.repeat(3, 40)
    for batch, length in [(1, 1), (1, 20), (5, 7), (3, 64)]:
        assert_matches(cm, model, (longer[:batch, :length],))
    limits = {(i, d): n for i, d, n in cm.executable.limits}
    if name == "bert":   # 512 positions
        assert limits == {(0, 1): model.config.max_position_embeddings}
        with pytest.raises(graphopt.InputError, match="size 513 in dim 1; .* at most 512"):
            cm(x.repeat(1, 300)[:, :513])


def test_cumsum_of_bools_counts_in_int64_on_tvm():
    class Count(torch.nn.Module):
        def forward(self, x):
            return (x > 0).cumsum(-1), (x > 0).int().cumsum(0)
    x = torch.randn(3, 6)
    cm = graphopt.compile(Count().eval(), (x,), backend="tvm")
    for got, want in zip(cm(x), Count()(x)):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_tvm_runs_on_every_core():
    """TVM alone would take half the logical CPUs on x86 (one thread on a 2-vCPU machine)."""
    script = ("import torch, graphopt, tvm_ffi; m = torch.nn.Linear(4, 4).eval(); "
              "graphopt.compile(m, (torch.randn(2, 4),), backend='tvm')(torch.randn(2, 4)); "
              "print(tvm_ffi.get_global_func('runtime.NumThreads')())")
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    rows = subprocess.run(["lscpu", "-p=CPU,SOCKET,CORE"], capture_output=True, text=True, check=True).stdout
    mine = os.sched_getaffinity(0)                        # physical cores this process may use, per lscpu
    cores = len({tuple(r.split(",")[1:]) for r in rows.splitlines() if r[:1].isdigit() and int(r.split(",")[0]) in mine})
    assert int(out.stdout.split()[-1]) == cores


class Activations(torch.nn.Module):
    def forward(self, x):
        F = torch.nn.functional
        return (F.gelu(x), F.gelu(x, approximate="tanh"), torch.sigmoid(x), F.silu(x), torch.softmax(x, -1),
                torch.tanh(x), torch.exp(x.clamp(max=10)), x.clamp(-4, 4) ** 3)


def test_activations_use_vectorizable_fast_math_within_fp32_rounding():
    """LLVM would scalarize exp/tanh/erf into libm calls; graphopt writes every activation with TOPI's
    polynomial forms, which must stay within a few ulps of torch over the whole range."""
    from graphopt.backends.tvm_fast_math import fast_math
    from graphopt.codegen.relax import to_relax
    model, x = Activations().eval(), torch.linspace(-30, 30, 64 * 1024).reshape(64, 1024)
    cm = graphopt.compile(model, (x,), backend="tvm")
    lowered = fast_math(to_relax(cm.graph, (x,))).script()
    assert all(f in lowered for f in ("fast_erf", "fast_tanh", "fast_exp"))
    assert "R.nn.gelu" not in lowered and "R.sigmoid" not in lowered and "R.power" not in lowered
    for got, want in zip(cm(x), model(x)):
        assert ((got - want).abs() <= 2e-6 + 1e-6 * want.abs()).all()
    # attention (causal too, at static lengths) is written out, so its softmax takes the fast form
    for name in ("bert", "gpt2"):
        model, inputs = zoo.build(name, size="tiny", batch=2)
        cm = graphopt.compile(model, inputs, backend="tvm")
        lowered = fast_math(to_relax(cm.graph, inputs)).script()
        assert "R.nn.attention" not in lowered and "fast_softmax" in lowered, name
        assert_matches(cm, model, inputs)


def test_exported_library_runs_in_the_tvm_runtime_alone(tmp_path):
    from tvm import relax
    model, (x,) = zoo.build("resnet", size="tiny", batch=2)
    cm = graphopt.compile(model, (x,), backend="tvm")
    path = cm.export_library(tmp_path / "resnet.so")
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x.numpy()))
    np.testing.assert_allclose(out[0].numpy(), model(x).last_hidden_state.detach().numpy(), rtol=1e-4, atol=1e-4)
    with pytest.raises(graphopt.InputError, match="builds no library"):
        graphopt.compile(model, (x,)).export_library(tmp_path / "x.so")


def test_arm64_artifact_is_an_aarch64_elf(tmp_path):
    need_tool("aarch64-linux-gnu-gcc", "the arm64 cross compiler, Debian's gcc-aarch64-linux-gnu")
    model, inputs = zoo.build("mobilenet_v2", size="tiny", batch=1)
    cm = graphopt.compile(model, inputs, backend="tvm", target="arm64")
    path = cm.export_library(tmp_path / "m.so")
    assert path.read_bytes()[:4] == b"\x7fELF" and path.read_bytes()[18] == 183   # e_machine = EM_AARCH64
    assert "aarch64" in subprocess.run(["file", str(path)], capture_output=True, text=True).stdout
    with pytest.raises(graphopt.UnsupportedError, match="built for arm64"):
        cm(*inputs)


def no_gpu(monkeypatch):
    """This machine without a GPU, on any machine: graphopt asks torch whether there is one (targets.py)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


CUDA_KERNEL = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(')


def test_cuda_builds_without_a_gpu(tmp_path, monkeypatch):
    no_gpu(monkeypatch)
    model, inputs = zoo.build("bert", size="tiny", batch=1)
    cm = graphopt.compile(model, inputs, backend="tvm", target="cuda")
    lib = cm.export_library(tmp_path / "bert_cuda.so").read_bytes()
    # a shared object (ELF, e_type ET_DYN) for this machine's CPU (e_machine as the Python interpreter's own)...
    host = Path(os.path.realpath(sys.executable)).read_bytes()[:20]
    assert lib[:4] == b"\x7fELF" and lib[16:18] == b"\x03\x00" and lib[18:20] == host[18:20], lib[:20]
    assert b"__tvm_ffi__library_bin\0" in lib                      # ...carrying TVM's device modules,
    # the CUDA module defining every kernel the build launches (what TVM's CUDA runtime compiles on the GPU)
    kernels = set(CUDA_KERNEL.findall(cuda_source(cm)))
    assert len(kernels) >= 10 and set(CUDA_KERNEL.findall(lib.decode("latin-1"))) == kernels, kernels
    assert all(f"__tvm_ffi_{k.removesuffix('_kernel')}".encode() in lib for k in kernels)   # and their host launchers
    with pytest.raises(graphopt.UnsupportedError, match="built for cuda"):
        cm(*inputs)


def test_cuda_kernel_a_dlight_rule_fails_on_falls_back_to_the_next_and_says_so():
    # MobileNetV2's conv + bias + clip + next pad kernels make DLight's Matmul rule assert (TVM's own pipeline fails)
    model, inputs = zoo.build("mobilenet_v2", size="tiny", batch=1)
    cm = graphopt.compile(model, inputs, backend="tvm", target="cuda")
    fallbacks = [line for line in cm.executable.describe() if line.startswith("DLight fallback")]
    assert fallbacks and all("Matmul failed (AssertionError" in f and "scheduled by GeneralReduction" in f
                             for f in fallbacks), fallbacks
    backend_notes = cm.report[-1].notes
    assert any(n.startswith("DLight schedules: Matmul") for n in backend_notes), backend_notes


class Powers(torch.nn.Module):
    def forward(self, x):   # GPT-2's GELU cubes, Llama's and T5's RMSNorms square
        return x.pow(2), x ** 3, torch.pow(x, -2), x.pow(0), x.pow(0.5)


def cuda_source(cm) -> str:
    def modules(m):
        yield m
        for imported in m.imports:
            yield from modules(imported)
    return "".join(m.inspect_source() for m in modules(cm.executable.executable.mod) if m.kind == "cuda")


def test_whole_powers_are_products_which_cuda_fast_math_keeps_finite():
    """TVM compiles CUDA with --use_fast_math, where powf(x, n) is exp2(n · log2 x): NaN for every negative x (GPT-2
    and Llama returned NaN on an H200). Whole powers are products, exact on negative inputs; x ** 0.5 stays a pow."""
    model, x = Powers().eval(), -torch.rand(4, 8) - 0.5
    cm = graphopt.compile(model, (x,), backend="tvm")
    for got, want in zip(cm(x), model(x)):
        torch.testing.assert_close(got, want, equal_nan=True)
    source = cuda_source(graphopt.compile(model, (x,), backend="tvm", target="cuda"))
    assert source.count("powf(") == 1, re.findall(r".*powf\(.*", source)   # x ** 0.5 (NaN there in eager too)


def serially_on_the_cpu(mod):
    """A CUDA-scheduled module's kernels for the CPU: loops bound to GPU threads made serial, shared memory local.
    What the schedules compute, without the GPU's own lowering (warp shuffles, barriers) or its fast math."""
    def serial(func):
        text = re.sub(r'T\.thread_binding\(([^=]*?), thread="[^"]*"(, annotations=\{[^}]*\})?\)', r"T.serial(\1\2)",
                      func.script())
        return tvm.script.from_source(re.sub(r'scope="(shared|shared\.dyn|warp)"', 'scope="local"', text))
    for gv, func in list(mod.functions_items()):
        if isinstance(func, tvm.tirx.PrimFunc):
            mod[gv] = serial(func)
    return tvm.relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())


CUDA_ZOO = ["gpt2"] + [pytest.param(name, marks=pytest.mark.slow) for name in zoo.MODELS if name != "gpt2"]


@pytest.mark.parametrize("name", CUDA_ZOO)
def test_cuda_schedules_compute_what_eager_does(name):
    """Every kernel of the CUDA build as DLight (or its fallback rule: MobileNetV2, EfficientNet) scheduled it, run
    with its GPU loops serial on the CPU, gives eager's outputs: the schedules are right where no GPU is lent.
    GPT-2 fast: its softmax is a cross-thread reduction, its GELU a cube."""
    from graphopt.backends.tvm_cuda import ScheduleLog, scheduled
    from graphopt.codegen.relax import to_relax
    model, inputs = zoo.build(name, size="tiny", batch=2)
    cm = graphopt.compile(model, inputs, backend="tvm", target="cuda")
    mod = scheduled(to_relax(cm.graph, inputs, target="cuda"), tvm_target(get_target("cuda")), ScheduleLog())
    out = serially_on_the_cpu(mod)["main"](*[tvm.runtime.from_dlpack(t.contiguous()) for t in inputs])
    got = torch.from_dlpack(out if isinstance(out, tvm.runtime.Tensor) else out[0])
    want = model(*inputs)
    want = want if isinstance(want, torch.Tensor) else want[0]
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4


@pytest.mark.parametrize("name", ["resnet", "bert"])
def test_fp16_precision_computes_in_half_and_stays_close(name):
    """precision="fp16": Relax's mixed-precision rewrite, fp32 in and out; verify reports the step, unchecked."""
    model, inputs = zoo.build(name, size="tiny", batch=2)
    half = graphopt.compile(model, inputs, backend="tvm", precision="fp16", verify=True)
    full = graphopt.compile(model, inputs, backend="tvm")
    want = model(*inputs)
    want = want if isinstance(want, torch.Tensor) else want[0]
    got, exact = (m(*inputs) for m in (half, full))
    got, exact = (o if isinstance(o, torch.Tensor) else o[0] for o in (got, exact))
    assert got.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0).item()
    assert cosine > 0.999, cosine
    assert (got - want).abs().max() > 10 * (exact - want).abs().max()     # it did round: fp32's error is far smaller
    step = half.report[-1]
    assert "precision fp16: convs and matmuls in half precision, accumulating in fp32" in step.notes
    assert "not verified: the backend computes in fp16, lossy by design" in step.notes and step.checked is None


def test_cuda_build_replays_kernel_launches_as_cuda_graphs():
    """Batch-1 GPU inference is launch-bound: with static shapes the VM captures its launches once (built here
    without a GPU: the VM program calls TVM's CUDA-graph builtins); with dynamic shapes it cannot."""
    model, inputs = zoo.build("resnet", size="tiny", batch=1)
    static = graphopt.compile(model, inputs, backend="tvm", target="cuda", precision="fp16")
    assert "vm.builtin.cuda_graph.run_or_capture" in static.executable.executable.as_text()
    assert "CUDA graphs: the kernel launches are captured once and replayed" in static.report[-1].notes
    dynamic = graphopt.compile(model, inputs, backend="tvm", target="cuda", dynamic_shapes="batch")
    assert "cuda_graph" not in dynamic.executable.executable.as_text()
    assert "CUDA graphs: not used (dynamic shapes)" in dynamic.report[-1].notes


class TwoConvs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.Conv2d(16, 8, 1)

    def forward(self, x):
        return self.b(self.a(x).relu())


@pytest.mark.slow   # MetaSchedule tuning: 95 s alone, several minutes on a loaded 2-core machine
def test_tuning_database_is_reused_and_budget_respected(tmp_path, capsys, monkeypatch):
    model, x = TwoConvs().eval(), (torch.randn(1, 8, 16, 16),)
    db = tmp_path / "tuning-db"
    first = graphopt.compile(model, x, backend="tvm", tune=graphopt.Tune(trials=4, time_budget=600, db=db))
    notes = first.report[-1].notes
    assert "tuning: 8 trials" in notes[1] and "2 tasks tuned now, 0 from the database" in notes[1], notes
    assert "[graphopt tune] 2/2 tasks" in capsys.readouterr().err          # the progress line
    assert_matches(first, model, x)
    host = tvm_target(get_target("cpu"))
    assert (target_folder(db, host) / "database_tuning_record.json").stat().st_size > 0
    second = graphopt.compile(model, x, backend="tvm", tune=graphopt.Tune(trials=4, time_budget=600, db=db))
    assert "tuning: 0 trials" in second.report[-1].notes[1] and "2 from the database" in second.report[-1].notes[1]
    assert_matches(second, model, x)
    # the records are this target's: a machine with more cores finds none of them (its budget is spent, so it
    # keeps TVM's defaults rather than the 2-core schedules; MetaSchedule alone would have applied those)
    monkeypatch.setattr(graphopt.targets, "host_cores", lambda: host_cores() + 2)
    other = graphopt.compile(model, x, backend="tvm", tune=graphopt.Tune(trials=4, time_budget=0, db=db))
    assert "0 from the database" in other.report[-1].notes[1] and "2 on default schedules" in other.report[-1].notes[1]
    assert sorted(p.name for p in db.iterdir()) == sorted([target_folder(db, host).name,
                                                         target_folder(db, tvm_target(get_target("cpu"))).name])
    assert_matches(other, model, x)
    # a spent budget tunes nothing: every task keeps TVM's default schedule, and the numbers still hold
    broke = graphopt.compile(model, x, backend="tvm", tune=graphopt.Tune(trials=4, time_budget=0, db=tmp_path / "b"))
    assert "0 trials" in broke.report[-1].notes[1] and "2 on default schedules" in broke.report[-1].notes[1]
    assert_matches(broke, model, x)


def test_tune_needs_the_tvm_backend():
    with pytest.raises(graphopt.InputError, match="needs backend='tvm'"):
        graphopt.compile(TwoConvs().eval(), (torch.randn(1, 8, 4, 4),), backend="ort", tune=graphopt.Tune())


@pytest.mark.parametrize("faster", ["ort", "tvm"])
def test_auto_backend_keeps_the_faster_and_says_why(faster, tmp_path, monkeypatch):
    """With tune=, backend auto builds both and keeps the one the cost model's clock measures faster: the clock
    faked each way round, the choice and the report follow it. (The choice, not tuning, is under test: a spent
    budget builds TVM on its default schedules.)"""
    model, x = TwoConvs().eval(), (torch.randn(1, 8, 16, 16),)
    ms = {"ort": 1.0, "tvm": 4.0} if faster == "ort" else {"ort": 4.0, "tvm": 1.0}
    answered = fake_clock(monkeypatch, ms)
    plain = graphopt.compile(model, x, backend="auto")
    assert plain.backend == "ort" and any("without building TVM" in n for n in plain.report[-1].notes), \
        plain.report[-1].notes
    assert answered == []                                              # nothing to choose without tune=
    both = graphopt.compile(model, x, backend="auto", tune=graphopt.Tune(trials=4, time_budget=0, db=tmp_path / "db",
                                                                         progress=False))
    assert answered == [ms]
    decision = next(n for n in both.report[-1].notes if n.startswith("backend auto"))
    assert f"kept {'tuned TVM' if faster == 'tvm' else 'ONNX Runtime'} — measured ONNX Runtime {ms['ort']:.3g} ms, " \
           f"tuned TVM {ms['tvm']:.3g} ms per call" in decision, decision
    assert both.backend == faster
    assert type(both.executable.chosen).__name__ == {"ort": "OrtExecutable", "tvm": "TvmExecutable"}[faster]
    assert_matches(both, model, x)
    with pytest.raises(graphopt.InputError, match="backend='auto' chooses .* on target 'cpu'"):
        graphopt.compile(model, x, backend="auto", target="cuda")


def _fake_db(db, records: list[bytes]):
    db.mkdir()
    (db / "database_workload.json").write_bytes(b'["123", "QmYAAAAA"]\n')
    (db / "database_tuning_record.json").write_bytes(b"".join(records))


def test_tuning_database_cut_short_by_a_kill_is_repaired_and_damage_is_named(tmp_path):
    """A kill -9 mid-append leaves the last line cut short (MetaSchedule then fails to load the database with a
    parser error): that line is dropped, atomically; damage anywhere else is an InputError naming file and line."""
    from graphopt.backends.tvm_tune import check_database
    good = b'[0, [["trace"], [1e-05], null, null]]\n'
    _fake_db(tmp_path / "cut", [good, good, b'[0, [["tra'])
    assert check_database(tmp_path / "cut") == [
        "tuning database: dropped database_tuning_record.json's last line, cut short by an interrupted run"]
    assert (tmp_path / "cut" / "database_tuning_record.json").read_bytes() == good + good
    assert check_database(tmp_path / "cut") == []
    _fake_db(tmp_path / "mid", [good, b"[0, [[garbage\n", good])
    with pytest.raises(graphopt.InputError, match=r"database_tuning_record.json: line 2 is damaged.*delete the dir"):
        check_database(tmp_path / "mid")
    _fake_db(tmp_path / "dangling", [good, b'[3, [["trace"], [1e-05], null, null]]\n'])
    with pytest.raises(graphopt.InputError, match="line 2 names workload 3 but database_workload.json has 1"):
        check_database(tmp_path / "dangling")


def test_second_process_tuning_into_the_same_database_waits(tmp_path, capsys):
    """Two processes appending to one database could interleave lines: the second waits for the first."""
    import time
    db = tmp_path / "db"
    folder = target_folder(db, tvm_target(get_target("cpu")))   # the lock is the target's: others tune meanwhile
    folder.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(12)",
                               str(folder / ".lock")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    t0 = time.perf_counter()
    cm = graphopt.compile(TwoConvs().eval(), (torch.randn(1, 8, 8, 8),), backend="tvm",
                          tune=graphopt.Tune(trials=4, time_budget=0, db=db))
    holder.wait()
    err = capsys.readouterr().err
    assert "another process is tuning into" in err, (err, cm.report[-1].notes, time.perf_counter() - t0)
    assert time.perf_counter() - t0 >= 12 and "0 trials" in cm.report[-1].notes[1]


@pytest.mark.slow   # two MetaSchedule runs: ~2 minutes
def test_killed_tuning_run_then_resumed_run_reuses_the_finished_tasks(tmp_path):
    """kill -9 a process while it tunes (after its first task is in the database), cut the last line as a kill
    mid-append would, then compile again: the database opens, the finished task is reused, the rest tuned."""
    db = tmp_path / "db"
    script = ("import sys, torch, graphopt; sys.path.insert(0, sys.argv[2]); from test_tvm_backend import TwoConvs; "
              "graphopt.compile(TwoConvs().eval(), (torch.randn(1, 8, 16, 16),), backend='tvm', "
              "tune=graphopt.Tune(trials=4, time_budget=600, db=sys.argv[1]))")
    proc = subprocess.Popen([sys.executable, "-c", script, str(db), str(Path(__file__).parent)],
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "[graphopt tune] 1/2 tasks" in line:
            break
    proc.kill()
    proc.wait()
    records = target_folder(db, tvm_target(get_target("cpu"))) / "database_tuning_record.json"
    records.write_bytes(records.read_bytes() + b'[0, [["cut sh')           # what a kill mid-append leaves
    model, x = TwoConvs().eval(), (torch.randn(1, 8, 16, 16),)
    resumed = graphopt.compile(model, x, backend="tvm", tune=graphopt.Tune(trials=4, time_budget=600, db=db,
                                                                           progress=False))
    notes = resumed.report[-1].notes
    assert any("dropped database_tuning_record.json's last line" in n for n in notes), notes
    assert "1 from the database" in notes[1] or "2 from the database" in notes[1], notes
    assert_matches(resumed, model, x)


def test_each_target_tunes_into_a_folder_of_its_own():
    """MetaSchedule's database matches records by workload alone: the key is the folder."""
    import tvm
    def folder(**config):
        return target_folder(Path("db"), tvm.target.Target({"kind": "llvm", "mcpu": "znver3", "num-cores": 2} | config))
    assert folder() == folder() and folder().name.startswith("llvm-znver3-2cores-")
    assert len({folder(), folder(**{"num-cores": 16}), folder(mcpu="sapphirerapids"), folder(mattr=["+avx2"])}) == 4
    gpu = target_folder(Path("db"), tvm_target(get_target("cuda")))
    assert gpu.name.startswith("cuda-sm_") and gpu != target_folder(Path("db"), tvm_target(get_target("arm64")))


def test_cuda_reuses_a_database_tuned_on_a_gpu_machine_without_a_gpu(tmp_path, monkeypatch):
    """Tune once on the GPU machine, reuse anywhere: with time_budget=0 a CUDA build measures nothing, takes the
    records the database has (DLight schedules one kernel fewer) and DLight schedules the rest. The record stands
    for one a GPU machine's tuning leaves: a schedule trace for one conv kernel (DLight's Matmul rule's: MetaSchedule's
    own design space costs this machine minutes to import), its latency made up (this machine cannot measure).
    Tuning itself (time_budget > 0) needs the GPU."""
    from tvm.s_tir import dlight as dl
    from tvm.s_tir import meta_schedule as ms
    from graphopt.codegen.relax import to_relax
    no_gpu(monkeypatch)
    model, inputs = zoo.build("resnet", size="tiny", batch=1)
    reuse = graphopt.Tune(time_budget=0, db=tmp_path, progress=False)
    with pytest.raises(graphopt.UnsupportedError, match="measures kernels on the GPU.*time_budget=0"):
        graphopt.compile(model, inputs, backend="tvm", target="cuda", tune=graphopt.Tune(db=tmp_path))

    def dlight_kernels(cm) -> int:
        line = next(n for n in cm.report[-1].notes if n.startswith("DLight schedules: "))
        return sum(int(count) for count in re.findall(r" (\d+)", line))
    untuned = graphopt.compile(model, inputs, backend="tvm", target="cuda", tune=reuse)
    assert any(n.startswith("tuning: 0 trials") and "0 from the database" in n for n in untuned.report[-1].notes)

    target = tvm_target(get_target("cuda"))
    with target:
        mod = tvm.transform.Sequential([tvm.relax.transform.DecomposeOpsForInference(), tvm.relax.get_pipeline("zero")])(
            to_relax(untuned.graph, inputs, target="cuda"))
    task = next(t for t in ms.relax_integration.extract_tasks(mod, target) if "conv2d" in t.task_name)
    trace = dl.gpu.Matmul().apply(task.dispatched[0]["main"], target, False).trace
    database = ms.database.JSONDatabase(work_dir=str(target_folder(tmp_path, target)))
    database.commit_tuning_record(ms.database.TuningRecord(trace, database.commit_workload(task.dispatched[0]),
                                                           run_secs=[1e-5], target=target))
    reused = graphopt.compile(model, inputs, backend="tvm", target="cuda", tune=reuse)
    notes = reused.report[-1].notes
    assert f"from database: {task.task_name}" in notes and dlight_kernels(reused) == dlight_kernels(untuned) - 1, notes


def test_tuning_budget_is_shared_between_tasks():
    """Depth gives way to breadth: `trials` each while the budget covers every task left, then an even share,
    at least MIN_TRIALS, and nothing once even that does not fit (the task keeps TVM's default schedule)."""
    from graphopt.backends.tvm_tune import MIN_TRIALS, trials_for
    assert trials_for(64, 100.0, 5, None) == 64 and trials_for(64, 0.0, 5, None) == 0   # nothing measured yet
    assert trials_for(64, 10_000.0, 5, 1.0) == 64                                      # the budget covers all
    assert trials_for(64, 100.0, 5, 1.0) == 20                                          # an even share
    assert trials_for(64, 20.0, 5, 1.0) == MIN_TRIALS                                   # never below one round
    assert trials_for(64, MIN_TRIALS - 1, 5, 1.0) == 0                                  # not even that: none
