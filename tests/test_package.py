"""The bundle a user ships (cm.export(dir)): its files and manifest, run.py on this machine, what is read back is
checked, and `verify-artifact` catches a mismatch. Running arm64 bundles under emulation is slow (marked)."""
import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import BertConfig, BertModel

import graphopt
from graphopt import zoo
from graphopt.cli import main as cli
from graphopt.errors import InputError, VerificationError
from graphopt.package import verify_artifact
from graphopt.targets import host_arch

from conftest import need_module, need_tool


def run_py(folder, *args, env=None):
    """run.py in a fresh Python where graphopt and torch cannot be imported (a board has neither)."""
    script = ("import runpy, sys; sys.modules['graphopt'] = sys.modules['torch'] = None; "
              f"sys.argv = ['run.py', *{list(args)!r}]; runpy.run_path({str(folder / 'run.py')!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=None if env is None else {**os.environ, **env})


def eager_outputs(model, args) -> list[np.ndarray]:
    """The eager model's outputs (ResNet's and BERT's: last_hidden_state, then pooler_output where it has one), as
    the bundle numbers them output_0, output_1: the reference a bundle's run is checked against, computed here."""
    with torch.no_grad():
        out = model(*args)
    return [t.numpy() for t in (out.last_hidden_state, getattr(out, "pooler_output", None)) if t is not None]


def rewrite_manifest(folder, change):
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def resnet():
    return zoo.build("resnet", size="tiny")


@pytest.fixture(scope="module")
def arm64_bundle(resnet, tmp_path_factory):
    need_module("tvm")
    need_tool("aarch64-linux-gnu-gcc", "the arm64 cross compiler, Debian's gcc-aarch64-linux-gnu")
    model, args = resnet
    cm = graphopt.compile(model, args, target="arm64")
    return cm, cm.export(tmp_path_factory.mktemp("arm64"))


def test_arm64_compiles_to_onnx_and_a_tvm_library_by_default(arm64_bundle, resnet):
    cm, folder = arm64_bundle
    assert cm.backend == "ort,tvm"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert (manifest["target"], manifest["arch"]) == ("arm64", "aarch64")
    assert {"onnxruntime", "tvm", "torch", "graphopt"} <= set(manifest["versions"])
    assert [p["name"] for p in manifest["passes"]][:3] == ["remove_noops", "fold_constants", "fold_batchnorm"]
    assert manifest["inputs"] == [{"name": "pixel_values", "dtype": "float32", "shape": [1, 3, 64, 64]}]
    assert manifest["outputs"][0]["shape"] == list(resnet[0](*resnet[1]).last_hidden_state.shape)
    seg = manifest["segments"][0]
    listed = [seg, seg["ort_format"], manifest["library"], manifest["runner"], *manifest["reference"].values()]
    for entry in listed:                                             # every file listed, with its checksum
        assert hashlib.sha256((folder / entry["file"]).read_bytes()).hexdigest() == entry["sha256"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(["manifest.json"] + [e["file"] for e in listed])
    assert (folder / "model.so").read_bytes()[:4] == b"\x7fELF" and (folder / "model.so").read_bytes()[18] == 183  # EM_AARCH64
    # the ORT-format model has no x86-only NCHWc ops (ORT's converter leaves them out for ARM), and runs
    options = ort.SessionOptions()
    options.add_session_config_entry("session.load_model_format", "ORT")
    session = ort.InferenceSession(str(folder / "segment0.ort"), options, providers=["CPUExecutionProvider"])
    out = session.run(None, {"pixel_values": resnet[1][0].numpy()})
    want = eager_outputs(*resnet)
    assert len(out) == len(want) == 2
    for got, ref in zip(out, want):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_run_py_runs_the_bundle_without_graphopt(arm64_bundle, resnet, tmp_path):
    cm, folder = arm64_bundle
    inputs = tmp_path / "in.npz"
    np.savez(inputs, pixel_values=resnet[1][0].numpy())
    want = eager_outputs(*resnet)                     # the eager model's outputs on the example, computed here
    for flags in ([], ["--onnx", "--inputs", str(inputs)]):   # the example inputs saved at export, then given here
        done = run_py(folder, "--outputs", str(tmp_path / "out.npz"), *flags)
        assert done.returncode == 0, done.stderr
        assert ("segment0.onnx" if flags else "segment0.ort") in done.stdout
        with np.load(tmp_path / "out.npz") as npz:
            assert sorted(npz.files) == ["output_0", "output_1"]
            for i, ref in enumerate(want):
                np.testing.assert_allclose(npz[f"output_{i}"], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    bad = tmp_path / "bad.npz"
    np.savez(bad, pixel_values=np.zeros((1, 3, 32, 32), np.float32))
    done = run_py(folder, "--inputs", str(bad))
    assert done.returncode == 2 and "input pixel_values: expected float32[1, 3, 64, 64]" in done.stderr
    if host_arch() != "aarch64":                       # an aarch64 library cannot load on x86-64: run.py says so first
        done = run_py(folder, "--backend", "tvm")
        assert done.returncode == 2 and "built for aarch64 and this machine is x86_64" in done.stderr \
            and "--backend ort" in done.stderr, done.stderr


def test_a_changed_file_is_refused_by_run_py_load_and_verify(resnet, tmp_path):
    model, args = resnet
    folder = graphopt.compile(model, args).export(tmp_path / "bundle")
    loaded = graphopt.load(folder)
    torch.testing.assert_close(loaded(*args).last_hidden_state, model(*args).last_hidden_state, rtol=1e-4, atol=1e-4)
    ort_file = folder / "segment0.ort"
    ort_file.write_bytes(ort_file.read_bytes()[:-1] + b"\1")
    done = run_py(folder)
    assert done.returncode == 2 and "segment0.ort: its sha256 differs" in done.stderr
    (folder / "segment0.onnx").write_bytes(b"\0" + (folder / "segment0.onnx").read_bytes())
    with pytest.raises(InputError, match="segment0.onnx: its sha256 differs"):
        graphopt.load(folder)
    (folder / "manifest.json").write_text('{"format": "graphopt-segments", "format_vers')
    with pytest.raises(InputError, match="manifest.json: not valid JSON"):
        graphopt.load(folder)
    with pytest.raises(InputError, match="no manifest.json"):
        graphopt.load(tmp_path)


def test_verify_artifact_runs_a_host_bundle_and_catches_a_mismatch(resnet, tmp_path, capsys):
    model, args = resnet
    folder = graphopt.compile(model, args).export(tmp_path / "bundle")
    checks = verify_artifact(folder)
    assert [(c.backend, c.output) for c in checks] == [("ort", "output_0"), ("ort", "output_1")]   # hidden, pooled
    assert all(c.ok for c in checks)
    assert "this machine (x86_64)" in checks[0].line or "this machine (aarch64)" in checks[0].line
    assert cli(["verify-artifact", str(folder)]) == 0 and "max error" in capsys.readouterr().out
    # the reference moved by 1e-3 of the output scale: the same run no longer matches it
    with np.load(folder / "reference_outputs.npz") as npz:
        ref = {k: npz[k] for k in npz.files}
    ref["output_0"] = ref["output_0"] + 1e-3 * np.abs(ref["output_0"]).max()
    np.savez(folder / "reference_outputs.npz", **ref)
    digest = hashlib.sha256((folder / "reference_outputs.npz").read_bytes()).hexdigest()
    rewrite_manifest(folder, lambda m: m["reference"]["outputs"].update(sha256=digest))
    with pytest.raises(VerificationError, match=r"ort on this machine .*, output_0: max error (9\.9\de-04|1\.00e-03)"):
        verify_artifact(folder)
    assert cli(["verify-artifact", str(folder)]) == 1


def test_tvm_only_arm64_bundle_refers_load_to_run_py(resnet, tmp_path):
    need_module("tvm")
    need_tool("aarch64-linux-gnu-gcc", "the arm64 cross compiler, Debian's gcc-aarch64-linux-gnu")
    model, args = resnet
    cm = graphopt.compile(model, args, target="arm64", backend="tvm")
    folder = cm.export(tmp_path / "bundle")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["segments"] == [] and manifest["library"]["triple"] == "aarch64-linux-gnu"
    assert "IR in PyTorch" in manifest["reference"]["outputs"]["ran_on"]     # this machine cannot run the library
    with pytest.raises(InputError, match="only a TVM library for aarch64"):
        graphopt.load(folder)


def test_tune_for_arm64_is_refused_before_capture(resnet, monkeypatch):
    monkeypatch.setattr(graphopt.api, "capture", lambda *a, **k: pytest.fail("captured before the error"))
    with pytest.raises(InputError, match="tune= on target arm64"):
        graphopt.compile(*resnet, target="arm64", tune=graphopt.Tune(trials=8))


# --- under emulation (slow: builds a Debian arm64 root once, then runs the bundles in qemu) ---------------------
# the user's cache directory, read before conftest gives each test an empty one: where the arm64 root is kept
USER_CACHE = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")


def bert_small():
    """BERT-small's shape (4 layers, hidden 512, 8 heads; Turc et al. 2019), random weights."""
    cfg = BertConfig(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048)
    return BertModel(cfg, add_pooling_layer=False).eval(), (torch.randint(0, cfg.vocab_size, (1, 128)),)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet_v2-int8", "bert-small"])
def test_arm64_bundle_matches_under_emulation(name, tmp_path, monkeypatch):
    need_module("tvm")
    for tool, why in [("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"), ("qemu-aarch64-static", "qemu-user-static"),
                      ("debootstrap", "debootstrap")]:
        need_tool(tool, why)
    if name == "bert-small":
        model, args = bert_small()
        cm = graphopt.compile(model, args, target="arm64")
    else:
        model, args = zoo.build("mobilenet_v2", size="base")
        calibration = [(torch.randn_like(args[0]),) for _ in range(4)]
        cm = graphopt.compile(model, args, target="arm64", quantize="int8", calibration=calibration)
    folder = cm.export(tmp_path / name)
    # the board's outputs are checked against the eager model run here, not against the outputs graphopt saved: the
    # fp32 bundle's within 1e-4 of the output scale; the int8 one's SQNR to the float model at least this machine's
    # run of the same bundle's, less 1 dB (and at least 5 dB: noise would be about 0)
    lossy = name.endswith("int8")
    want = eager_outputs(model, args)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert len(manifest["outputs"]) == len(want)
    entry = manifest["reference"]["model_outputs" if lossy else "outputs"]
    np.savez(folder / entry["file"], **{f"output_{i}": a for i, a in enumerate(want)})
    entry["sha256"] = hashlib.sha256((folder / entry["file"]).read_bytes()).hexdigest()
    if not lossy:
        entry["ran_on"] = "the eager model, run by the test"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("XDG_CACHE_HOME", USER_CACHE)    # the arm64 root, made once in the user's cache and reused
    checks = verify_artifact(folder)
    print("\n".join(c.line for c in checks))
    assert {c.backend for c in checks} == {"ort", "tvm"} and all(c.ok for c in checks)
    assert len(checks) == 2 * len(want) and all("emulated aarch64 (cortex-a72)" in c.line for c in checks)
    if lossy:
        assert all(float(re.search(r"SQNR to the float model (\S+) dB", c.line)[1]) >= 5 for c in checks)
    else:
        assert all(re.search(r"max error \S+ of the output scale \(limit 0.0001\)", c.line) for c in checks)


@pytest.mark.parametrize("backend", ["ort", "tvm"])
def test_a_cuda_build_exports_here_and_runs_only_on_a_gpu(backend, tmp_path, monkeypatch):
    """ORT (onnxruntime-gpu's CUDA provider) and TVM build for cuda without a GPU: the bundle is written, the module
    and run.py refuse to run rather than fall back to the CPU, and verify says the backend step went unchecked.
    No GPU on any machine: graphopt asks torch (faked here), run.py's runtimes ask CUDA (given no visible device)."""
    if backend == "tvm":
        need_module("tvm")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).eval()
    x = torch.randn(2, 8)
    cm = graphopt.compile(model, (x,), target="cuda", backend=backend, verify=True)
    assert not cm.runs_here and "not verified: built for a target this machine cannot run" in cm.report[-1].notes
    with pytest.raises(graphopt.UnsupportedError, match="built for cuda"):
        cm(x)
    folder = cm.export(tmp_path / "bundle")
    assert json.loads((folder / "manifest.json").read_text())["target"] == "cuda"
    done = run_py(folder, env={"CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2 and "built for cuda" in done.stderr, done.stderr
