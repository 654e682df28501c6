"""Small inline SVG charts for the report: a step line on a log axis and grouped horizontal bars. Written by hand so
report.html stays one self-contained file with no script or network dependency."""
from __future__ import annotations

import html
import math

_COLOURS = ("#4c78a8", "#f58518", "#54a24b", "#b279a2")


def _fmt(v: float) -> str:
    return f"{v:.3g}" if v == v else "NaN"


def log_line(labels: list[str], values: list[float | None], *, title: str, limit: float | None = None,
             marked: set[int] = frozenset(), css: str = "plot", second: tuple[str, list] | None = None) -> str:
    """Values per step on a log axis (None: not measured, a gap; 0 on a floor of its own, NaN and infinity on a
    ceiling of their own), `limit` as a dashed line, `marked` steps as red dots with their value; `second` =
    (name, values) a second, dashed series."""
    w, h, left, right, top, bottom = 860, 250, 64, 110, 26, 80
    both = values + (second[1] if second else [])
    seen = [v for v in both if v is not None and math.isfinite(v) and v > 0] + ([limit] if limit else [])
    lo = 10 ** math.floor(math.log10(min(seen))) if seen else 1e-9
    hi = 10 ** math.ceil(math.log10(max(seen))) if seen else 1.0
    lo, hi = (lo / 10, hi * 10) if lo == hi else (lo, hi)
    zero = any(v == 0 for v in both)
    if zero:                    # exact zeros sit on a floor of their own, a decade below the smallest value
        lo /= 10
    broken = any(v is not None and not math.isfinite(v) for v in both)
    if broken:                  # NaN and infinity sit on a ceiling of their own, a decade above the largest value
        hi *= 10
    step = (w - left - right) / max(len(values) - 1, 1)
    x = lambda i: left + i * step
    y = lambda v: top + (h - top - bottom) * (1 - (math.log10(min(max(v, lo), hi)) - math.log10(lo)) /
                                              (math.log10(hi) - math.log10(lo))) if v == v else top
    out = [f'<svg class="{css}" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
           f'aria-label="{html.escape(title)}"><text x="{left}" y="16" class="title">{html.escape(title)}</text>']
    for e in range(int(round(math.log10(lo))), int(round(math.log10(hi))) + 1):
        yy = y(10 ** e)
        tick = ("0 (exact)" if zero and 10 ** e <= lo * 1.01 else "NaN / ∞" if broken and 10 ** e >= hi * 0.99
                else f"1e{e}")
        out.append(f'<line x1="{left}" x2="{w - right}" y1="{yy:.1f}" y2="{yy:.1f}" class="grid"/>'
                   f'<text x="{left - 6}" y="{yy + 4:.1f}" class="tick" text-anchor="end">{tick}</text>')
    if limit:
        out.append(f'<line x1="{left}" x2="{w - right}" y1="{y(limit):.1f}" y2="{y(limit):.1f}" class="limit"/>'
                   f'<text x="{w - right}" y="{y(limit) - 4:.1f}" class="tick" text-anchor="end">tolerance '
                   f'{limit:g}</text>')
    for series, cls in ((values, "line"), (second[1] if second else [], "line2")):
        run: list[str] = []
        for i, v in enumerate(series + [None]):
            if v is None:
                if len(run) > 1:
                    out.append(f'<polyline points="{" ".join(run)}" class="{cls}"/>')
                run = []
            else:
                run.append(f"{x(i):.1f},{y(v):.1f}")
    if second:
        out.append(f'<line x1="{w - right - 190}" x2="{w - right - 170}" y1="12" y2="12" class="line"/><text '
                   f'x="{w - right - 166}" y="16" class="tick">against eager</text><line x1="{w - right - 90}" '
                   f'x2="{w - right - 70}" y1="12" y2="12" class="line2"/><text x="{w - right - 66}" y="16" '
                   f'class="tick">{html.escape(second[0])}</text>')
    for i, (label, v) in enumerate(zip(labels, values)):
        out.append(f'<text transform="translate({x(i) + 3:.1f},{h - bottom + 10}) rotate(40)" class="tick">'
                   f'{html.escape(label)}</text>')
        if v is not None:
            cls = "bad" if i in marked else "dot"
            out.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="{5 if i in marked else 3}" class="{cls}">'
                       f'<title>{html.escape(label)}: {_fmt(v)}</title></circle>')
            if i in marked:
                out.append(f'<text x="{x(i) + 7:.1f}" y="{y(v) - 7:.1f}" class="badtext">{_fmt(v)}</text>')
    return "".join(out) + "</svg>"


def bars(labels: list[str], series: dict[str, list[float | None]], *, title: str, unit: str = "",
         css: str = "plot") -> str:
    """Horizontal bars per label, one bar per series (each series scaled to its own maximum), value at the end."""
    row_h, left, w = 12 * max(len(series), 1) + 8, 260, 760
    h = 34 + row_h * len(labels) + 18
    out = [f'<svg class="{css}" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
           f'aria-label="{html.escape(title)}">' + (f'<text x="0" y="16" class="title">{html.escape(title)}</text>'
                                                   if title else "")]
    for k, name in enumerate(series):
        out.append(f'<rect x="{left + 150 * k}" y="22" width="10" height="10" fill="{_COLOURS[k % 4]}"/>'
                   f'<text x="{left + 150 * k + 14}" y="31" class="tick">{html.escape(name)}</text>')
    peak = {name: max((abs(v) for v in vals if v is not None and v == v), default=0) or 1 for name, vals in series.items()}
    for i, label in enumerate(labels):
        y0 = 40 + i * row_h
        text = label if len(label) <= 44 else label[:14] + "…" + label[-29:]
        out.append(f'<text x="{left - 6}" y="{y0 + row_h / 2 + 2:.1f}" class="tick" text-anchor="end">'
                   f'<title>{html.escape(label)}</title>{html.escape(text)}</text>')
        for k, (name, vals) in enumerate(series.items()):
            v = vals[i]
            if v is None or v != v:
                continue
            length = (w - left - 90) * abs(v) / peak[name]
            out.append(f'<rect x="{left}" y="{y0 + 12 * k:.1f}" width="{max(length, 1):.1f}" height="10" '
                       f'fill="{_COLOURS[k % 4]}"><title>{html.escape(label)} · {html.escape(name)}: {_fmt(v)}'
                       f'{unit}</title></rect><text x="{left + length + 4:.1f}" y="{y0 + 12 * k + 9:.1f}" '
                       f'class="tick">{_fmt(v)}{unit}</text>')
    return "".join(out) + "</svg>"


def scatter(series: dict[str, list[tuple[float, float]]], *, x_label: str, y_label: str, limit: float | None = None,
            chosen: tuple[float, float] | None = None, css: str = "plot") -> str:
    """Points (x, y) per series on linear axes, the Pareto front of all points (least y for each x, lower-left
    staircase) as a line, `limit` as a dashed horizontal line, `chosen` circled."""
    w, h, left, right, top, bottom = 860, 320, 64, 190, 26, 44
    pts = [p for ps in series.values() for p in ps if all(math.isfinite(v) for v in p)]
    if not pts:
        return ""
    xs, ys = [p[0] for p in pts], [p[1] for p in pts] + ([limit] if limit else [])
    x0, x1 = min(xs), max(xs)
    y0, y1 = 0.0, max(ys) or 1.0
    x0, x1 = (x0 - 1, x1 + 1) if x0 == x1 else (x0 - 0.03 * (x1 - x0), x1 + 0.03 * (x1 - x0))
    X = lambda v: left + (w - left - right) * (v - x0) / (x1 - x0)          # noqa: E731
    Y = lambda v: top + (h - top - bottom) * (1 - (v - y0) / (y1 - y0 or 1))   # noqa: E731
    out = [f'<svg class="{css}" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="search">']
    for k in range(5):
        yv, xv = y0 + (y1 - y0) * k / 4, x0 + (x1 - x0) * k / 4
        out.append(f'<line x1="{left}" x2="{w - right}" y1="{Y(yv):.1f}" y2="{Y(yv):.1f}" class="grid"/>'
                   f'<text x="{left - 6}" y="{Y(yv) + 4:.1f}" class="tick" text-anchor="end">{_fmt(yv)}</text>'
                   f'<text x="{X(xv):.1f}" y="{h - bottom + 16}" class="tick" text-anchor="middle">{_fmt(xv)}</text>')
    out.append(f'<text x="{(left + w - right) / 2:.0f}" y="{h - 8}" class="tick" text-anchor="middle">'
               f'{html.escape(x_label)}</text><text x="12" y="{top - 8}" class="tick">{html.escape(y_label)}</text>')
    front, best = [], math.inf
    for x, y in sorted(pts):
        if y < best:
            front.append((x, y))
            best = y
    steps = []
    for (xa, ya), (xb, _) in zip(front, front[1:] + [(x1, None)]):
        steps += [f"{X(xa):.1f},{Y(ya):.1f}", f"{X(xb):.1f},{Y(ya):.1f}"]
    out.append(f'<polyline points="{" ".join(steps)}" class="line2"/>')
    if limit:
        out.append(f'<line x1="{left}" x2="{w - right}" y1="{Y(limit):.1f}" y2="{Y(limit):.1f}" class="limit"/>'
                   f'<text x="{w - right}" y="{Y(limit) - 4:.1f}" class="tick" text-anchor="end">budget {limit:g}</text>')
    for k, (name, ps) in enumerate(series.items()):
        colour = _COLOURS[k % 4] if k < 4 else "#888"
        out.append(f'<circle cx="{w - right + 16}" cy="{top + 14 * k}" r="4" fill="{colour}"/><text '
                   f'x="{w - right + 24}" y="{top + 14 * k + 4}" class="tick">{html.escape(name)}</text>')
        for x, y in ps:
            out.append(f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="3.5" fill="{colour}" fill-opacity="0.7">'
                       f'<title>{html.escape(name)}: {_fmt(x)}, {_fmt(y)}</title></circle>')
    if chosen:
        out.append(f'<circle cx="{X(chosen[0]):.1f}" cy="{Y(chosen[1]):.1f}" r="8" fill="none" stroke="#d62728" '
                   f'stroke-width="2"><title>chosen</title></circle>')
    return "".join(out) + "</svg>"
