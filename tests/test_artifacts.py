"""Artifacts go only where the user named, are checked first and written atomically; bad paths and inputs
at call time are clear errors."""
import errno
import re
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch

import graphopt
from graphopt import GraphoptError, InputError


@pytest.fixture(scope="module")
def compiled():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
    x = torch.randn(2, 4)
    return model, x, graphopt.compile(model, (x,))


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("where,message", [
    (lambda d: d / "missing" / "m.onnx", "does not exist; create it first"),
    (lambda d: d, "is a directory"),
    (lambda d: d / "file.txt" / "m.onnx", "is not a folder"),
])
def test_export_to_a_bad_path_is_an_input_error(compiled, tmp_path, where, message):
    (tmp_path / "file.txt").write_text("x")
    before = listing(tmp_path)
    with pytest.raises(InputError, match=message):
        compiled[2].export_onnx(where(tmp_path))
    assert listing(tmp_path) == before


def test_a_failed_write_leaves_the_previous_artifact_loadable(compiled, tmp_path, monkeypatch):
    model, x, cm = compiled
    path = cm.export_onnx(tmp_path / "m.onnx")
    good = path.read_bytes()

    def disk_full(self, data):
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(GraphoptError, match="No space left on device.*previous file, if any, is unchanged"):
        cm.export_onnx(path)
    monkeypatch.undo()
    assert path.read_bytes() == good and listing(tmp_path) == ["m.onnx"]       # no partial file left behind
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), model(x).detach(), rtol=1e-5, atol=1e-5)


def test_dump_dir_that_cannot_be_made_is_refused_before_capture(tmp_path, monkeypatch):
    (tmp_path / "file.txt").write_text("x")
    monkeypatch.setattr(graphopt.api, "capture", lambda *a, **k: pytest.fail("captured before the error"))
    model = torch.nn.Linear(4, 4).eval()
    with pytest.raises(InputError, match="cannot be created"):
        graphopt.compile(model, torch.randn(2, 4), dump_dir=tmp_path / "file.txt" / "dumps")
    with pytest.raises(InputError, match="exists and is not a directory"):
        graphopt.compile(model, torch.randn(2, 4), dump_dir=tmp_path / "file.txt")


def test_a_tensor_on_another_device_is_refused_at_call(compiled):
    with pytest.raises(InputError, match="device meta.*no data"):
        compiled[2](torch.empty(2, 4, device="meta"))


@pytest.mark.parametrize("x,message", [(torch.randint(0, 5, (2, 4)), "dtype"), (torch.randn(2, 3), "shape|size")])
def test_inputs_the_model_rejects_fail_before_capture(x, message, monkeypatch):
    monkeypatch.setattr(graphopt.api, "capture", lambda *a, **k: pytest.fail("captured before the error"))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
    with pytest.raises(InputError, match=r"raised on example_inputs in '0' \(Linear\).*inputs given: \[0\]\[0\]") as e:
        graphopt.compile(model, (x,))
    assert re.search(message, str(e.value))
