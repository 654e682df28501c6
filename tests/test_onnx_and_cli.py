"""The ONNX artifact, the graphopt-op seam into the exporter, and the command line."""
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
from conftest import assert_matches

RESNET = str(Path(__file__).parents[1] / "examples" / "resnet.py") + ":tiny"


def test_export_onnx_is_standalone(tmp_path):
    model, inputs = zoo.build("resnet", size="tiny", batch=2)
    cm = graphopt.compile(model, inputs)
    path = cm.export_onnx(tmp_path / "model.onnx")
    onnx.checker.check_model(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: inputs[0].numpy()})[0]
    np.testing.assert_allclose(got, model(*inputs).last_hidden_state.detach().numpy(), rtol=1e-4, atol=1e-4)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "BatchNormalization" not in ops   # folded by graphopt


def _scaled_add_onnx(x, y, alpha: float):
    return op.Add(x, op.Mul(y, op.CastLike(alpha, y)))


def _scaled_add_relax(node, importer):   # exercised by the TVM backend's tests
    from tvm import relax
    x, y = importer.env[node.args[0]], importer.env[node.args[1]]
    return importer.block_builder.emit(relax.op.add(x, relax.op.multiply(y, relax.const(node.args[2], "float32"))))


@graphopt_op("test_scaled_add", fake=lambda x, y, alpha: torch.empty_like(x), onnx=_scaled_add_onnx,
             relax=_scaled_add_relax)
def scaled_add(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    return x + alpha * y


def test_graphopt_op_lowers_through_its_onnx_part(tmp_path):
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
