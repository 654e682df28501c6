"""DOT pictures of the IR (SVG too when graphviz's `dot` is installed).

Weights are folded into their consumer's label to keep pictures of real models legible; nodes a
pass created are drawn highlighted so a dump shows at a glance what the pass did. A graph too large to read
whole (BERT-base: ~1,000 nodes) is drawn as the region a pass changed: those nodes and two steps around them,
from the graph text before and after the pass (`region_dot`)."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import networkx as nx

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


WHOLE_LIMIT = 250          # nodes; larger graphs are drawn as the changed region
_LINE = re.compile(r"^  %(\w+) = ([^(]+)\((.*)\) : (.*)$")


def text_nodes(text: str) -> dict[str, tuple[str, str, list[str]]]:
    """The nodes of a graph text (graph_text), inputs first: name → (op, type, input node names)."""
    nodes = {}
    for line in text.splitlines():
        if line.startswith("graph("):          # inputs: graph(%x: f32[..], ...)
            nodes.update((name, ("input", typ, [])) for name, typ in re.findall(r"%(\w+): ([^,)]+(?:\[[^]]*\])?)", line))
        elif m := _LINE.match(line):
            name, op, args, typ = m.groups()
            nodes[name] = (op, typ, re.findall(r"%(\w+)", args))
    return nodes


def region_dot(text: str, centre: set[str], title: str, hops: int = 2, limit: int = 400) -> str:
    """The nodes of `centre` (highlighted) and those within `hops` edges of them, from a graph text; nodes with
    edges leaving the region are dashed. With no centre, the first nodes in order (the input end)."""
    nodes = text_nodes(text)
    g = nx.Graph()
    g.add_nodes_from(nodes)
    g.add_edges_from((i, n) for n, (_, _, ins) in nodes.items() for i in ins if i in nodes)
    centre = {c for c in centre if c in nodes}
    near = nx.multi_source_dijkstra_path_length(g, centre, cutoff=hops) if centre else {}
    keep = set([n for n in nodes if n in near][:limit] if centre else list(nodes)[:limit // 3])
    shown = f"{len(keep)} of {len(nodes)} nodes: " + (f"the {len(centre)} changed (orange) and {hops} steps around "
                                                      "them" if centre else "the input end")
    lines = ["digraph G {", f'  label="{title} — {shown}"; labelloc=t;',
             "  node [shape=box, style=filled, fontname=Helvetica, fontsize=10];"]
    for n in (n for n in nodes if n in keep):
        op, typ, ins = nodes[n]
        open_edge = any(m not in keep for m in g[n])
        style = ', style="filled,dashed"' if open_edge else ""
        fill = "#ffb347" if n in centre else _FILL.get("placeholder" if op == "input" else "", "#ffffff")
        label = f"{n if op == 'input' else op}\\n{typ}".replace('"', "'")
        lines.append(f'  "{n}" [label="{label}", fillcolor="{fill}"{style}];')
        lines += [f'  "{i}" -> "{n}";' for i in ins if i in keep]
    lines.append("}")
    return "\n".join(lines) + "\n"
