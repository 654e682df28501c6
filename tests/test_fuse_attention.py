"""Attention fusion on hand models (SDPA, written-out softmax attention, masks, causal) and real
transformers; negative cases must stay unfused and say why."""
import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt import zoo
from conftest import assert_matches

FUSED = "graphopt.attention"


class MHA(nn.Module):
    def __init__(self, e=32, heads=4, written_out=False, causal=False, dropout=0.0, gqa=False):
        super().__init__()
        self.h, self.written_out, self.causal, self.dropout, self.gqa = heads, written_out, causal, dropout, gqa
        self.q, self.k, self.v, self.o = (nn.Linear(e, e) for _ in range(4))

    def split(self, x, heads):
        b, s, e = x.shape
        return x.view(b, s, heads, e // heads).transpose(1, 2)

    def forward(self, x, mask=None):
        b, s, e = x.shape
        kv_heads = self.h // 2 if self.gqa else self.h
        q = self.split(self.q(x), self.h)
        k = self.split(self.k(x)[..., : e * kv_heads // self.h], kv_heads)
        v = self.split(self.v(x)[..., : e * kv_heads // self.h], kv_heads)
        if self.written_out:
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if mask is not None:
                scores = scores + mask
            out = scores.softmax(-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal,
                                                 dropout_p=self.dropout, enable_gqa=self.gqa)
        return self.o(out.transpose(1, 2).reshape(b, s, e))


def compile_and_notes(model, inputs):
    cm = graphopt.compile(model, inputs)
    step = next(r for r in cm.report if r.name == "fuse_attention")
    return cm, step


X = torch.randn(2, 10, 32)


@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"written_out": True}])
def test_fused_without_mask(kw):
    model = MHA(**kw).eval()
    cm, step = compile_and_notes(model, (X,))
    assert cm.graph.op_counts().get(FUSED) == 1, step.notes
    assert "aten.permute" not in cm.graph.op_counts()        # head split and merge folded in
    assert_matches(cm, model, (X,))


def test_bool_padding_mask_becomes_bias():
    model = MHA().eval()
    mask = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    mask[0, ..., 7:] = False
    cm, step = compile_and_notes(model, (X, mask))
    assert cm.graph.op_counts().get(FUSED) == 1 and "additive bias" in step.notes[0]
    assert_matches(cm, model, (X, mask))


def test_written_out_with_float_mask():
    model = MHA(written_out=True).eval()
    mask = torch.zeros(2, 1, 10, 10)
    mask[1, :, :, 6:] = -1e4
    cm, step = compile_and_notes(model, (X, mask))
    assert any("written-out attention" in n for n in step.notes)
    assert cm.graph.op_counts().get(FUSED) == 1 and "aten._softmax" not in cm.graph.op_counts()
    assert_matches(cm, model, (X, mask))


@pytest.mark.parametrize("kw,reason", [({"dropout": 0.1}, "dropout_p=0.1"), ({"gqa": True}, "grouped-query")])
def test_not_fused_and_why(kw, reason):
    model = MHA(**kw).eval()
    cm, step = compile_and_notes(model, (X,))
    assert FUSED not in cm.graph.op_counts()
    assert any(reason in n for n in step.notes), step.notes
    if not kw.get("dropout"):
        assert_matches(cm, model, (X,))


def test_softmax_that_is_not_attention_is_left_alone():
    class SoftmaxHead(nn.Module):
        def forward(self, x):
            return x.softmax(-1) * 2
    cm, step = compile_and_notes(SoftmaxHead().eval(), (X,))
    assert any("not consumed by exactly one matmul" in n for n in step.notes)


@pytest.mark.parametrize("name", ["bert", "gpt2", "vit", "t5_encoder", "llama", "swin"])
def test_real_transformers_fuse_every_layer(name):
    model, inputs = zoo.build(name, size="tiny", batch=2)
    cm, step = compile_and_notes(model, inputs)
    layers = 2
    assert cm.graph.op_counts().get(FUSED) == layers, step.notes
    assert_matches(cm, model, inputs)
    onnx_ops = cm.report[-1].notes[0]
    assert re.search(r"[(,] ?Attention \d", onnx_ops) and "Softmax" not in onnx_ops, onnx_ops   # ONNX's, opset 23


def test_gpt2_eager_attention_written_out():
    from transformers import GPT2Config, GPT2Model
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=1000, use_cache=False, attn_implementation="eager")
    model, ids = GPT2Model(cfg).eval(), (torch.randint(0, 1000, (2, 16)),)
    cm, step = compile_and_notes(model, ids)
    assert sum("written-out attention" in n for n in step.notes) == 2, step.notes
    assert cm.graph.op_counts().get(FUSED) == 2
    assert_matches(cm, model, ids)


def test_bert_with_padding_mask():
    model, (ids,) = zoo.build("bert", size="tiny", batch=2)
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    cm = graphopt.compile(model, (ids, mask))
    assert cm.graph.op_counts().get(FUSED) == 2
    assert_matches(cm, model, (ids, mask))


@pytest.mark.parametrize("name,qkv", [("bert", ("query", "key", "value")), ("llama", ("q_proj", "k_proj", "v_proj"))])
def test_each_fused_attention_reads_its_own_layers_q_k_v_in_place(name, qkv):
    """Counts and numbers can both pass with a wrong set of fusions (a swapped q/k at equal head size is
    numerically close on random weights): the fused op's q, k, v must come from one layer's projections."""
    model, inputs = zoo.build(name, size="tiny", batch=2)
    cm = graphopt.compile(model, inputs)
    fused = [n for n in cm.graph.fx.nodes if str(n.target) == FUSED + ".default"]
    sources = []
    for node in fused:
        weights = []
        for arg in node.args[:3]:
            while str(arg.target) != "aten.linear.default":     # back through head split / rotary ops to the projection
                arg = arg.args[0]
            weights.append(arg.args[1].target)
        sources.append(weights)
    layer = re.compile(r"layers?\.(\d+)\.")
    assert [{layer.search(w)[1] for w in ws} for ws in sources] == [{"0"}, {"1"}], sources
    assert all(p in w for ws in sources for p, w in zip(qkv, ws)), sources


def test_onnx_opset_is_23_only_where_an_op_needs_it():
    """ONNX's Attention is opset 23: a graph with graphopt.attention is exported at 23, one without at the
    exporter's default (older ORT builds load it)."""
    def opset(cm):
        return next(o.version for o in cm.executable.artifact().opset_import if o.domain in ("", "ai.onnx"))
    with_attention = graphopt.compile(MHA().eval(), (X,))
    without = graphopt.compile(nn.Sequential(nn.Linear(32, 32), nn.ReLU()).eval(), (X,))
    assert with_attention.graph.op_counts().get(FUSED) == 1
    assert opset(with_attention) == 23 and opset(without) < 23, (opset(with_attention), opset(without))
