"""The ONNX artifact, the graphopt-op seam into the exporter, and the command line."""
import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnxscript import opset18 as op

import graphopt
from graphopt import cli, zoo
from graphopt.ops import graphopt_op, registered
from graphopt.ops.registry import unregister
from conftest import assert_matches, need_module

RESNET = str(Path(__file__).parents[1] / "examples" / "resnet.py") + ":tiny"


def test_export_onnx_is_standalone(tmp_path):
    model, inputs = zoo.build("resnet", size="tiny", batch=2)
    cm = graphopt.compile(model, inputs)
    path = cm.export_onnx(tmp_path / "model.onnx")
    onnx.checker.check_model(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: inputs[0].numpy()})[0]
    np.testing.assert_allclose(got, model(*inputs).last_hidden_state.detach().numpy(), rtol=1e-4, atol=1e-4)
    # torch.onnx folds BatchNorm itself, so the ONNX cannot show graphopt's folding: the IR does
    assert cm.graph.op_counts().get("aten._native_batch_norm_legit_no_training", 0) == 0
    kept = graphopt.compile(model, inputs, passes=["dce"]).graph.op_counts()
    assert kept.get("aten._native_batch_norm_legit_no_training", 0) > 0


def _scaled_add_onnx(x, y, alpha: float):
    return op.Add(x, op.Mul(y, op.CastLike(alpha, y)))


def _scaled_add_relax(node, importer):   # exercised by the TVM backend's tests
    from tvm import relax
    x, y = importer.env[node.args[0]], importer.env[node.args[1]]
    return importer.block_builder.emit(relax.op.add(x, relax.op.multiply(y, relax.const(node.args[2], "float32"))))


def _scaled_add(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    return x + alpha * y


@pytest.fixture
def scaled_add_op():
    """graphopt::test_scaled_add, registered for the test only (not for every test after this module's import)."""
    graphopt_op("test_scaled_add", fake=lambda x, y, alpha: torch.empty_like(x), onnx=_scaled_add_onnx,
                relax=_scaled_add_relax)(_scaled_add)
    yield
    unregister("test_scaled_add")
    assert "test_scaled_add" not in registered() and not hasattr(torch.ops.graphopt, "test_scaled_add")


def test_graphopt_op_lowers_through_its_onnx_part(tmp_path, scaled_add_op):
    class UsesOp(nn.Module):
        def forward(self, x):
            return torch.ops.graphopt.test_scaled_add(x.relu(), x, 0.5)
    model, x = UsesOp().eval(), (torch.randn(3, 5),)
    cm = graphopt.compile(model, x)
    assert "graphopt.test_scaled_add" in cm.graph.op_counts()
    assert_matches(cm, model, x)
    assert "test_scaled_add" in registered()
    with pytest.raises(TypeError, match="all four parts"):
        graphopt_op("incomplete", fake=lambda x: x, onnx=_scaled_add_onnx, relax=None)


def test_cli_passes(capsys):
    assert cli.main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "fold_batchnorm" in out and "default pipeline for cpu: remove_noops →" in out


def test_cli_compile(tmp_path, capsys):
    rc = cli.main(["compile", RESNET, "--dump-dir", str(tmp_path / "d"),
                   "--onnx", str(tmp_path / "m.onnx"), "--verify", "--dynamic-batch"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "fold_batchnorm" in out and (tmp_path / "m.onnx").exists() and (tmp_path / "d" / "report.html").exists()
    dims = [d.dim_param or d.dim_value for d in onnx.load(str(tmp_path / "m.onnx")).graph.input[0].type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [3, 64, 64]


def test_cli_reports_errors(capsys):
    assert cli.main(["compile", RESNET, "--target", "tpu"]) == 2
    assert "unknown target 'tpu'" in capsys.readouterr().err
    assert cli.main(["compile", "examples/missing.py"]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_quantizes_with_calibration_from_a_factory(tmp_path, capsys):
    example = str(Path(__file__).parents[1] / "examples" / "quantize.py")
    assert cli.main(["compile", example + ":tiny", "--quantize", "int8", "--calibration",
                     example + ":calibration_tiny", "--onnx", str(tmp_path / "q.onnx")]) == 0
    assert " quantize " in capsys.readouterr().out
    ops = {n.op_type for n in onnx.load(tmp_path / "q.onnx").graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert cli.main(["compile", example + ":tiny", "--quantize", "int8"]) == 2
    assert "needs calibration data" in capsys.readouterr().err


def test_cli_accuracy_budget_reaches_the_planner(tmp_path, capsys):
    example = str(Path(__file__).parents[1] / "examples" / "quantize.py")
    assert cli.main(["compile", example + ":tiny", "--quantize", "auto", "--calibration",
                     example + ":calibration_tiny", "--accuracy-budget", "0.05", "--dump-dir", str(tmp_path)]) == 0
    steps = json.loads((tmp_path / "report.json").read_text())["steps"]
    plan = next(s for s in steps if s["name"] == "quantize_auto")
    assert any("(budget 0.05)" in n for n in plan["notes"]), plan["notes"]


TINY_MODULE = '''
import torch

def build():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    return model, (torch.randn(2, 8),)

def broken():
    raise ValueError("no weights here")
'''


def test_cli_model_forms_and_flags(tmp_path, monkeypatch, capsys):
    (tmp_path / "tiny_models.py").write_text(TINY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    # package.module:factory, --passes (only those run), --verify with --tolerance
    assert cli.main(["compile", "tiny_models:build", "--passes", "dce", "--verify", "--tolerance", "1e-6"]) == 0
    steps = [line.split()[1] for line in capsys.readouterr().out.splitlines()]
    assert steps == ["captured", "dce", "backend-ort"]
    # file.py (its build()), --backend tvm
    need_module("tvm")
    assert cli.main(["compile", str(tmp_path / "tiny_models.py"), "--backend", "tvm", "--precision", "fp16",
                     "--dump-dir", str(tmp_path / "d")]) == 0
    assert "backend-tvm" in capsys.readouterr().out
    backend_step = json.loads((tmp_path / "d" / "report.json").read_text())["steps"][-1]
    assert "precision fp16: convs and matmuls in half precision, accumulating in fp32" in backend_step["notes"]


@pytest.mark.parametrize("source,message", [
    ("def build(:\n", r"failed to load: SyntaxError: .*\(line 1\)"),
    ("raise RuntimeError('import-time failure')\n", "failed to load: RuntimeError: import-time failure"),
    (TINY_MODULE, r"broken\(\) raised ValueError: no weights here"),
])
def test_cli_model_file_errors_are_one_line(tmp_path, capsys, source, message):
    path = tmp_path / "bad.py"
    path.write_text(source)
    assert cli.main(["compile", f"{path}:broken" if source == TINY_MODULE else str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("graphopt: error:") and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err


def test_example_inputs_as_a_tensor_or_a_dict():
    class Keyword(nn.Module):
        def forward(self, x, scale=None):
            return x.relu() * scale
    x, s = torch.randn(2, 3), torch.rand(2, 3)
    model = Keyword().eval()
    cm = graphopt.compile(model, {"x": x, "scale": s})
    torch.testing.assert_close(cm(x=x, scale=s), model(x, s))
    mlp = nn.Linear(3, 2).eval()
    single = graphopt.compile(mlp, x)
    torch.testing.assert_close(single(x), mlp(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tolerance", [float("nan"), -1e-4, 0, float("inf"), "1e-4"])
def test_tolerance_must_be_a_positive_number(tolerance, monkeypatch):
    monkeypatch.setattr(graphopt.api, "capture", lambda *a, **k: pytest.fail("captured before the error"))
    with pytest.raises(graphopt.InputError, match="tolerance="):
        graphopt.compile(nn.Linear(3, 2).eval(), torch.randn(2, 3), verify=True, tolerance=tolerance)


@pytest.mark.parametrize("kwargs,message", [({"trials": 0}, "trials="), ({"trials": 2.5}, "trials="),
                                            ({"time_budget": -1}, "time_budget="),
                                            ({"time_budget": float("nan")}, "time_budget="), ({"db": 3}, "db=")])
def test_tune_options_are_checked(kwargs, message):
    with pytest.raises(graphopt.InputError, match=message):
        graphopt.Tune(**kwargs)


def test_tune_database_defaults_to_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert graphopt.Tune().db == tmp_path / "graphopt" / "tuning"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert graphopt.Tune().db == Path.home() / ".cache" / "graphopt" / "tuning"


@pytest.mark.slow   # the README's main job on ResNet-50 (base size): compile fp32 and int8, check, time, dump
def test_demo_runs_and_checks_its_numbers(tmp_path):
    import subprocess
    import sys
    demo = Path(__file__).parents[1] / "examples" / "demo.py"
    done = subprocess.run([sys.executable, str(demo), "--models", "resnet", "--dump-root", str(tmp_path)],
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    err, cos = re.search(r"fp32 relative error vs eager ([\d.e+-]+), int8 output cosine ([\d.]+)", done.stdout).groups()
    assert float(err) <= 1e-4 and float(cos) >= 0.99, done.stdout
    assert re.search(r"graphopt fp32 speedup: ×[\d.]+ vs eager, ×[\d.]+ vs plain ORT", done.stdout)
    assert (tmp_path / "resnet" / "report.html").is_file() and (tmp_path / "resnet" / "report.json").is_file()


def test_the_exporters_registry_built_once_exports_the_same_onnx(monkeypatch):
    """codegen/registry.py hands torch.onnx a copy of the op registry it built first (the table torch builds, the
    same functions in the same order): the ONNX is the one a fresh
    registry gives, graphopt's own ops included, also on a second export (its custom ops registered into the copy,
    not the cached table), and torch's registry is left as it was."""
    import contextlib
    from torch.onnx._internal.exporter import _registration
    from graphopt.codegen import onnx as codegen, registry
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).eval()
    x = torch.randn(4, 16)
    graph = graphopt.compile(model, (x,), backend="ort").graph
    assert any(op.startswith("graphopt") for op in graph.op_counts()), graph.op_counts()
    original = _registration.ONNXRegistry.__dict__["from_torchlib"]
    opsets, copy = [], registry._copy
    monkeypatch.setattr(registry, "_copy", lambda cls, opset_version=None: opsets.append(opset_version) or copy(
        cls, opset_version))
    reused = [codegen.to_onnx(graph, (x,)).source]
    cached = registry._built(opsets[0])
    sizes = {target: len(metas) for target, metas in cached.functions.items()}
    reused.append(codegen.to_onnx(graph, (x,)).source)
    assert {target: len(metas) for target, metas in cached.functions.items()} == sizes
    torchs = original.__func__(_registration.ONNXRegistry, opsets[0])    # built without reading torchlib's source
    assert [(t, [(m.onnx_function, m.is_complex, str(m.signature)) for m in ms]) for t, ms in cached.functions.items()] \
        == [(t, [(m.onnx_function, m.is_complex, str(m.signature)) for m in ms]) for t, ms in torchs.functions.items()]
    assert _registration.ONNXRegistry.__dict__["from_torchlib"] is original and len(opsets) == 2
    monkeypatch.setattr(codegen, "reused", contextlib.nullcontext)
    fresh = codegen.to_onnx(graph, (x,)).source
    assert reused[0] == fresh and reused[1] == fresh
    assert fresh == onnx.load_from_string(fresh).SerializeToString()   # the checked bytes are the model's


def test_an_ir_graph_is_exported_without_a_retrace(monkeypatch):
    """codegen/lifted: a static IR graph goes to torch.onnx as an ExportedProgram built from it, not traced again:
    its ONNX is torch.onnx's traced export's (the same ops and initializers, outputs bitwise equal in ORT, eager's
    within 1e-5), a weight read by two nodes is one input, and the graph is untouched. A graph of dynamic shapes
    is traced, as is one with torch.cond's branches."""
    from graphopt.codegen import onnx as codegen
    from graphopt.codegen.lifted import lifted_program
    from graphopt.sessions import ort_session

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 8)

        def forward(self, x):
            y = torch.relu(self.conv(x)).mean((2, 3))
            return self.fc(self.fc(y)).softmax(-1), y      # fc's weight read twice
    model, x = Net().eval(), torch.randn(2, 3, 8, 8)
    graph = graphopt.compile(model, (x,), backend="ort").graph
    before = graph.module.code
    program = lifted_program(graph)
    assert program is not None and len(program.graph_signature.buffers) == len(set(program.state_dict))
    assert program.graph_signature.user_inputs == tuple(n.name for n in graph.inputs)
    traced = []
    monkeypatch.setattr(codegen, "lifted_program", lambda g: traced.append(g) and None)
    retraced = codegen.to_onnx(graph, (x,))
    monkeypatch.undo()
    lifted = codegen.to_onnx(graph, (x,))
    assert traced and graph.module.code == before
    assert [n.op_type for n in lifted.model.graph.node] == [n.op_type for n in retraced.model.graph.node]
    assert sorted(i.name for i in lifted.model.graph.initializer) == \
        sorted(i.name for i in retraced.model.graph.initializer)
    feeds = {lifted.model.graph.input[0].name: x.numpy()}
    outs = [ort_session(m.source).run(None, feeds) for m in (lifted, retraced)]
    for a, b, ref in zip(*outs, model(x)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, ref.detach().numpy(), rtol=1e-5, atol=1e-6)
    dynamic = graphopt.compile(model, (x,), backend="ort", dynamic_shapes="batch").graph
    assert lifted_program(dynamic) is None

    class Cond(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.cond(x.sum() > 0, lambda x: self.fc(x), lambda x: x - 1, (x,))
    assert lifted_program(graphopt.compile(Cond().eval(), (torch.randn(2, 4),), backend="ort").graph) is None


def test_the_exporter_skips_decompositions_only_where_nothing_is_left_to_decompose(monkeypatch):
    """codegen/registry.already_decomposed: a captured graph (decomposed by capture) is exported without torch.onnx's
    decomposition retrace, to ONNX that computes what torch's own path gives (the same ops, Reshape's allowzero
    aside: aten.reshape where torch's retrace makes aten.view); a program with an op of the exporter's table is
    still decomposed."""
    import contextlib
    import numpy as np
    from graphopt.codegen import onnx as codegen, registry
    from graphopt.sessions import ort_session

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Linear(8 * 8 * 8, 10)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).flatten(1)).softmax(-1)
    model, x = Net().eval(), torch.randn(2, 3, 8, 8)
    graph = graphopt.compile(model, (x,), backend="ort").graph
    asked = []
    real = registry._decompose_if_needed
    monkeypatch.setattr(registry, "_decompose_if_needed",
                        lambda program, reg: asked.append(program) or real(program, reg))
    skipped = codegen.to_onnx(graph, (x,))
    assert len(asked) == 1
    monkeypatch.setattr(codegen, "already_decomposed", contextlib.nullcontext)
    decomposed = codegen.to_onnx(graph, (x,))
    ops = lambda m: [(n.op_type, [a for a in n.attribute if a.name != "allowzero"]) for n in m.graph.node]  # noqa: E731
    assert ops(skipped.model) == ops(decomposed.model)
    feeds = {skipped.model.graph.input[0].name: x.numpy()}
    outs = [ort_session(m.source).run(None, feeds)[0] for m in (skipped, decomposed)]
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_allclose(outs[0], model(x).detach().numpy(), rtol=1e-5, atol=1e-6)
    # a program straight from torch.export, with an op the exporter's table decomposes, is decomposed
    from torch.onnx._internal.exporter import _decomp
    onnx_registry = registry._built(18)
    table = registry._table(frozenset(_decomp.get_onnx_implemented_overloads(onnx_registry)))
    class MinMax(torch.nn.Module):
        def forward(self, x):
            return torch.aminmax(x, dim=-1)
    program = torch.export.export(MinMax(), (torch.randn(2, 4),))
    targets = {n.target for n in program.graph.nodes if n.op == "call_function"}
    assert targets & set(table), targets
    assert real(program, onnx_registry) is not program
