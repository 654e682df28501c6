"""Models past protobuf's 2 GB: weights as ONNX external data (graphopt/codegen/external.py) in the ORT session,
export_onnx, bundles and load. The fast tests lower the size from which external data is used
(`external.EXTERNAL_BYTES`) so a tiny Llama takes the very path a > 2 GB model takes, end to end; the real one is
marked slow."""
import json
import os
import resource
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import graphopt
from graphopt import zoo
from graphopt.codegen import external
from graphopt.codegen.onnx import to_onnx
from graphopt.errors import GraphoptError, InputError

from conftest import assert_matches


def eager(model, args) -> np.ndarray:
    with torch.no_grad():
        return model(*args).last_hidden_state.numpy()


def run_py(folder, *args):
    """The bundle's run.py in a Python where graphopt and torch cannot be imported (as on a board)."""
    script = ("import runpy, sys; sys.modules['graphopt'] = sys.modules['torch'] = None; "
              f"sys.argv = ['run.py', *{list(args)!r}]; "
              f"runpy.run_path({str(folder / 'run.py')!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return zoo.build("llama", size="tiny", batch=1, seq=16)


@pytest.fixture(scope="module")
def large(llama):
    """The tiny Llama compiled as if its weights were past 2 GB (every initializer of ≥ 1 KB external)."""
    model, args = llama
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(external, "EXTERNAL_BYTES", 1)
        cm = graphopt.compile(model, args, backend="ort")
    return cm


def test_external_weights_compile_and_match_eager(large, llama):
    model, args = llama
    weights = external.weights_of(large.executable)
    proto = large.executable.artifact()
    outside = [t.name for t in proto.graph.initializer if onnx.external_data_helper.uses_external_data(t)]
    assert weights and sorted(outside) == sorted(weights)
    assert all(not t.raw_data for t in proto.graph.initializer if t.name in weights)   # the proto holds no copy
    assert proto.ByteSize() < 1e6
    assert_matches(large, model, args, tol=1e-5)


def test_external_weights_are_the_graphs_own_tensors(large):
    """No copy of the weights beside the graph's own: the external arrays are views of the IR graph's tensors (the
    exporter's folded weight transposes, 3/4 of a Llama's weights, are left to ONNX Runtime's own copy)."""
    weights = external.weights_of(large.executable)
    graph = [t.detach().numpy() for t in list(large.graph.module.parameters()) + list(large.graph.module.buffers())]
    copied = sum(a.nbytes for a in weights.values() if not any(np.shares_memory(a, t) for t in graph))
    assert copied <= 0.05 * sum(a.nbytes for a in weights.values())


def test_export_onnx_writes_model_and_data_file(large, llama, tmp_path):
    model, args = llama
    path = large.export_onnx(tmp_path / "llama.onnx")
    assert sorted(os.listdir(tmp_path)) == ["llama.onnx", "llama.onnx.data"]     # no partial file left behind
    weights = external.weights_of(large.executable)
    assert (tmp_path / "llama.onnx.data").stat().st_size >= sum(a.nbytes for a in weights.values())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: args[0].numpy()})[0]
    np.testing.assert_allclose(got, eager(model, args), rtol=1e-5, atol=1e-5)
    loaded = onnx.load(str(path))              # onnx's own loader reads the data back: every tensor where it says
    for t in loaded.graph.initializer:
        if t.name in weights:
            np.testing.assert_array_equal(onnx.numpy_helper.to_array(t), weights[t.name])
    large.export_onnx(path)                    # written again over itself: still whole
    assert sorted(os.listdir(tmp_path)) == ["llama.onnx", "llama.onnx.data"]


def test_small_model_stays_one_file(llama, tmp_path):
    model, args = llama
    cm = graphopt.compile(model, args, backend="ort")
    assert external.weights_of(cm.executable) == {}
    cm.export_onnx(tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == ["m.onnx"]
    assert not any(onnx.external_data_helper.uses_external_data(t)
                   for t in onnx.load(str(tmp_path / "m.onnx")).graph.initializer)


def test_a_small_models_session_takes_the_graphs_own_weights_and_its_artifact_holds_them(tmp_path):
    """Under 2 GB too, ORT's session gets the weights beside a small proto (it copies them in once; nothing
    serializes them), each linear's weight [out, in] as torch holds it, under FusedMatMul(transB=1): no transposed
    copy. The artifact is one self-contained model that ORT runs alone and that matches eager."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 32)).eval()
    x = torch.randn(2, 8, 64)
    cm = graphopt.compile(model, (x,), backend="ort")
    exe = cm.executable
    assert exe.weights and not external.weights_of(exe)
    assert exe.model.ByteSize() < 0.1 * sum(a.nbytes for a in exe.weights.values())     # the proto holds no copy
    assert [n.op_type for n in exe.model.graph.node].count("FusedMatMul") == 2
    for linear in (model[0], model[2]):      # the session's arrays are the model's own tensors, not copies
        assert any(a.shape == tuple(linear.weight.shape) and np.shares_memory(a, linear.weight.detach().numpy())
                   for a in exe.weights.values())
    artifact = exe.artifact()
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in artifact.graph.initializer)
    onnx.checker.check_model(artifact)
    session = ort.InferenceSession(artifact.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0], want,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cm(x).numpy(), want, rtol=1e-5, atol=1e-5)
    written = onnx.load(str(cm.export_onnx(tmp_path / "m.onnx")))   # streamed a tensor at a time, one file
    assert os.listdir(tmp_path) == ["m.onnx"]
    assert {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in written.graph.initializer} == \
        {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in artifact.graph.initializer}
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0], want,
                               rtol=1e-5, atol=1e-5)


def test_bundle_with_external_data_loads_and_runs(large, llama, tmp_path):
    model, args = llama
    folder = large.export(tmp_path / "bundle")
    manifest = json.loads((folder / "manifest.json").read_text())
    (segment,) = manifest["segments"]
    assert [d["file"] for d in segment["external_data"]] == ["segment0.onnx.data"]
    assert "ort_format" not in segment            # ORT's format is one flatbuffer, 2 GB at most: not written
    loaded = graphopt.load(folder)
    np.testing.assert_allclose(loaded(*args).last_hidden_state.numpy(), eager(model, args), rtol=1e-5, atol=1e-5)
    done = run_py(folder, "--outputs", str(tmp_path / "out.npz"))
    assert done.returncode == 0, done.stderr
    with np.load(tmp_path / "out.npz") as out:
        np.testing.assert_allclose(out["output_0"], eager(model, args), rtol=1e-5, atol=1e-5)


def test_checksum_catches_a_changed_or_missing_data_file(large, tmp_path):
    folder = large.export(tmp_path / "bundle")
    data = folder / "segment0.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(InputError, match=r"segment0\.onnx\.data: its sha256 differs"):
        graphopt.load(folder)
    done = run_py(folder)
    assert done.returncode == 2 and "segment0.onnx.data: its sha256 differs" in done.stderr
    data.unlink()
    with pytest.raises(InputError, match=r"segment0\.onnx\.data: missing"):
        graphopt.load(folder)


def test_failed_write_leaves_nothing(large, tmp_path, monkeypatch):
    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(external, "save_external_data", disk_full)
    with pytest.raises(GraphoptError, match="No space left"):
        large.export_onnx(tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


def test_a_step_without_external_data_says_so(large, llama, monkeypatch):
    """A caller that cannot take external data gets a GraphoptError naming the size, never protobuf's
    'Failed to serialize proto'."""
    model, args = llama
    monkeypatch.setattr(external, "EXTERNAL_BYTES", 1)
    with pytest.raises(GraphoptError, match="past what this step can hold in one ONNX protobuf"):
        to_onnx(large.graph, args)


def test_cost_model_times_a_graph_with_external_weights(large, llama, monkeypatch):
    """The cost model lowers whole graphs for ORT (graph_ms): past the threshold, through external weights."""
    from graphopt.cost import CostModel
    _, args = llama
    monkeypatch.setattr(external, "EXTERNAL_BYTES", 1)
    cost = CostModel(large.target, "ort")
    lowered = cost._lowered(large.graph, args, {})
    assert isinstance(lowered.source, external.WeightedModel) and lowered.source.weights
    assert cost.seconds(lowered.source, lowered.feeds, calls=1, rounds=1) > 0


LLAMA_07B = dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=14, num_attention_heads=16,
                 num_key_value_heads=16, vocab_size=32000, use_cache=False)    # 0.77 B parameters, 3.1 GB fp32


@pytest.mark.slow
def test_llama_past_2gb_compiles_matches_exports_and_loads(tmp_path):
    from transformers import LlamaConfig, LlamaModel
    model = LlamaModel(LlamaConfig(**LLAMA_07B)).eval()
    params = sum(p.numel() for p in model.parameters())
    assert params * 4 > 2 ** 31
    args = (torch.randint(0, 32000, (1, 16)),)
    cm = graphopt.compile(model, args)
    assert external.weights_of(cm.executable)
    assert_matches(cm, model, args, tol=1e-4)
    path = cm.export_onnx(tmp_path / "llama.onnx")
    assert path.stat().st_size < 2 ** 24 and (tmp_path / "llama.onnx.data").stat().st_size >= params * 4 * 0.9
    (tmp_path / "llama.onnx").unlink(), (tmp_path / "llama.onnx.data").unlink()
    folder = cm.export(tmp_path / "bundle")
    del cm
    loaded = graphopt.load(folder)
    np.testing.assert_allclose(loaded(*args).last_hidden_state.numpy(), eager(model, args), rtol=1e-4, atol=1e-4)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"peak RSS {peak / 2 ** 30:.1f} GB: {peak / params:.1f} bytes per parameter")
