"""The index of a dump directory: one row per step (pass or backend), in HTML and Markdown."""
from __future__ import annotations

import html
from pathlib import Path


def _delta(op_delta: dict[str, int], limit: int = 6) -> str:
    items = sorted(op_delta.items(), key=lambda kv: -abs(kv[1]))
    text = ", ".join(f"{v:+d} {k}" for k, v in items[:limit])
    return text + (f", … ({len(items) - limit} more)" if len(items) > limit else "")


def _drift(rec, tolerance: float) -> tuple[str, bool]:
    if rec.drift is None:
        return "not measured", False
    return f"{rec.drift.rel:.2e} (abs {rec.drift.max_abs:.2e})", rec.over(tolerance)


def write_report(folder: Path, records: list, tolerance: float) -> None:
    md = ["# graphopt compile report\n", f"Drift: max |out − eager| / max |eager| on the example inputs; "
          f"tolerance {tolerance:g}.\n", "| # | step | rewrites | ops before → after | op changes | drift | time | files |",
          "|---|---|---|---|---|---|---|---|"]
    rows = []
    for r in records:
        drift, bad = _drift(r, tolerance)
        md.append(f"| {r.index} | {r.name} | {r.rewrites} | {r.nodes_before} → {r.nodes_after} | "
                  f"{_delta(r.op_delta) or '—'} | {'**' + drift + '**' if bad else drift} | {r.time_s * 1e3:.0f} ms | "
                  + " ".join(f"[{f}]({r.folder}/{f})" for f in r.files) + " |")
        links = " ".join(f'<a href="{r.folder}/{f}">{f}</a>' for f in r.files)
        notes = ""
        if r.notes:
            items = "".join(f"<li>{html.escape(n)}</li>" for n in r.notes[:500])
            more = f"<li>… {len(r.notes) - 500} more in stats.json</li>" if len(r.notes) > 500 else ""
            opened = " open" if len(r.notes) <= 5 else ""
            notes = f"<details{opened}><summary>{len(r.notes)} notes</summary><ul>{items}{more}</ul></details>"
        rows.append(f"<tr{' class=bad' if bad else ''}><td>{r.index}</td><td><b>{html.escape(r.name)}</b>{notes}</td>"
                    f"<td>{r.rewrites}</td><td>{r.nodes_before} → {r.nodes_after}</td>"
                    f"<td>{html.escape(_delta(r.op_delta)) or '—'}</td><td>{drift}</td>"
                    f"<td>{r.time_s * 1e3:.0f} ms</td><td>{links}</td></tr>")
        md.extend(f"   - {n}" for n in r.notes[:20])
    (folder / "report.md").write_text("\n".join(md) + "\n")
    (folder / "report.html").write_text(f"""<!doctype html><meta charset=utf-8><title>graphopt report</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}} tr.bad{{background:#fdd}}
summary{{color:#555;font-size:90%;cursor:pointer}} li{{font-family:monospace;font-size:85%}}</style>
<h1>graphopt compile report</h1>
<p>One row per step: the captured graph, each pass, then the backend. Drift is max |out − eager| / max |eager|
over the outputs on the example inputs (tolerance {tolerance:g}; rows over it are red; after a quantization step, each step is checked against the quantized graph instead).</p>
<table><tr><th>#</th><th>step</th><th>rewrites</th><th>ops before → after</th><th>op changes</th><th>drift</th>
<th>time</th><th>files</th></tr>
{''.join(rows)}
</table>
""")
