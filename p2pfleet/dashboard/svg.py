"""Inline SVG charts for the owner's dashboard, generated server-side (no JavaScript).

Pure functions from numbers to SVG text; every label is escaped. Charts scale to the page
width (viewBox, width 100%), so they stay readable on a phone.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

W, H, PAD_L, PAD_B, PAD_T = 600, 180, 44, 28, 10


def _e(x: object) -> str:
    return escape(str(x), quote=True)


def _num(x: float) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def bar_chart(chart_id: str, title: str, labels: Sequence[str],
              series: Sequence[tuple[str, Sequence[float], str]], unit: str) -> str:
    """Stacked bars, one per label; `series` is (name, values, colour) each."""
    n = max(1, len(labels))
    totals = [sum(s[1][i] for s in series) for i in range(len(labels))]
    top = max(totals, default=0) or 1
    plot_w, plot_h = W - PAD_L - 6, H - PAD_B - PAD_T
    slot = plot_w / n
    bar = max(2.0, min(48.0, slot * 0.7))
    parts = [f'<svg id="{_e(chart_id)}" class="chart" viewBox="0 0 {W} {H}" width="100%" '
             f'role="img" aria-label="{_e(title)}"><title>{_e(title)}</title>',
             f'<line x1="{PAD_L}" y1="{PAD_T + plot_h}" x2="{W - 6}" y2="{PAD_T + plot_h}" '
             'stroke="#888"/>',
             f'<text x="{PAD_L - 4}" y="{PAD_T + 8}" text-anchor="end" font-size="11">'
             f'{_e(_num(top))}</text>',
             f'<text x="{PAD_L - 4}" y="{PAD_T + plot_h}" text-anchor="end" font-size="11">0</text>',
             f'<text x="4" y="{PAD_T + plot_h / 2}" font-size="11">{_e(unit)}</text>']
    every = max(1, round(n / 8))  # at most ~8 day labels
    for i, label in enumerate(labels):
        x = PAD_L + i * slot + (slot - bar) / 2
        y = PAD_T + plot_h
        for name, values, colour in series:
            v = values[i]
            if v <= 0:
                continue
            h = plot_h * v / top
            y -= h
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                         f'fill="{_e(colour)}"><title>{_e(label)}: {_e(name)} {_e(_num(v))} '
                         f'{_e(unit)}</title></rect>')
        if i % every == 0:
            parts.append(f'<text x="{x + bar / 2:.1f}" y="{H - 10}" text-anchor="middle" '
                         f'font-size="11">{_e(label[5:] if len(label) == 10 else label)}</text>')
    parts.append("</svg>")
    legend = " ".join(f'<span class="key"><i style="background:{_e(c)}"></i>{_e(name)}</span>'
                      for name, _v, c in series)
    return "".join(parts) + f'<div class="legend">{legend}</div>'


def timeline_chart(chart_id: str, points: Sequence[Sequence], t0: float, t1: float,
                   ticks: Sequence[tuple[float, str]]) -> str:
    """Battery charge (line, 0-100 %) over [t0, t1] with plugged-in time shaded.
    `points` are [t, soc_pct, plugged_in, parked]; `ticks` are (t, label) for the time axis."""
    plot_w, plot_h = W - PAD_L - 6, H - PAD_B - PAD_T
    span = max(t1 - t0, 1.0)

    def x(t: float) -> float:
        return PAD_L + plot_w * (min(max(t, t0), t1) - t0) / span

    def y(soc: float) -> float:
        return PAD_T + plot_h * (1 - min(max(soc, 0.0), 100.0) / 100)

    parts = [f'<svg id="{_e(chart_id)}" class="chart" viewBox="0 0 {W} {H}" width="100%" '
             'role="img" aria-label="battery and plug timeline"><title>battery and plug '
             'timeline</title>']
    for start, end in plugged_spans(points, t1):
        parts.append(f'<rect class="plugged" x="{x(start):.1f}" y="{PAD_T}" '
                     f'width="{max(0.5, x(end) - x(start)):.1f}" height="{plot_h}" '
                     'fill="#cde8c4"/>')
    for soc in (0, 50, 100):
        parts.append(f'<line x1="{PAD_L}" y1="{y(soc):.1f}" x2="{W - 6}" y2="{y(soc):.1f}" '
                     f'stroke="#ddd"/><text x="{PAD_L - 4}" y="{y(soc) + 4:.1f}" '
                     f'text-anchor="end" font-size="11">{soc}%</text>')
    if points:
        line = " ".join(f"{x(p[0]):.1f},{y(p[1]):.1f}" for p in points)
        if len(points) == 1 or points[-1][0] < t1:
            line += f" {x(t1):.1f},{y(points[-1][1]):.1f}"
        parts.append(f'<polyline points="{line}" fill="none" stroke="#1f5fa8" '
                     'stroke-width="2"/>')
    for t, label in ticks:
        parts.append(f'<text x="{x(t):.1f}" y="{H - 10}" text-anchor="middle" '
                     f'font-size="11">{_e(label)}</text>')
    parts.append("</svg>")
    return "".join(parts) + ('<div class="legend"><span class="key"><i style="background:'
                             '#1f5fa8"></i>battery charge</span> <span class="key"><i '
                             'style="background:#cde8c4"></i>plugged in</span></div>')


def plugged_spans(points: Sequence[Sequence], t1: float) -> list[tuple[float, float]]:
    """(start, end) of each plugged-in stretch: from a point saying plugged in to the next
    saying not (or `t1`)."""
    spans: list[tuple[float, float]] = []
    start = None
    for p in points:
        if p[2] and start is None:
            start = p[0]
        elif not p[2] and start is not None:
            spans.append((start, p[0]))
            start = None
    if start is not None:
        spans.append((start, t1))
    return spans


def meter(meter_id: str, used: float, cap: float | None, label: str) -> str:
    """A horizontal bar: `used` against `cap` (no cap: an empty bar saying so)."""
    frac = 0.0 if not cap else min(1.0, used / cap)
    colour = "#c0392b" if frac >= 1 else ("#e0a020" if frac >= 0.8 else "#2e8b57")
    return (f'<div class="meter" id="{_e(meter_id)}"><div class="fill" style="width:'
            f'{frac * 100:.1f}%;background:{colour}"></div></div><div class="meter-label">'
            f'{_e(label)}</div>')
