"""The explorer's mesh picture: peers on rings by DHT role, in arcs by software version,
coloured by state and outlined by reachability (pure: server-side SVG layout).

No edges are drawn: the explorer does not learn who is connected to whom, and lines
between 100+ peers would hide the facts the picture is for. Grouping keeps it readable at
any size: each ring is split into one arc per version, and dots shrink as rings fill.
"""

from __future__ import annotations

import html
import math
from typing import Any

RINGS = (("server", "DHT servers (answer lookups, hold records)"),
         ("client", "DHT clients (look up only)"),
         (None, "role not told (not reached, or never identified)"))
STATE_FILL = {"available": "#2a2", "busy": "#e90", "paused": "#39c", "offline": "#bbb",
              "unknown": "#ddd"}
REACH_STROKE = {"direct": ("#222", ""), "relayed": ("#639", "2,1.5"),
                "not reached": ("#bbb", "1,1.5")}


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _dot(p: dict, version: str, x: float, y: float, radius: float) -> str:
    """One peer: filled by state, outlined by reachability (red when flagged), a link."""
    stroke, dash = REACH_STROKE.get(p.get("reach") or "not reached", REACH_STROKE["not reached"])
    fill = STATE_FILL.get(p["state"], "#ddd")
    outline = (' stroke-width="2.5" stroke="#d00"' if p.get("flagged") else
               f' stroke-width="1.2" stroke="{stroke}"' + (f' stroke-dasharray="{dash}"' if dash else ""))
    title = (f"{p['peer_id']} · {p['state']} · DHT {p.get('dht_role') or 'role not told'} · "
             f"{p.get('reach') or 'not reached'} · version {version}"
             + (" · FLAGGED" if p.get("flagged") else ""))
    return (f'<a href="/peers/{_e(p["peer_id"])}" class="mesh-peer"><circle cx="{x:.1f}" '
            f'cy="{y:.1f}" r="{radius:.1f}" fill="{fill}"{outline}><title>{_e(title)}</title>'
            f"</circle></a>")


def mesh_svg(peers: list[dict], size: int = 560) -> str:
    """Concentric rings (servers inside), each split into arcs by software version."""
    c = size / 2
    radii = (size * 0.16, size * 0.28, size * 0.40)
    parts = [f'<circle cx="{c}" cy="{c}" r="7" fill="#444"><title>this explorer '
             f'(a DHT client with no listener)</title></circle>']
    for (role, label), r in zip(RINGS, radii):
        ring = sorted((p for p in peers if p.get("dht_role") == role),
                      key=lambda p: (str(p.get("sw_version") or ""), p["peer_id"]))
        parts.append(f'<circle cx="{c}" cy="{c}" r="{r:.1f}" fill="none" stroke="#e4e4e4" '
                     f'stroke-width="14"><title>{_e(label)}: {len(ring)}</title></circle>')
        if not ring:
            continue
        groups: list[tuple[str, list[dict]]] = []
        for p in ring:
            v = str(p.get("sw_version") or "?")
            if not groups or groups[-1][0] != v:
                groups.append((v, []))
            groups[-1][1].append(p)
        gap = 0.12 if len(groups) > 1 else 0.0  # radians between version arcs
        slot = (2 * math.pi - gap * len(groups)) / len(ring)
        dot = max(2.0, min(7.0, r * slot * 0.42))
        angle = -math.pi / 2
        for v, members in groups:
            mid = angle + slot * len(members) / 2  # the label sits outside its arc's middle
            lx, ly = c + (r + 13) * math.cos(mid), c + (r + 13) * math.sin(mid) + 3
            anchor = "start" if math.cos(mid) > 0.3 else "end" if math.cos(mid) < -0.3 else "middle"
            parts.append(f'<text x="{lx:.1f}" y="{ly:.1f}" font-size="9" fill="#555" '
                         f'text-anchor="{anchor}" class="version-label">'
                         f'{"version unknown" if v == "?" else "v" + _e(v[:16])}</text>')
            for p in members:
                a = angle + slot / 2
                x, y = c + r * math.cos(a), c + r * math.sin(a)
                parts.append(_dot(p, v, x, y, dot))
                angle += slot
            angle += gap
    return (f'<svg id="mesh" viewBox="0 0 {size} {size}" width="{size}" height="{size}" '
            f'role="img" aria-label="the mesh: peers by DHT role, version, state and '
            f'reachability">{"".join(parts)}</svg>')


def mesh_html(doc: dict) -> str:
    """The /mesh page body: the picture, its legend, and the counts behind it."""
    peers = doc["peers"]
    counts: dict[tuple[str, str, str], int] = {}
    for p in peers:
        k = (p.get("dht_role") or "not told", p.get("reach") or "not reached",
             str(p.get("sw_version") or "?"))
        counts[k] = counts.get(k, 0) + 1
    rows = "".join(f"<tr><td>{_e(r)}</td><td>{_e(h)}</td><td>{_e(v)}</td><td>{n}</td></tr>"
                   for (r, h, v), n in sorted(counts.items()))
    fills = " ".join(f'<span class="key"><svg width="10" height="10"><circle cx="5" cy="5" '
                     f'r="4.5" fill="{f}"/></svg> {s}</span>' for s, f in STATE_FILL.items())
    return (f"<p>{len(peers)} peers. Rings: DHT servers inside, DHT clients in the middle, "
            "peers whose role the explorer was not told outside; each ring is split into "
            "arcs by software version. Click a dot for the peer.</p>"
            f'<div class="wide">{mesh_svg(peers)}</div>'
            f'<p class="legend">Fill, state: {fills}.<br>Outline, reachability this crawl: '
            "solid black direct, dashed purple through a relay, dotted grey not reached; "
            "thick red: evidence of misbehaviour.</p>"
            "<p>No lines: the explorer does not learn who is connected to whom. The DHT role "
            "is what each peer's identify reply lists (a server offers the DHT protocol); "
            "reachability is how the explorer's own probe got through.</p>"
            f'<div class="wide"><table id="mesh-counts"><tr><th>DHT role</th>'
            f"<th>reachability</th><th>version</th><th>peers</th></tr>{rows}</table></div>")
