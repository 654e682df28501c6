"""DOT pictures of the IR (SVG too when graphviz's `dot` is installed).

Weights are folded into their consumer's label to keep pictures of real models legible; nodes a
pass created are drawn highlighted so a dump shows at a glance what the pass did."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import torch.fx as fx

from .graph import Graph, op_name
from .text import type_str

_FILL = {"placeholder": "#cfe8ff", "output": "#cfe8ff", "call_module": "#eeeeee"}


def _label(node: fx.Node) -> str:
    if node.op in ("placeholder", "output"):
        head = node.name
    else:
        head = op_name(node)
    weights = [a.target.rsplit(".", 1)[-1] for a in node.all_input_nodes if a.op == "get_attr"]
    extra = f"\\n+{', '.join(weights)}" if weights else ""
    return f"{head}\\n{type_str(node) if node.op != 'output' else ''}{extra}".replace('"', "'")


def graph_dot(graph: Graph, highlight: set[str] = frozenset(), title: str = "") -> str:
    lines = ["digraph G {", f'  label="{title}"; labelloc=t;', "  node [shape=box, style=filled, fontname=Helvetica, fontsize=10];"]
    for n in graph.fx.nodes:
        if n.op == "get_attr":
            continue
        fill = "#ffb347" if n.name in highlight else _FILL.get(n.op, "#ffffff")
        lines.append(f'  "{n.name}" [label="{_label(n)}", fillcolor="{fill}"];')
        for inp in n.all_input_nodes:
            if inp.op != "get_attr":
                lines.append(f'  "{inp.name}" -> "{n.name}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_picture(dot_text: str, folder: Path, stem: str = "graph", timeout_s: float = 60) -> Path:
    """Write `stem.dot`, and `stem.svg` when graphviz is available; returns the file to look at."""
    dot_path = folder / f"{stem}.dot"
    dot_path.write_text(dot_text)
    exe = shutil.which("dot")
    if exe is None:
        return dot_path
    svg_path = folder / f"{stem}.svg"
    try:
        subprocess.run([exe, "-Tsvg", str(dot_path), "-o", str(svg_path)], check=True, timeout=timeout_s,
                       capture_output=True)
    except (subprocess.SubprocessError, OSError):
        return dot_path
    return svg_path
