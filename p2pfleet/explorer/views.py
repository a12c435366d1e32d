"""The terminal view of a crawl: rich tables of peers, capacity totals, jobs and evidence.

Built from `Snapshot.to_json()`, the same document `--json` prints, so both say the same.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

STATE_STYLE = {"available": "green", "busy": "yellow", "paused": "cyan", "offline": "red",
               "unknown": "dim"}


def _ago(t: float | None, now: float) -> str:
    if t is None:
        return "-"
    s = max(0, int(now - t))
    return f"{s} s ago" if s < 120 else f"{s // 60} min ago" if s < 7200 else f"{s // 3600} h ago"


def short(peer_id: str) -> str:
    """A peer id short enough for a table (`--json` and the web pages have it whole)."""
    return peer_id if len(peer_id) <= 24 else f"{peer_id[:12]}…{peer_id[-8:]}"


def render(doc: dict[str, Any], now: float | None = None) -> Group:
    """Rich renderables for a snapshot document."""
    now = time.time() if now is None else now
    parts: list[Any] = []
    head = (f"network {doc['network']}: {len(doc['peers'])} peers "
            f"({', '.join(f'{n} {s}' for s, n in sorted(doc['counts'].items()))}), "
            f"crawl {doc['duration_s']:.1f} s")
    parts.append(Text(head, style="bold"))
    if doc.get("note"):
        parts.append(Text(doc["note"], style="yellow"))

    peers = Table(title="Peers", title_justify="left")
    for col in ("peer", "state", "version", "hw class", "bench (samples/s)", "RTT",
                "last seen", "evidence"):
        peers.add_column(col, no_wrap=True)
    for p in doc["peers"]:
        state = p["state"] + (f" ({p['why_offline']})" if p.get("why_offline") else "")
        rtt = f"{p['rtt_ms']:.1f} ms" if p.get("rtt_ms") is not None else "-"
        peers.add_row(short(p["peer_id"]), Text(state, style=STATE_STYLE.get(p["state"], "")),
                      p.get("sw_version") or "-", p.get("hw_class_short") or "-",
                      f"{p['bench']:g}" if p.get("bench") is not None else "-", rtt,
                      _ago(p.get("last_seen"), now),
                      Text("FLAGGED", style="bold red") if p.get("flagged") else "")
    parts.append(peers)

    totals = Table(title="Capacity in the mesh (available counts as free)", title_justify="left")
    for col in ("state", "hw class", "nodes", "samples/s", "est. kW"):
        totals.add_column(col)
    for r in doc["totals"]:
        totals.add_row(r["state"], r["hw_class"], str(r["nodes"]), f"{r['samples_per_s']:g}",
                       f"{r['est_kw']:g}")
    cap = doc["capacity"]
    totals.add_row("available (all)", "", "", f"{cap['available_samples_per_s']:g}",
                   f"{cap['available_est_kw']:g}", style="bold")
    parts.append(totals)
    parts.append(Text(f"kW estimated at {cap['estimate_w_per_node']:g} W per computing node",
                      style="dim"))

    jobs = Table(title="Announced jobs", title_justify="left")
    for col in ("publisher", "job", "progress", "quorum", "credit rate"):
        jobs.add_column(col)
    for j in doc["jobs"]:
        jobs.add_row(short(j["publisher"]), j["job_id"][:16],
                     f"{j['shards_done']}/{j['shards_total']} ({j['progress'] * 100:.0f} %)",
                     str(j["quorum"]), str(j["credit_rate"]))
    parts.append(jobs if doc["jobs"] else Text("no job announcements heard", style="dim"))

    if doc["evidence"]:
        ev = Table(title="Evidence", title_justify="left")
        for col in ("accused", "what", "verified by", "detail"):
            ev.add_column(col)
        for e in doc["evidence"]:
            who = "the explorer itself" if e["verified_by_explorer"] else \
                f"claim signed by publisher {short(e['verified_by'])}"
            ev.add_row(short(e["accused"]), e["kind"], who, e["detail"])
        parts.append(ev)
    return Group(*parts)
