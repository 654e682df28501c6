"""Real architectures from transformers configs (random init): compiled output matches eager
(max abs error ≤ 1e-4 of the output scale, fp32), through the default pipeline and ONNX Runtime."""
import pytest
import torch
import transformers  # noqa: F401  (a dev dependency: the zoo's models are transformers', a missing install fails)

import graphopt
from graphopt import zoo
from conftest import assert_matches


@pytest.mark.parametrize("name", sorted(zoo.MODELS))
def test_model_matches_eager(name):
    model, inputs = zoo.build(name, size="tiny", batch=2)
    compiled = graphopt.compile(model, inputs, target="cpu")
    assert_matches(compiled, model, inputs)
    assert len(compiled.report) == 1 + len(graphopt.passes.default_pipeline(graphopt.get_target("cpu"))) + 1


def test_batchnorm_folded_in_resnet_and_weights_untouched():
    model, inputs = zoo.build("resnet", size="tiny", batch=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = graphopt.compile(model, inputs)
    assert "aten._native_batch_norm_legit_no_training" not in compiled.graph.op_counts()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert_matches(compiled, model, inputs)


@pytest.mark.parametrize("name", ["bert", "resnet"])
def test_dynamic_batch(name):
    model, (x,) = zoo.build(name, size="tiny", batch=2)
    compiled = graphopt.compile(model, (x,), dynamic_shapes="batch")
    other = torch.cat([x, x, x])[:5]
    assert_matches(compiled, model, (other,))


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_dynamic_batch_and_sequence_with_fusions(name):
    from torch.export import Dim
    model, (x,) = zoo.build(name, size="tiny", batch=2)
    compiled = graphopt.compile(model, (x,), dynamic_shapes=({0: Dim.DYNAMIC, 1: Dim.DYNAMIC},))
    assert compiled.graph.op_counts().get("graphopt.attention") == 2
    for shape in [(1, 20), (3, 7)]:
        assert_matches(compiled, model, (x.repeat(2, 1)[: shape[0], : shape[1]],))
