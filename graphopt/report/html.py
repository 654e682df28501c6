"""The index of a dump directory: report.json (the steps as data, schema below), rendered as report.html (one
self-contained page: drift and time plots, searchable steps, each pass's decision tables drawn) and report.md.

report.json — schema "graphopt-dump", version 1; stable: fields are only added, and a change in meaning bumps the
version. `{"schema", "version", "tolerance", "steps": [step, ...]}`, a step being the StepRecord fields:
`index`, `name` (pass, "captured" or "backend-…"), `rewrites`, `time_s`, `nodes_before`, `nodes_after`,
`op_delta` {op: change}, `notes` [str], `drift` and `checked` ({"max_abs_err", "rel_err", "worst_output"} or
null: the outputs against eager, and what verify bounds — after a lossy pass, against that pass's outputs),
`folder` (the step's NN-name/ folder, or null), `files` (in it: graph.txt, diff.txt, graph.svg|.dot, before.svg,
stats.json), `tables` [{"title", "columns", "rows", "bars" (numeric columns drawn), "unit"}]. Each folder's
stats.json is the same step plus `op_counts`. `graphopt report DIR` renders report.html again from report.json."""
from __future__ import annotations

import html
import json
from pathlib import Path

from ..errors import InputError
from .plots import bars, log_line, scatter

SCHEMA, VERSION = "graphopt-dump", 1


def write_report(folder: Path, records: list, tolerance: float) -> None:
    data = {"schema": SCHEMA, "version": VERSION, "tolerance": tolerance, "steps": [r.as_dict() for r in records]}
    (folder / "report.json").write_text(json.dumps(data, indent=1))
    render(folder, data)


def render(folder: Path, data: dict | None = None) -> Path:
    """Write report.html and report.md in `folder` from `data` (default: its report.json)."""
    if data is None:
        path = folder / "report.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: cannot read a dump index ({e}); give a folder written with dump_dir=") from e
        if data.get("schema") != SCHEMA or data.get("version") != VERSION:
            raise InputError(f"{path}: not a {SCHEMA} v{VERSION} index")
    steps, tolerance = data["steps"], data["tolerance"]
    (folder / "report.md").write_text(_markdown(steps, tolerance))
    (folder / "report.html").write_text(_html(steps, tolerance))
    return folder / "report.html"


def _over(step: dict, tolerance: float) -> bool:
    return step["checked"] is not None and not step["checked"]["rel_err"] <= tolerance   # NaN is over too


def _delta(op_delta: dict[str, int], limit: int = 6) -> str:
    items = sorted(op_delta.items(), key=lambda kv: -abs(kv[1]))
    text = ", ".join(f"{v:+d} {k}" for k, v in items[:limit])
    return text + (f", … ({len(items) - limit} more)" if len(items) > limit else "")


def _drift(step: dict) -> str:
    d = step["drift"]
    return "not measured" if d is None else f"{d['rel_err']:.2e} (abs {d['max_abs_err']:.2e})"


def _pictures(steps: list[dict], i: int) -> list[tuple[str, str]]:
    """(label, path) links for step i: the graph before it (its own before.svg, else the previous step's picture),
    after it, the diff, the text and the stats."""
    step = steps[i]
    if not step["folder"]:
        return []
    picture = lambda s: next((f for f in s["files"] if f in ("graph.svg", "graph.dot")), None)
    links = []
    if "before.svg" in step["files"]:
        links.append(("before", f"{step['folder']}/before.svg"))
    elif step["rewrites"]:
        previous = next((s for s in reversed(steps[:i]) if s["folder"] and picture(s)), None)
        if previous is not None:
            links.append(("before", f"{previous['folder']}/{picture(previous)}"))
    if picture(step):
        links.append(("after" if i else "graph", f"{step['folder']}/{picture(step)}"))
    links += [(label, f"{step['folder']}/{name}") for name, label in
              (("diff.txt", "diff"), ("graph.txt", "text"), ("stats.json", "stats")) if name in step["files"]]
    return links


def _table_html(table: dict) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table["columns"])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>" for row in table["rows"])
    chart = ""
    if table.get("scatter") and table["rows"]:
        chart = scatter_chart(table)
    elif table["bars"] and table["rows"]:
        labels = [str(r[0]) for r in table["rows"]]
        series = {b: [_number(r[table["columns"].index(b)]) for r in table["rows"]] for b in table["bars"]}
        chart = bars(labels, series, title="", unit=table["unit"], css="plot decision")
    opened = " open" if len(table["rows"]) <= 40 else ""
    return (f'<section class="decision"><h3>{html.escape(table["title"])}</h3>{chart}<details{opened}><summary>'
            f'{len(table["rows"])} rows</summary><table class="rows"><tr>{head}</tr>{body}</table></details></section>')


def scatter_chart(table: dict) -> str:
    """A table's rows as points (a search's plans: latency vs loss), one series per value of the kind column."""
    spec, cols = table["scatter"], table["columns"]
    series: dict[str, list[tuple[float, float]]] = {}
    chosen = None
    for i, row in enumerate(table["rows"]):
        x, y = _number(row[cols.index(spec["x"])]), _number(row[cols.index(spec["y"])])
        if x is None or y is None:
            continue
        series.setdefault(str(row[cols.index(spec["kind"])]), []).append((x, y))
        if i == spec.get("chosen"):
            chosen = (x, y)
    return scatter(series, x_label=spec["x"], y_label=spec["y"], limit=spec.get("limit"), chosen=chosen,
                   css="plot decision")


def _cell(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _number(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _html(steps: list[dict], tolerance: float) -> str:
    lossy = {i for i, s in enumerate(steps) if any("lossy by design" in n for n in s["notes"])}
    labels = [f"{s['index']} {s['name']}{' (lossy)' if i in lossy else ''}" for i, s in enumerate(steps)]
    drift_plot = log_line(labels, [s["drift"]["rel_err"] if s["drift"] else None for s in steps],
                          title="drift per step: max |out − eager| / max |eager| (log scale; red: over tolerance)",
                          limit=tolerance, marked={i for i, s in enumerate(steps) if _over(s, tolerance)},
                          css="plot drift", second=("checked (verify)", [s["checked"]["rel_err"] if s["checked"]
                                                                         else None for s in steps]))
    time_plot = bars(labels, {"time (ms)": [s["time_s"] * 1e3 for s in steps],
                              "ops after": [float(s["nodes_after"]) for s in steps]},
                     title="time and op count per step", css="plot steps")
    rows = []
    for i, s in enumerate(steps):
        notes = ""
        if s["notes"]:
            items = "".join(f"<li>{html.escape(n)}</li>" for n in s["notes"][:500])
            more = f"<li>… {len(s['notes']) - 500} more in stats.json</li>" if len(s["notes"]) > 500 else ""
            opened = " open" if len(s["notes"]) <= 5 else ""
            notes = f"<details{opened}><summary>{len(s['notes'])} notes</summary><ul>{items}{more}</ul></details>"
        links = " ".join(f'<a href="{html.escape(p)}">{label}</a>' for label, p in _pictures(steps, i))
        rows.append(f"<tr id=step{s['index']}{' class=bad' if _over(s, tolerance) else ''}><td>{s['index']}</td>"
                    f"<td><b>{html.escape(s['name'])}</b>{notes}</td><td>{s['rewrites']}</td>"
                    f"<td>{s['nodes_before']} → {s['nodes_after']}</td><td>{html.escape(_delta(s['op_delta'])) or '—'}"
                    f"</td><td>{_drift(s)}</td><td>{s['time_s'] * 1e3:.0f} ms</td><td>{links}</td></tr>")
    decisions = "".join(f'<h2 id=decisions{s["index"]}>{s["index"]} {html.escape(s["name"])}</h2>' +
                        "".join(_table_html(t) for t in s["tables"]) for s in steps if s.get("tables"))
    bad = [s for s in steps if _over(s, tolerance)]
    verdict = (f"<p class=badtext>step {bad[0]['index']} '{html.escape(bad[0]['name'])}' is the first over the "
               f"tolerance</p>" if bad else "<p>every checked step is within the tolerance</p>")
    return f"""<!doctype html><html lang=en><meta charset=utf-8><title>graphopt report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}} tr.bad{{background:#fdd}}
summary{{color:#555;font-size:90%;cursor:pointer}} li{{font-family:monospace;font-size:85%}}
svg.plot{{display:block;margin:1em 0;max-width:100%;height:auto}} .title{{font-size:13px;font-weight:bold}}
.tick{{font-size:10px;fill:#333}} .grid{{stroke:#eee}} .limit{{stroke:#d62728;stroke-dasharray:5 4}}
.line{{fill:none;stroke:#4c78a8;stroke-width:2}} .dot{{fill:#4c78a8}}
.line2{{fill:none;stroke:#54a24b;stroke-width:2;stroke-dasharray:6 3}} .bad{{fill:#d62728}}
.badtext{{fill:#d62728;color:#d62728;font-size:12px}} table.rows td{{font-family:monospace;font-size:85%}}
#search{{font-size:14px;padding:4px;width:28em}} tr.hidden{{display:none}}</style>
<h1>graphopt compile report</h1>
<p>{len(steps)} steps: the captured graph, each pass, then the backend. Drift is max |out − eager| / max |eager|
over the outputs on the example inputs (tolerance {tolerance:g}; rows over it are red; after a lossy step, each later
step is checked against that step's outputs instead).</p>{verdict}
{drift_plot}{time_plot}
<p><input id=search type=search placeholder="search steps and notes (e.g. a node name, an op, 'not rewritten')">
<span id=shown></span></p>
<table id=steps><tr><th>#</th><th>step</th><th>rewrites</th><th>ops before → after</th><th>op changes</th>
<th>drift</th><th>time</th><th>pictures and files</th></tr>
{''.join(rows)}
</table>
{'<h2>Decisions per pass</h2>' + decisions if decisions else ''}
<script>
const box = document.getElementById("search"), shown = document.getElementById("shown");
function filter() {{
  const q = box.value.toLowerCase(); let n = 0;
  for (const row of document.querySelectorAll("#steps tr[id]")) {{
    const hit = !q || row.textContent.toLowerCase().includes(q);
    row.classList.toggle("hidden", !hit); n += hit;
    if (q && hit) for (const d of row.querySelectorAll("details")) d.open = true;
  }}
  shown.textContent = q ? `${{n}} matching steps` : `${{n}} steps`;
}}
box.value = new URLSearchParams(location.search).get("q") || "";
box.addEventListener("input", filter);
filter();
</script></html>
"""


def _markdown(steps: list[dict], tolerance: float) -> str:
    md = ["# graphopt compile report\n", f"Drift: max |out − eager| / max |eager| on the example inputs; "
          f"tolerance {tolerance:g}.\n", "| # | step | rewrites | ops before → after | op changes | drift | time | files |",
          "|---|---|---|---|---|---|---|---|"]
    for s in steps:
        drift = _drift(s)
        md.append(f"| {s['index']} | {s['name']} | {s['rewrites']} | {s['nodes_before']} → {s['nodes_after']} | "
                  f"{_delta(s['op_delta']) or '—'} | {'**' + drift + '**' if _over(s, tolerance) else drift} | "
                  f"{s['time_s'] * 1e3:.0f} ms | " + " ".join(f"[{f}]({s['folder']}/{f})" for f in s["files"]) + " |")
        md.extend(f"   - {n}" for n in s["notes"][:20])
    return "\n".join(md) + "\n"
