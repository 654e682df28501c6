"""Bad inputs and faults, one table: each case names the error class and the culprit the message must name, and
the harness checks what every case must keep — the error is a GraphoptError raised before any work (compile()
cases: before capture), every model the case handed to graphopt is bit-identical afterwards (its parameters and
buffers, their dtypes and devices, each submodule's training flag; for calls of the compiled module, the model it
was compiled from, the inputs given, and the module still computing the model's outputs), and nothing was written
outside the paths the case named (the working directory and the user's cache directory stay empty). CLI cases
must exit 2 with one `graphopt: error:` line and no traceback."""
import collections
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn as nn

import graphopt
import graphopt.api
from graphopt import GraphoptError, InputError, UnsupportedError
from graphopt.backends.tvm_tune import check_database
from graphopt.cli import main as cli
from graphopt.package import verify_artifact
from graphopt.passes import Pass, PassResult
from test_errors import Small


class Noop(Pass):
    name, phase, summary = "noop_for_tests", "rewrite", "does nothing"

    def run(self, graph, ctx):
        return PassResult()


X = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
X_VALUES = X.clone()       # what X holds: a case may hand graphopt X or a view of it, and must get it back unchanged


def state(model: nn.Module):
    """What must not change in a model graphopt was handed: each parameter and buffer (dtype, device,
    requires_grad, values) and each submodule's training flag."""
    return ({k: (v.dtype, v.device, v.requires_grad, v.detach().clone())
             for k, v in model.state_dict(keep_vars=True).items()}, [m.training for m in model.modules()])


def changes(model: nn.Module, before) -> list[str]:
    """What differs in `model` from `before` (a `state`): the names of the changed entries."""
    tensors, flags = before
    now = model.state_dict(keep_vars=True)
    changed = sorted(set(now) ^ set(tensors))
    for k, (dtype, device, grad, value) in tensors.items():
        v = now.get(k)
        if v is not None and ((v.dtype, v.device, v.requires_grad) != (dtype, device, grad)
                              or not torch.equal(v.detach(), value)):
            changed.append(k)
    return changed + (["training flags"] if [m.training for m in model.modules()] != flags else [])


@dataclass
class Shared:
    model: nn.Module       # the module's Small, compiled once
    before: tuple          # its state right after compile()
    cm: object             # the compiled module
    bundle: object         # a bundle folder exported from it


class Env:
    """What a case may use. Every model a case hands to graphopt goes through `use`, which records its state
    first (env.model, compile_'s model=, and env.compiled(): the model it was compiled from); the harness checks
    each recorded model afterwards."""

    def __init__(self, model: nn.Module, tmp, shared: Shared, bundle: Callable):
        self._model, self.tmp, self._shared = model, tmp, shared   # tmp: a Path the case may name
        self.bundle = bundle   # a bundle folder exported from the compiled Small (a fresh copy per call)
        self.used: dict[int, tuple[nn.Module, tuple]] = {}

    def use(self, model):
        if id(model) not in self.used:      # what is no nn.Module (a case's bad "model") has no state to keep
            self.used[id(model)] = (model, state(model) if isinstance(model, nn.Module) else None)
        return model

    @property
    def model(self) -> nn.Module:
        """A fresh Small for this case."""
        return self.use(self._model)

    def compiled(self):
        """The module's compiled Small (built once); the model it came from counts as used, checked against its
        state right after compile()."""
        self.used.setdefault(id(self._shared.model), (self._shared.model, self._shared.before))
        return self._shared.cm


@dataclass
class Case:
    kind: str              # api | call | artifact | tuning | cli
    id: str
    run: Callable[[Env], object]
    error: type = InputError
    match: str = ""
    before_capture: bool = True

    @property
    def hands_a_model(self) -> bool:
        """compile() cases and calls of the compiled module: the harness checks a model was used."""
        return getattr(self.run, "hands_a_model", False) or self.kind == "call"


def compile_(**kw):
    def run(env):
        model = env.use(kw["model"]) if "model" in kw else env.model
        options = {k: v for k, v in kw.items() if k not in ("model", "example")}
        return graphopt.compile(model, kw.get("example", (X,)), **options)
    run.hands_a_model = True
    return run


def train_mode(env):
    env.model.train()
    try:
        graphopt.compile(env.model, (X,))
    finally:
        env.model.eval()


train_mode.hands_a_model = True


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def manifest_edit(change):
    def run(env):
        folder = env.bundle()
        manifest = json.loads((folder / "manifest.json").read_text())
        change(folder, manifest)
        (folder / "manifest.json").write_text(json.dumps(manifest))
        return graphopt.load(folder)
    return run


def cli_case(id, argv, match, files=None):
    def run(env):
        for name, text in (files or {}).items():
            write(env.tmp / name, text)
        return cli([a.format(tmp=env.tmp) for a in argv])
    return Case("cli", id, run, SystemExit, match)


def failing_replace(env):
    """An artifact write that fails after the temporary file was written (disk full at the rename)."""
    path = env.tmp / "m.onnx"
    env.compiled().export_onnx(path)
    before = path.read_bytes()
    real = os.replace
    os.replace = lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device"))
    try:
        env.compiled().export_onnx(path)
    finally:
        os.replace = real
        assert path.read_bytes() == before and len(list(env.tmp.iterdir())) == 1   # old file kept, no partial left


def db_with(lines_workload, lines_record):
    def run(env):
        db = env.tmp / "db"
        write(db / "database_workload.json", "".join(x + "\n" for x in lines_workload))
        write(db / "database_tuning_record.json", "".join(x + "\n" for x in lines_record))
        return check_database(db)
    return run


CASES = [
    # --- compile(): the model and its example inputs ----------------------------------------------------
    Case("api", "model-not-a-module", compile_(model=lambda x: x), match="must be a torch.nn.Module"),
    Case("api", "model-in-training-mode", train_mode, match="training mode"),
    Case("api", "example-a-string", compile_(example="x"), match="example_inputs must be"),
    Case("api", "example-an-int", compile_(example=(X, 3)), match=r"example input .*\[1\].* is a int"),
    Case("api", "example-empty", compile_(example=()), match="example_inputs is empty"),
    Case("api", "example-wrong-dtype", compile_(example=(X.long(),)), match="'fc'"),
    Case("api", "example-wrong-width", compile_(example=(torch.randn(2, 5),)), match="'fc'"),
    Case("api", "example-a-scalar", compile_(example=(torch.tensor(1.0),)), match="'fc'"),
    Case("api", "example-extra-input", compile_(example=(X, X)), match="forward"),
    Case("api", "example-unknown-keyword", compile_(example={"y": X}), match="forward"),
    # --- compile(): target, backend, passes --------------------------------------------------------------
    Case("api", "target-unknown", compile_(target="tpu"), match="unknown target 'tpu'"),
    Case("api", "target-not-a-string", compile_(target=42), match="unknown target 42"),
    Case("api", "backend-unknown", compile_(backend="xla"), match="unknown backend 'xla'"),
    Case("api", "backend-auto-on-cuda", compile_(backend="auto", target="cuda"), match="backend='auto'"),
    Case("api", "passes-a-word", compile_(passes="fast"), match="passes='fast'"),
    Case("api", "passes-unknown-name", compile_(passes=["dce", "fuse_everything"]), match="unknown pass 'fuse_everything'"),
    Case("api", "passes-a-number", compile_(passes=[3]), match="pass names or graphopt.passes.Pass objects, got int"),
    Case("api", "passes-one-object", compile_(passes=Noop()), match="got Noop"),
    # --- compile(): numeric options ---------------------------------------------------------------------
    Case("api", "tolerance-nan", compile_(tolerance=math.nan), match="tolerance=nan"),
    Case("api", "tolerance-negative", compile_(tolerance=-1e-4), match="tolerance=-0.0001"),
    Case("api", "tolerance-zero", compile_(tolerance=0), match="tolerance=0"),
    Case("api", "tolerance-a-string", compile_(tolerance="1e-4"), match="tolerance='1e-4'"),
    Case("api", "tolerance-a-bool", compile_(tolerance=True), match="tolerance=True"),
    Case("api", "tolerance-infinite", compile_(tolerance=math.inf), match="tolerance=inf"),
    Case("api", "dynamic-shapes-a-word", compile_(dynamic_shapes="everything"), match="dynamic_shapes='everything'"),
    # --- compile(): quantization and calibration ---------------------------------------------------------
    Case("api", "quantize-unknown-mode", compile_(quantize="int3"), match="int3"),
    Case("api", "quantize-without-calibration", compile_(quantize="int8"), match="needs calibration"),
    Case("api", "calibration-a-tensor", compile_(quantize="int8", calibration=X), match="calibration= takes a list"),
    Case("api", "calibration-empty", compile_(quantize="int8", calibration=[]), match="calibration= is empty"),
    Case("api", "calibration-wrong-width", compile_(quantize="int8", calibration=[(torch.randn(2, 5),)]),
         match=r"calibration batch 0, input 0: got \(2, 5\)"),
    Case("api", "calibration-wrong-count", compile_(quantize="int8", calibration=[(X, X)]),
         match="calibration batch 0 has 2 positional"),
    Case("api", "calibration-wrong-dtype", compile_(quantize="int8", calibration=[(X.double(),)]),
         match="calibration batch 0, input 0: .*float64"),
    Case("api", "accuracy-budget-without-auto", compile_(quantize="int8", calibration=[(X,)], accuracy_budget=0.01),
         match="accuracy_budget= applies to quantize='auto'"),
    Case("api", "accuracy-budget-above-one", compile_(quantize="auto", calibration=[(X,)], accuracy_budget=2),
         match="accuracy_budget=2"),
    Case("api", "quantize-a-float64-model", compile_(model=Small().double().eval(), example=(X.double(),),
                                                    quantize="int8-dynamic"), UnsupportedError, "float32"),
    # --- compile(): tuning options ------------------------------------------------------------------------
    Case("api", "tune-with-ort", compile_(backend="ort", tune=graphopt.Tune(trials=8)), match="tune= takes a graphopt.Tune"),
    Case("api", "tune-a-dict", compile_(backend="tvm", tune={"trials": 8}), match="tune= takes a graphopt.Tune"),
    Case("api", "tune-for-arm64", compile_(backend="tvm", target="arm64", tune=graphopt.Tune(trials=8)),
         match="tune= on target arm64"),
    Case("api", "tune-trials-zero", lambda env: graphopt.Tune(trials=0), match=r"Tune\(trials=0\)"),
    Case("api", "tune-trials-fractional", lambda env: graphopt.Tune(trials=1.5), match=r"Tune\(trials=1.5\)"),
    Case("api", "tune-trials-bool", lambda env: graphopt.Tune(trials=True), match=r"Tune\(trials=True\)"),
    Case("api", "tune-budget-negative", lambda env: graphopt.Tune(time_budget=-1), match=r"time_budget=-1"),
    Case("api", "tune-budget-nan", lambda env: graphopt.Tune(time_budget=math.nan), match=r"time_budget=nan"),
    Case("api", "precision-unknown", compile_(precision="int8"), match="precision='int8': choose one of"),
    Case("api", "precision-fp16-on-ort", compile_(precision="fp16"), UnsupportedError, "precision='fp16' is implemented on backend='tvm'"),
    Case("api", "tune-db-a-number", lambda env: graphopt.Tune(db=3), match=r"Tune\(db=3\)"),
    # --- compile(): layer skipping and sparsity ------------------------------------------------------------
    Case("api", "layer-skip-a-number", compile_(layer_skip=0.01, calibration=[(X,)]), match="graphopt.LayerSkip"),
    Case("api", "layer-skip-budget-zero", lambda env: graphopt.LayerSkip(budget=0), match="budget"),
    Case("api", "layer-skip-budget-two", lambda env: graphopt.LayerSkip(budget=2), match="budget"),
    Case("api", "early-exit-bad-metric", lambda env: graphopt.EarlyExit(budget=0.01, metric="accuracy"),
         match="metric"),
    Case("api", "layer-skip-without-calibration", compile_(layer_skip=graphopt.LayerSkip(budget=0.01)),
         match="needs calibration"),
    Case("api", "early-exit-one-batch", compile_(early_exit=graphopt.EarlyExit(budget=0.01), calibration=[(X,)]),
         match="at least 2 calibration batches"),
    Case("api", "sparsity-a-string", compile_(sparsity="2:4"), match="graphopt.Sparsity"),
    Case("api", "sparsity-unknown-pattern", lambda env: graphopt.Sparsity("3:4:5"), match="'3:4:5'"),
    Case("api", "sparsity-ratio-above-one", lambda env: graphopt.Sparsity("structured", ratio=1.5),
         match="ratio=1.5"),
    Case("api", "sparsity-ratio-and-budget", lambda env: graphopt.Sparsity("structured", ratio=0.5, budget=0.01),
         match="not both"),
    Case("api", "sparsity-block-without-ratio", lambda env: graphopt.Sparsity("block"), match="needs ratio="),
    Case("api", "sparsity-block-shape", lambda env: graphopt.Sparsity("block", ratio=0.9, block=(0, 4)),
         match=r"block=\(0, 4\)"),
    Case("api", "sparsity-prune-without-calibration", compile_(sparsity=graphopt.Sparsity("2:4")),
         match="needs calibration"),
    # --- compile(): dump_dir and platform ------------------------------------------------------------------
    Case("api", "dump-dir-under-a-file", lambda env: compile_(dump_dir=write(env.tmp / "f", "") / "d")(env),
         match="dump_dir"),
    Case("api", "dump-dir-a-file", lambda env: compile_(dump_dir=write(env.tmp / "f", ""))(env),
         match="exists and is not a directory"),
    Case("api", "dump-dir-a-number", compile_(dump_dir=3), match="give a folder path"),
    Case("api", "bfloat16-on-ort", compile_(model=Small().to(torch.bfloat16).eval(), example=(X.bfloat16(),)),
         UnsupportedError, "bfloat16"),
    Case("api", "dynamic-batch-with-unknown-keyword", compile_(example={"y": X}, dynamic_shapes="batch"),
         match="example_inputs do not fit Small.forward: missing a required argument: 'x'"),
    # --- calling the compiled module ------------------------------------------------------------------------
    Case("call", "too-many-inputs", lambda env: env.compiled()(X, X), match=r"expected inputs \(x: float32\[2, 4\]\)"),
    Case("call", "no-inputs", lambda env: env.compiled()(), match=r"expected inputs \(x"),
    Case("call", "keyword-for-positional", lambda env: env.compiled()(x=X), match=r"expected inputs \(x"),
    Case("call", "a-list", lambda env: env.compiled()([X]), match="input x: expected a tensor, got list"),
    Case("call", "a-numpy-array", lambda env: env.compiled()(X.numpy()), match="input x: expected a tensor, got ndarray"),
    Case("call", "wrong-batch", lambda env: env.compiled()(torch.randn(3, 4)), match=r"got float32\[3, 4\]"),
    Case("call", "wrong-width", lambda env: env.compiled()(torch.randn(2, 5)), match=r"got float32\[2, 5\]"),
    Case("call", "wrong-dtype", lambda env: env.compiled()(X.double()), match="got float64"),
    Case("call", "wrong-rank", lambda env: env.compiled()(X[None]), match=r"got float32\[1, 2, 4\]"),
    Case("call", "meta-device", lambda env: env.compiled()(X.to("meta")), match="device meta"),
    # --- artifacts: writing, reading back ------------------------------------------------------------------
    Case("artifact", "onnx-missing-folder", lambda env: env.compiled().export_onnx(env.tmp / "no" / "m.onnx"),
         match="does not exist"),
    Case("artifact", "onnx-a-directory", lambda env: env.compiled().export_onnx(env.tmp), match="is a directory"),
    Case("artifact", "onnx-path-a-number", lambda env: env.compiled().export_onnx(3), match="give a file path"),
    Case("artifact", "onnx-under-a-file", lambda env: env.compiled().export_onnx(write(env.tmp / "f", "") / "m.onnx"),
         match="is not a folder"),
    Case("artifact", "onnx-write-fails", failing_replace, GraphoptError, "previous file, if any, is unchanged"),
    Case("artifact", "library-from-ort", lambda env: env.compiled().export_library(env.tmp / "m.so"),
         match="builds no library"),
    Case("artifact", "bundle-onto-a-file", lambda env: env.compiled().export(write(env.tmp / "f", "")),
         match="exists and is not a directory"),
    Case("artifact", "bundle-path-a-number", lambda env: env.compiled().export(3), match="give a folder path"),
    Case("artifact", "load-no-manifest", lambda env: graphopt.load(env.tmp), match="no manifest.json"),
    Case("artifact", "load-manifest-not-json",
         lambda env: graphopt.load(write(env.bundle() / "manifest.json", '{"format"').parent), match="not valid JSON"),
    Case("artifact", "load-other-format", manifest_edit(lambda f, m: m.update(format="onnx-zoo")),
         match="not a graphopt-segments manifest"),
    Case("artifact", "load-future-version", manifest_edit(lambda f, m: m.update(format_version=9)),
         match="not a graphopt-segments manifest"),
    Case("artifact", "load-manifest-missing-keys", manifest_edit(lambda f, m: m.pop("inputs")), match="lacks inputs"),
    Case("artifact", "load-changed-segment",
         manifest_edit(lambda f, m: (f / "segment0.onnx").write_bytes((f / "segment0.onnx").read_bytes() + b"\0")),
         match="segment0.onnx: its sha256 differs"),
    Case("artifact", "load-missing-segment", manifest_edit(lambda f, m: (f / "segment0.onnx").unlink()),
         match=r"segment0.onnx: missing"),
    Case("artifact", "verify-unheld-backend", lambda env: verify_artifact(env.bundle(), backends=("tvm",)),
         match="the bundle holds ort"),
    Case("artifact", "verify-version-1", lambda env: verify_artifact(manifest_edit(
        lambda f, m: m.update(format_version=1))(env).directory), match="exported before bundles held"),
    Case("artifact", "verify-changed-reference", lambda env: verify_artifact(manifest_edit(
        lambda f, m: (f / "reference_outputs.npz").write_bytes(b"PK"))(env).directory),
         match="reference_outputs.npz: its sha256 differs"),
    # --- tuning state ------------------------------------------------------------------------------------------
    Case("tuning", "db-damaged-middle-line", db_with(['["a"]', '{broken', '["c"]'], []),
         match=r"database_workload.json: line 2 is damaged"),
    Case("tuning", "db-a-file", lambda env: graphopt.Tune(db=write(env.tmp / "db", "")),
         match="exists and is not a directory"),
    Case("tuning", "db-record-line-damaged", db_with(['["a"]'], ['[0, {}]', '[0, {', '[0, {}]']),
         match=r"database_tuning_record.json: line 2 is damaged"),
    Case("tuning", "db-record-of-a-missing-workload", db_with(['["a"]'], ['[5, {}]']),
         match=r"database_tuning_record.json: line 1 names workload"),
    # --- the command line --------------------------------------------------------------------------------------
    cli_case("cli-model-file-missing", ["compile", "{tmp}/nope.py"], "model file .*nope.py' not found"),
    cli_case("cli-model-syntax-error", ["compile", "{tmp}/m.py"], r"failed to load: SyntaxError.*\(line 1\)",
             {"m.py": "def build(:\n"}),
    cli_case("cli-factory-raises", ["compile", "{tmp}/m.py"], r"build\(\) raised ValueError: no weights",
             {"m.py": "def build():\n    raise ValueError('no weights')\n"}),
    cli_case("cli-factory-missing", ["compile", "{tmp}/m.py:make"], r"has no function make\(\)",
             {"m.py": "def build():\n    pass\n"}),
    cli_case("cli-factory-wrong-return", ["compile", "{tmp}/m.py"], r"must return \(model, example_inputs\)",
             {"m.py": "def build():\n    return 3\n"}),
    cli_case("cli-module-missing", ["compile", "no_such_module_xyz:build"], "cannot import model module"),
    cli_case("cli-bad-target", ["compile", "{tmp}/m.py", "--target", "tpu"], "unknown target 'tpu'",
             {"m.py": "import torch\ndef build():\n    return torch.nn.Linear(4, 3).eval(), (torch.randn(2, 4),)\n"}),
    cli_case("cli-bad-pass", ["compile", "{tmp}/m.py", "--passes", "dce,nope"], "unknown pass 'nope'",
             {"m.py": "import torch\ndef build():\n    return torch.nn.Linear(4, 3).eval(), (torch.randn(2, 4),)\n"}),
    cli_case("cli-tolerance-nan", ["compile", "{tmp}/m.py", "--tolerance", "nan"], "tolerance=nan",
             {"m.py": "import torch\ndef build():\n    return torch.nn.Linear(4, 3).eval(), (torch.randn(2, 4),)\n"}),
    cli_case("cli-quantize-without-calibration", ["compile", "{tmp}/m.py", "--quantize", "int8"], "needs calibration",
             {"m.py": "import torch\ndef build():\n    return torch.nn.Linear(4, 3).eval(), (torch.randn(2, 4),)\n"}),
    cli_case("cli-onnx-into-missing-folder", ["compile", "{tmp}/m.py", "--onnx", "{tmp}/no/m.onnx"], "does not exist",
             {"m.py": "import torch\ndef build():\n    return torch.nn.Linear(4, 3).eval(), (torch.randn(2, 4),)\n"}),
    cli_case("cli-report-not-a-folder", ["report", "{tmp}/nowhere"], "is not a folder"),
    cli_case("cli-report-no-index", ["report", "{tmp}"], "cannot read a dump index"),
    cli_case("cli-verify-no-manifest", ["verify-artifact", "{tmp}"], "no manifest.json"),
]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    model = Small().eval()
    cm = graphopt.compile(model, (X,))
    bundle = cm.export(tmp_path_factory.mktemp("bundle") / "b")
    return Shared(model, state(model), cm, bundle)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.kind}:{c.id}" for c in CASES])
def test_bad_input(case, shared, tmp_path, monkeypatch, capsys):
    cwd, cache, named = tmp_path / "cwd", tmp_path / "cache", tmp_path / "named"
    for d in (cwd, cache, named):
        d.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    copies = iter(range(100))

    def fresh_bundle():
        return shutil.copytree(shared.bundle, named / f"bundle{next(copies)}")
    if case.before_capture:
        monkeypatch.setattr(graphopt.api, "capture", lambda *a, **k: pytest.fail("capture ran: work started"))
    env = Env(Small().eval(), named, shared, fresh_bundle)
    if case.kind == "cli":
        assert case.run(env) == 2
        err = capsys.readouterr().err
        assert err.startswith("graphopt: error: ") and "Traceback" not in err, err
        assert re.search(case.match, err), err
    else:
        with pytest.raises(case.error, match=case.match) as info:
            case.run(env)
        assert isinstance(info.value, GraphoptError), type(info.value)
    assert env.used or not case.hands_a_model, "the case handed graphopt no model"
    for model, before in env.used.values():
        assert before is None or not changes(model, before), \
            f"the model {type(model).__name__} changed: {changes(model, before)}"
    changed_input = not torch.equal(X, X_VALUES)
    X.copy_(X_VALUES)                       # (the next cases get X back either way)
    assert not changed_input, "the input tensor changed"
    if id(shared.model) in env.used:        # the compiled module still computes its model's outputs
        with torch.no_grad():
            torch.testing.assert_close(shared.cm(X), shared.model(X), rtol=1e-5, atol=1e-6)
    assert not list(cwd.iterdir()) and not list(cache.iterdir()), "wrote outside the named paths"


def test_the_table_covers_every_class_with_80_cases():
    counts = collections.Counter(c.kind for c in CASES)
    assert sum(counts.values()) >= 80 and set(counts) == {"api", "call", "artifact", "tuning", "cli"}, counts
    assert len({c.id for c in CASES}) == len(CASES)
