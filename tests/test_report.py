"""report.html drawn and rendered in a real headless browser (Chromium): plots, pictures, decision tables, search,
and no console errors; report.json's documented schema; `graphopt report DIR`; large graphs drawn as the region a
pass changed."""
import json
import re

import pytest
import torch

import graphopt
from graphopt import zoo
from graphopt.cli import main as cli
from graphopt.report import instruments as dump_instruments

from conftest import chromium

STEP_KEYS = {"index", "name", "rewrites", "time_s", "nodes_before", "nodes_after", "op_delta", "notes", "drift",
             "checked", "folder", "files", "tables"}


class _NormedResNet(torch.nn.Module):
    """The tiny ResNet with a LayerNorm on its pooled features: a model ORT's SkipLayerNorm fusion is timed for, so
    the report draws the fusion choices too (a plain CNN has no ORT fusion to time)."""

    def __init__(self):
        super().__init__()
        self.resnet, args = zoo.build("resnet", size="tiny")
        self.norm = torch.nn.LayerNorm(self.resnet(*args).pooler_output.flatten(1).shape[1])
        self.args = args

    def forward(self, x):
        return self.norm(self.resnet(x).pooler_output.flatten(1))


@pytest.fixture(scope="module")
def quantized_dump(tmp_path_factory):
    model = _NormedResNet().eval()
    args = model.args
    folder = tmp_path_factory.mktemp("dump")
    graphopt.compile(model, args, quantize="int8", calibration=[(torch.randn_like(args[0]),) for _ in range(2)],
                     dump_dir=folder)
    return folder


def test_report_renders_in_chromium_with_plots_pictures_and_no_console_errors(quantized_dump):
    dom, log = chromium((quantized_dump / "report.html").as_uri() + "?q=quantize")
    assert not re.search(r"CONSOLE.*(Error|Uncaught)|Uncaught", log), log[-2000:]
    assert dom.count('class="plot drift"') == 1 and dom.count('class="plot steps"') == 1
    assert "tolerance 0.0001" in dom and "0 (exact)" in dom and "checked (verify)" in dom
    assert re.search(r'id="shown">\d+ matching steps<', dom)          # the search script ran, from ?q=
    # the quantization plan per layer and the ORT fusion choices are drawn as bars with their tables
    assert "int8 layers: weight SQNR" in dom and "ONNX Runtime fusions" in dom
    assert dom.count('class="plot decision"') >= 2
    links = re.findall(r'href="([^"]+)"', dom)
    pictures = [link for link in links if link.endswith(".svg")]
    assert pictures and all((quantized_dump / link).is_file() for link in links)
    assert any("before" in dom[m.start() - 60:m.start()] for m in re.finditer(r'href="[^"]+\.svg"', dom))


def test_report_json_follows_its_documented_schema_and_cli_renders_it_again(quantized_dump, capsys):
    data = json.loads((quantized_dump / "report.json").read_text())
    assert (data["schema"], data["version"], data["tolerance"]) == ("graphopt-dump", 1, 1e-4)
    assert all(set(step) == STEP_KEYS for step in data["steps"])
    quantize = next(s for s in data["steps"] if s["name"] == "quantize")
    table = quantize["tables"][0]
    assert set(table) == {"title", "columns", "rows", "bars", "unit"} and len(table["rows"]) == 9   # 9 convs
    assert all(b in table["columns"] for b in table["bars"])
    stats = json.loads((quantized_dump / quantize["folder"] / "stats.json").read_text())
    assert set(stats) == STEP_KEYS | {"op_counts"}
    (quantized_dump / "report.html").unlink()
    assert cli(["report", str(quantized_dump)]) == 0 and (quantized_dump / "report.html").is_file()
    assert "report.html" in capsys.readouterr().out
    (quantized_dump / "report.json").write_text("{")
    assert cli(["report", str(quantized_dump)]) == 2 and "cannot read a dump index" in capsys.readouterr().err


def test_a_large_graph_is_drawn_as_the_region_a_pass_changed(tmp_path, monkeypatch):
    monkeypatch.setattr(dump_instruments, "WHOLE_LIMIT", 20)
    model, args = zoo.build("bert", size="tiny", seq=16)
    graphopt.compile(model, args, dump_dir=tmp_path)
    attention = next(tmp_path.glob("*-fuse_attention"))
    after, before = (attention / "graph.dot").read_text(), (attention / "before.dot").read_text()
    assert re.search(r"after fuse_attention — \d+ of \d+ nodes: the \d+ changed", after)
    assert "graphopt.attention" in after and "graphopt.attention" not in before
    assert "aten.scaled_dot_product_attention" in before or "aten.softmax" in before
    assert "#ffb347" in after and 'style="filled,dashed"' in after     # changed nodes, and the region's edge
    assert not list(next(tmp_path.glob("*-fft_conv")).glob("*.dot"))   # unchanged: no picture of a large graph
