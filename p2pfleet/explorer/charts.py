"""The explorer's capacity-over-time chart: available and used samples/s in total and by
hardware class, drawn server-side as SVG (readable with JavaScript off). The vendored
static/explorer.js only enhances it: values on hover, hardware classes toggled on and off;
it reads the data from the SVG's `data-points` attribute (pure: history in, HTML out).
"""

from __future__ import annotations

import html
import json
import time
from typing import Any

from .model import ESTIMATED_NODE_W

PALETTE = ("#1f77b4", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")
TOTAL_COLORS = {"available": "#080", "used": "#d70"}
ASSUMPTION = (f"kW is estimated at {ESTIMATED_NODE_W:g} W per computing node (the default "
              "full load of a node's energy accounting, config policy.power_w): capacity "
              "records say nothing about power.")


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def amount(v: float) -> str:
    """A samples/s figure short enough for an axis: 950, 12.5 k, 2.4 M."""
    if v >= 1e6:
        return f"{v / 1e6:.3g} M"
    if v >= 1e3:
        return f"{v / 1e3:.3g} k"
    return f"{v:.3g}"


def classes(history: list[dict]) -> list[str]:
    seen: set[str] = set()
    for h in history:
        seen.update((h.get("by_class") or {}).keys())
    return sorted(seen)


def capacity_chart(history: list[dict], width: int = 640, height: int = 240) -> str:
    """SVG chart plus an HTML legend; series carry `data-series` for the script's toggles."""
    if not history:
        return "<p>No samples yet.</p>"
    pad_l, pad_r, pad_t, pad_b = 44, 12, 22, 30
    t0, t1 = history[0]["t"], history[-1]["t"]
    span = (t1 - t0) or 1.0
    top = max(max(h["available"], h["used"]) for h in history) or 1.0
    plot_w, plot_h = width - pad_l - pad_r, height - pad_t - pad_b

    def xy(t: float, v: float) -> str:
        return f"{pad_l + (t - t0) / span * plot_w:.1f},{pad_t + plot_h - v / top * plot_h:.1f}"

    def line(key: str, values: list[tuple[float, float]], color: str, w: float, dash: str,
             opacity: float = 1.0) -> str:
        pts = " ".join(xy(t, v) for t, v in values)
        one = "" if len(values) > 1 else (
            f'<circle r="3" fill="{color}" cx="{pts.split(",")[0]}" cy="{pts.split(",")[1]}"/>')
        return (f'<g data-series="{_e(key)}"><polyline fill="none" stroke="{color}" '
                f'stroke-width="{w}" stroke-opacity="{opacity}"{dash} points="{pts}"/>{one}</g>')

    # totals wide and pale underneath, so a class line that equals its total shows on it
    series = [line(k, [(h["t"], h[k]) for h in history], c, 5, "", 0.45)
              for k, c in TOTAL_COLORS.items()]
    legend = [f'<label class="series-key" data-series="{k}"><span style="color:{c}">━</span> '
              f"{k} (all classes)</label>" for k, c in TOTAL_COLORS.items()]
    for i, hw in enumerate(classes(history)):
        color = PALETTE[i % len(PALETTE)]
        for kind, dash in (("available", ""), ("used", ' stroke-dasharray="4,3"')):
            vals = [(h["t"], ((h.get("by_class") or {}).get(hw) or {}).get(kind, 0.0))
                    for h in history]
            series.append(line(f"{hw}:{kind}", vals, color, 1.3, dash))
        legend.append(f'<label class="series-key" data-series="{_e(hw)}"><span style="color:'
                      f'{color}">━ ╌</span> class <code>{_e(hw)}</code> available, used</label>')
    ticks = "".join(
        f'<line x1="{pad_l}" x2="{width - pad_r}" y1="{pad_t + plot_h * (1 - f):.1f}" '
        f'y2="{pad_t + plot_h * (1 - f):.1f}" stroke="#e6e6e6"/>'
        f'<text x="{pad_l - 4}" y="{pad_t + plot_h * (1 - f) + 3:.1f}" font-size="10" '
        f'text-anchor="end">{amount(top * f)}</text>' for f in (0.0, 0.5, 1.0))
    points = json.dumps([{"t": h["t"], "available": h["available"], "used": h["used"],
                          "by_class": h.get("by_class") or {}} for h in history],
                        separators=(",", ":"))
    svg = (f'<svg id="capacity-chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} '
           f'{height}" width="{width}" height="{height}" role="img" aria-label="available and '
           f'used capacity over time, samples/s" data-points="{_e(points)}" data-top="{top:g}" '
           f'data-t0="{t0}" data-t1="{t1}" data-pad="{pad_l},{pad_r},{pad_t},{pad_b}" '
           f'data-watts="{ESTIMATED_NODE_W:g}">'
           f'<rect width="{width}" height="{height}" fill="#fafafa"/>{ticks}'
           f'<text x="2" y="12" font-size="10">samples/s</text>'
           f'<text x="{pad_l}" y="{height - 8}" font-size="10">'
           f'{_e(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0)))}</text>'
           f'<text x="{width - pad_r}" y="{height - 8}" font-size="10" text-anchor="end">'
           f'{_e(time.strftime("%H:%M:%S", time.localtime(t1)))}</text>'
           f'{"".join(series)}</svg>')
    last = history[-1]
    per_class = "".join(
        f"<tr><td><code>{_e(hw)}</code></td><td>{v.get('available', 0):g}</td>"
        f"<td>{v.get('used', 0):g}</td><td>{v.get('available_nodes', 0) * ESTIMATED_NODE_W / 1000:g}"
        f"</td><td>{v.get('used_nodes', 0) * ESTIMATED_NODE_W / 1000:g}</td></tr>"
        for hw, v in sorted((last.get("by_class") or {}).items()))
    table = (f'<div class="wide"><table id="capacity-by-class"><tr><th>hw class</th>'
             f"<th>available samples/s</th><th>used samples/s</th><th>available est. kW</th>"
             f"<th>used est. kW</th></tr>{per_class}</table></div>" if per_class else "")
    return (f'<div class="wide chart">{svg}</div><p class="legend" id="capacity-legend">'
            f'{" ".join(legend)}</p><p id="chart-readout" class="note" aria-live="polite"></p>'
            f"<p class=\"note\">{_e(ASSUMPTION)} Samples/s are of the reference 784-256-10 "
            f"MLP, batch 64, as each node's record states its benchmark.</p>"
            f"<h3>At the last crawl, by hardware class</h3>{table}")
