"""The TVM backend (untuned default schedules): real models match eager through Relax; libraries
export for the host (loadable by the TVM runtime alone), cross-compile for arm64, and build for CUDA
without a GPU."""
import shutil
import subprocess

import numpy as np
import pytest
import torch

import graphopt
from graphopt import zoo
from conftest import assert_matches

tvm = pytest.importorskip("tvm")


@pytest.mark.parametrize("name", ["bert", "gpt2", "vit", "llama", "resnet", "mobilenet_v2"])
def test_model_matches_eager_on_tvm(name):
    model, inputs = zoo.build(name, size="tiny", batch=2)
    cm = graphopt.compile(model, inputs, backend="tvm")
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


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None, reason="needs gcc-aarch64-linux-gnu")
def test_arm64_artifact_is_an_aarch64_elf(tmp_path):
    model, inputs = zoo.build("mobilenet_v2", size="tiny", batch=1)
    cm = graphopt.compile(model, inputs, backend="tvm", target="arm64")
    path = cm.export_library(tmp_path / "m.so")
    assert path.read_bytes()[:4] == b"\x7fELF" and path.read_bytes()[18] == 183   # e_machine = EM_AARCH64
    assert "aarch64" in subprocess.run(["file", str(path)], capture_output=True, text=True).stdout
    with pytest.raises(graphopt.UnsupportedError, match="built for arm64"):
        cm(*inputs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_cuda_builds_without_a_gpu(tmp_path):
    model, inputs = zoo.build("bert", size="tiny", batch=1)
    cm = graphopt.compile(model, inputs, backend="tvm", target="cuda")
    assert cm.export_library(tmp_path / "bert_cuda.so").stat().st_size > 0
    with pytest.raises(graphopt.UnsupportedError, match="built for cuda"):
        cm(*inputs)
