"""Layer skipping (issue 13): block discovery, static dropping, early exit as segments, export/load, errors."""
import json

import pytest
import torch

import graphopt
from conftest import held_out_cosine_error
from graphopt import zoo
from graphopt.capture import capture
from graphopt.errors import InputError, UnsupportedError
from graphopt.passes.skip import find_blocks


@pytest.fixture(scope="module")
def digits():
    return zoo.digits()


@pytest.fixture(scope="module")
def classifier():
    """A small DigitsResNet trained briefly: confident on some samples, not all."""
    return zoo.train_digits(blocks=4, width=8, epochs=6)


@pytest.fixture(scope="module")
def exiting(classifier, digits):
    """The classifier compiled with early exit (top-1 budget 3%) on 4 calibration batches of 100."""
    xc = digits["calibration"][0]
    cal = [(xc[i:i + 100],) for i in range(0, 400, 100)]
    ee = graphopt.EarlyExit(budget=0.03, metric="top1")
    cm = graphopt.compile(classifier, (xc[:32],), early_exit=ee, calibration=cal)
    return cm, cm.plans["early_exit"]


def _dampened(blocks=4, weak=2, width=8):
    """A DigitsResNet whose block `weak` barely changes its input: the one to drop."""
    torch.manual_seed(0)
    model = zoo.DigitsResNet(blocks, width).eval()
    with torch.no_grad():
        model.blocks[weak].bn2.weight.mul_(1e-3)
        model.blocks[weak].bn2.bias.zero_()
    return model


# --- block discovery -------------------------------------------------------------------------------
def test_blocks_of_a_transformer_are_its_attention_and_ffn_sub_blocks():
    model, (ids,) = zoo.build("bert", batch=2, seq=16)
    blocks = find_blocks(capture(model, (ids,)))
    assert len(blocks) == 4                                        # 2 layers × (attention, FFN)
    assert [b.kind for b in blocks] == [0, 1, 0, 1]                # repeated: two kinds
    assert "attention" in blocks[0].path and "intermediate" in blocks[1].path
    assert blocks[2].path.startswith("encoder.layer.1")


def test_blocks_of_a_resnet_and_none_in_an_mlp():
    blocks = find_blocks(capture(zoo.DigitsResNet(3, 8).eval(), (torch.randn(2, 1, 8, 8),)))
    assert [b.path for b in blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4)).eval()
    assert find_blocks(capture(mlp, (torch.randn(2, 4),))) == []


# --- static skipping -------------------------------------------------------------------------------
def test_dropped_block_is_gone_from_onnx_and_relax():
    model = _dampened()
    x = torch.randn(16, 1, 8, 8)
    cal = [(torch.randn(16, 1, 8, 8),) for _ in range(3)]
    # maps allowed (the default): the near-zero block is removed, not mapped (removal saves more, both near free)
    cm = graphopt.compile(model, (x,), layer_skip=graphopt.LayerSkip(budget=1e-5), calibration=cal)
    onnx_model = cm.executable.artifact()
    names = " ".join(i.name for i in onnx_model.graph.initializer)
    assert "blocks_2_" not in names and "blocks_1_" in names and "blocks_3_" in names
    convs = [n for n in onnx_model.graph.node if "Conv" in n.op_type]
    assert len(convs) == 1 + 2 * 3                                 # stem + 3 blocks left
    reference = zoo.DigitsResNet(4, 8).eval()
    reference.load_state_dict(model.state_dict())
    reference.blocks[2] = torch.nn.Identity()                      # relu(x + 0) = x: x is a ReLU output
    with torch.no_grad():
        torch.testing.assert_close(cm(x), reference(x), rtol=1e-4, atol=1e-4)
    from graphopt.codegen.relax import to_relax
    assert to_relax(cm.graph, (x,)).script().count("R.nn.conv2d(") == 7
    notes = "\n".join(next(r for r in cm.report if r.name == "layer_skip").notes)
    assert "rank correlation" in notes and "block influence" in notes


def kxk_convs(cm) -> int:
    """Convolutions with a 3×3 kernel in the compiled ONNX graph (the stem's and 2 per block: a block dropped or
    replaced by a fitted map, a 1×1 conv, loses both of its own)."""
    graph = cm.executable.artifact().graph
    shapes = {i.name: tuple(i.dims) for i in graph.initializer}
    return sum("Conv" in n.op_type and shapes.get(n.input[1], ())[-2:] == (3, 3) for n in graph.node)


def test_static_skipping_drops_a_block_within_budget_on_held_out_data(classifier, digits):
    """Budget 0.02 (mean 1 − cosine): at least one block's 3×3 convs leave the ONNX graph, and on the test split,
    never seen by the planner, the compiled outputs stay within the budget of the eager model's (plain torch; 1.5×
    for sampling slack: 0.020 measured on 300 test samples against 0.019 on the calibration batches). A budget
    nothing fits drops nothing and changes no output."""
    xc, xt = digits["calibration"][0], digits["test"][0]
    cal = [(xc[i:i + 100],) for i in range(0, 300, 100)]
    held_out = [(xt[i:i + 100],) for i in range(0, 300, 100)]             # the compiled batch is static: 100
    cm = graphopt.compile(classifier, (xc[:100],), layer_skip=graphopt.LayerSkip(budget=0.02), calibration=cal)
    assert kxk_convs(cm) <= 1 + 2 * 3, kxk_convs(cm)                       # stem + 2 per block left: one is gone
    assert held_out_cosine_error(cm, classifier, held_out) <= 1.5 * 0.02
    tight = graphopt.compile(classifier, (xc[:100],), layer_skip=graphopt.LayerSkip(budget=1e-9), calibration=cal)
    assert kxk_convs(tight) == 1 + 2 * 4
    assert any("no block fits" in n for r in tight.report for n in r.notes)
    assert held_out_cosine_error(tight, classifier, held_out) <= 1e-6


# --- early exit ------------------------------------------------------------------------------------
def test_early_exit_outputs_equal_full_model_for_samples_running_to_the_end(exiting, classifier, digits):
    cm, plan = exiting
    x = digits["test"][0]
    out = cm(x)
    exits = cm.last_exits
    n_exits = len(plan.thresholds)
    assert exits.shape == (len(x),) and n_exits >= 1
    assert (exits == n_exits).any() and (exits < n_exits).any(), "expected a batch with both kinds of samples"
    with torch.no_grad():
        ref = classifier(x)
    end = exits == n_exits
    torch.testing.assert_close(out[end], ref[end], rtol=1e-4, atol=1e-4)


def test_mixed_exit_batch_comes_back_in_order(exiting, digits):
    cm, _ = exiting
    x = digits["test"][0][:40]
    batch = cm(x)
    batch_exits = cm.last_exits.clone()
    assert len(set(batch_exits.tolist())) > 1
    one_by_one = torch.cat([cm(x[i:i + 1]) for i in range(len(x))])
    torch.testing.assert_close(batch, one_by_one, rtol=1e-4, atol=1e-4)
    reversed_out = cm(x.flip(0))
    torch.testing.assert_close(reversed_out.flip(0), batch, rtol=1e-4, atol=1e-4)
    assert torch.equal(cm.last_exits.flip(0), batch_exits)


def test_thresholds_respect_the_budget_on_held_out_data(exiting, classifier, digits):
    """Top-1 budget 3%, checked on the test split (never calibrated on) against the eager model with plain torch
    argmax: at most 2× the budget disagree (sampling slack), and samples do leave early — their outputs differ
    from the full model's (an early exit that never exits would pass the budget by doing nothing)."""
    cm, _ = exiting
    x = digits["test"][0]
    with torch.no_grad():
        out, ref = cm(x), classifier(x)
    disagree = (out.argmax(-1) != ref.argmax(-1)).float().mean().item()
    assert disagree <= 2 * 0.03                                     # unseen data: sampling slack
    changed = ((out - ref).abs().amax(-1) > 1e-3).float().mean().item()
    assert changed >= 0.1, f"only {changed:.1%} of the samples got an output other than the full model's"
    notes = "\n".join(next(r for r in cm.report if r.name == "early_exit").notes)
    assert "threshold" in notes and "held-out" in notes


def test_early_exit_outputs_are_the_plans_heads_recomputed_in_torch(exiting, classifier, digits):
    """The plan's exits recomputed independently: the eager model's block outputs (forward hooks) pooled in plain
    torch (per channel, mean and root mean square over the 8×8 map, as segments.Head documents), the exit's linear
    head applied, max softmax probability against the exit's threshold. Each sample's compiled output must be the
    head output at the first exit it clears, or the full model's output when it clears none; its recorded exit
    must be that exit. Samples within 1e-5 of a threshold (float32 vs float64 rounding) are not judged."""
    cm, plan = exiting
    x = digits["test"][0]
    n_exits = len(plan.thresholds)
    assert n_exits == len(plan.heads) == len(plan.after) >= 1
    hidden = {}
    hooks = [classifier.blocks[b].register_forward_hook(lambda m, i, o, b=b: hidden.__setitem__(b, o))
             for b in plan.after]
    try:
        with torch.no_grad():
            full = classifier(x)
    finally:
        for h in hooks:
            h.remove()
    want, exits = full.double().clone(), torch.full((len(x),), n_exits)
    close = torch.zeros(len(x), dtype=torch.bool)
    for k in reversed(range(n_exits)):                # the first exit cleared wins: walk back from the last
        assert f"blocks.{plan.after[k]}" in plan.labels[k]
        h = hidden[plan.after[k]].double()
        pooled = torch.cat([h.mean((2, 3)), h.square().mean((2, 3)).sqrt()], 1)
        logits = pooled @ plan.heads[k].weight.double().T + plan.heads[k].bias.double()
        conf = torch.softmax(logits, -1).amax(-1)
        taken = conf >= plan.thresholds[k]
        want[taken], exits[taken] = logits[taken], k
        close |= (conf - plan.thresholds[k]).abs() < 1e-5
    out = cm(x)
    judged = ~close
    assert judged.float().mean() >= 0.95
    assert (exits[judged] < n_exits).sum() >= 0.1 * len(x), "too few samples exit early to check the heads"
    assert torch.equal(cm.last_exits[judged], exits[judged]), (cm.last_exits[judged] != exits[judged]).sum()
    torch.testing.assert_close(out[judged].double(), want[judged], rtol=1e-4, atol=1e-4)


def test_export_and_load_run_without_the_model(exiting, digits, tmp_path):
    cm, plan = exiting
    x = digits["test"][0][:64]
    cm.export(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert len(manifest["segments"]) == len(plan.thresholds) + 1
    assert [e["threshold"] for e in manifest["exits"]] == plan.thresholds
    assert {"torch", "onnxruntime", "graphopt"} <= set(manifest["versions"])
    assert not list(tmp_path.glob("*.p*kl*"))
    loaded = graphopt.load(tmp_path)
    torch.testing.assert_close(loaded(x), cm(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(loaded.last_exits, cm.last_exits)
    (tmp_path / "segment1.onnx").write_bytes((tmp_path / "segment1.onnx").read_bytes() + b"\0")
    with pytest.raises(InputError, match="sha256"):
        graphopt.load(tmp_path)


# --- errors before any work ------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [0, 1, 1.5, -0.1, "0.01", True])
def test_budget_outside_zero_one_is_refused(budget):
    with pytest.raises(InputError, match="budget"):
        graphopt.LayerSkip(budget=budget)
    with pytest.raises(InputError, match="budget"):
        graphopt.EarlyExit(budget=budget)


def test_bad_metric_and_option_type_are_refused():
    with pytest.raises(InputError, match="metric"):
        graphopt.EarlyExit(budget=0.01, metric="accuracy")
    model = zoo.DigitsResNet(2, 4).eval()
    x = torch.randn(4, 1, 8, 8)
    with pytest.raises(InputError, match="graphopt.LayerSkip"):
        graphopt.compile(model, (x,), layer_skip=0.01, calibration=[(x,)])


def test_no_calibration_data_is_refused(monkeypatch):
    monkeypatch.setattr(graphopt.api, "capture", lambda *a, **k: pytest.fail("captured before the error"))
    model = zoo.DigitsResNet(2, 4).eval()
    x = torch.randn(4, 1, 8, 8)
    with pytest.raises(InputError, match="calibration"):
        graphopt.compile(model, (x,), layer_skip=graphopt.LayerSkip(0.01))
    with pytest.raises(InputError, match="at least 2 calibration batches"):
        graphopt.compile(model, (x,), early_exit=graphopt.EarlyExit(0.01), calibration=[(x,)])
    with pytest.raises(InputError, match="calibration batch 1"):   # shaped differently from the example
        graphopt.compile(model, (x,), layer_skip=graphopt.LayerSkip(0.01),
                         calibration=[(x,), (torch.randn(4, 1, 9, 9),)])


def test_model_without_skippable_blocks_says_what_was_looked_for(monkeypatch):
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    x = torch.randn(4, 8)
    monkeypatch.setattr(graphopt.passes.PassManager, "run", lambda *a: pytest.fail("ran passes before the error"))
    with pytest.raises(UnsupportedError, match=r"no skippable block; looked for residual blocks y = x \+ f\(x\)"):
        graphopt.compile(mlp, (x,), layer_skip=graphopt.LayerSkip(0.01), calibration=[(x,)])
    model, (ids,) = zoo.build("bert", batch=2, seq=8)                 # blocks, but no (batch, classes) output
    with pytest.raises(UnsupportedError, match="needs a classifier"):
        graphopt.compile(model, (ids,), early_exit=graphopt.EarlyExit(0.01), calibration=[(ids,), (ids,)])


# --- composition (slow: several compiles, TVM builds) -----------------------------------------------------
@pytest.mark.slow
def test_skipping_composes_with_quantize_and_runs_on_tvm(classifier, digits):
    xc = digits["calibration"][0]
    cal = [(xc[i:i + 100],) for i in range(0, 400, 100)]
    quantized = graphopt.compile(classifier, (xc[:100],), quantize="int8", calibration=cal,
                                 layer_skip=graphopt.LayerSkip(0.05, metric="top1"))
    names = [r.name for r in quantized.report]
    assert names.index("quantize") < names.index("layer_skip") < names.index("fuse_epilogues")
    with torch.no_grad():
        agree = (quantized(xc[:100]).argmax(-1) == classifier(xc[:100]).argmax(-1)).float().mean().item()
    assert agree >= 0.9
    on_tvm = graphopt.compile(classifier, (xc[:100],), backend="tvm", calibration=cal,
                              early_exit=graphopt.EarlyExit(0.05, metric="top1"))
    x = digits["test"][0][:64]
    out, exits = on_tvm(x), on_tvm.last_exits
    end = exits == len(on_tvm.executable.thresholds)
    with torch.no_grad():
        torch.testing.assert_close(out[end], classifier(x)[end], rtol=1e-4, atol=1e-4)
