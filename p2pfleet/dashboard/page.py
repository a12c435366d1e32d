"""The owner's dashboard page: a pure function from a state document to HTML.

The document (built by `p2pfleet node dashboard` from the control socket's `status` and the
ledger, the same data `node status --json` and `ledger --json` print):

    {"now": unix s, "tz_offset_s": int, "status": status reply | None,
     "status_error": str | None, "ledger": {"publishers": [...]},
     "hand_backs": [{"at", "publisher", "job_id", "shard", "reason", "done"}]}

Everything taken from the document is escaped: a publisher's name or a reason string may
come from another peer. The page has no script and fetches nothing.
"""

from __future__ import annotations

import time
from html import escape
from typing import Any

from ..humantime import span
from .svg import bar_chart, meter, timeline_chart

Doc = dict[str, Any]
REFRESH_S = 30
MB = 1_000_000

CSS = """
body{font:15px/1.4 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#222}
header{background:#1f2d3d;color:#fff;padding:12px 16px}
header h1{font-size:18px;margin:0}
header .peer{font-size:12px;opacity:.8;word-break:break-all}
main{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(340px,100%),1fr));gap:12px;padding:12px}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(260px,100%),1fr));gap:8px}
section{background:#fff;border-radius:8px;padding:12px 14px;box-shadow:0 1px 2px #0002;min-width:0}
section.wide{grid-column:1/-1}
h2{font-size:15px;margin:0 0 8px}
.state{display:inline-block;padding:3px 10px;border-radius:12px;font-weight:600}
.state.on{background:#2e8b57;color:#fff}.state.off{background:#b0b6bd;color:#222}
ul{margin:4px 0;padding-left:20px}
table{border-collapse:collapse;width:100%;font-size:13px}
td,th{padding:3px 6px;border-bottom:1px solid #eee;text-align:right;vertical-align:top}
td:first-child,th:first-child{text-align:left}
.scroll{overflow-x:auto}
.meter{height:14px;background:#e8eaed;border-radius:7px;overflow:hidden}
.meter .fill{height:100%}
.meter-label{font-size:13px;margin:2px 0 10px}
.legend{font-size:12px;margin:2px 0 8px}
.key{margin-right:12px;white-space:nowrap}
.key i{display:inline-block;width:10px;height:10px;margin-right:4px;vertical-align:middle}
.muted{color:#666;font-size:13px}
.mono{font-family:ui-monospace,monospace;word-break:break-all}
svg.chart{max-width:100%;height:auto;display:block}
footer{padding:0 16px 16px;color:#666;font-size:12px}
"""


def e(x: object) -> str:
    return escape(str(x), quote=True)


def when(t: float | None, now: float, off: int) -> str:
    """A local time with how far from now, as <time> with its ISO form (UTC)."""
    if t is None:
        return "unknown"
    local = time.gmtime(t + off)
    same_day = time.gmtime(now + off)[:3] == local[:3]
    shown = time.strftime("%H:%M" if same_day else "%Y-%m-%d %H:%M", local)
    rel = f"in {span(t - now)}" if t >= now else f"{span(now - t)} ago"
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
    return f'<time datetime="{iso}" title="{iso}">{e(shown)} ({e(rel)})</time>'


def _hms(ms: int) -> str:
    s = int(ms) // 1000
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _short(peer: str) -> str:
    return peer if len(peer) <= 16 else f"{peer[:8]}…{peer[-6:]}"


def _state(doc: Doc) -> str:
    st, now, off = doc.get("status"), doc["now"], doc["tz_offset_s"]
    if st is None:
        return (f'<section id="state"><h2>Now</h2><p><span class="state off" id="computing">'
                f'node not running</span></p><p class="muted">{e(doc.get("status_error") or "")}'
                '</p><p class="muted">Start it with <code>p2pfleet node start</code>; the '
                'ledger below is what the node recorded so far.</p></section>')
    on = bool(st.get("computing"))
    mesh = (f"in the mesh with {int(st.get('peers') or 0)} peers" if st.get("in_mesh")
            else "out of the mesh")
    why = "".join(f"<li>{e(line)}</li>" for line in st.get("why") or [])
    vehicle = f'<p class="muted">vehicle: {e(st["vehicle"])}</p>' if st.get("vehicle") else ""
    work = st.get("work") or {}
    running = work.get("running") or []
    run = (f"<p>running {len(running)} shard(s): " +
           ", ".join(f"job {e(r['job_id'][:12])}… shard {e(r['shard'])}" for r in running)
           + "</p>") if running else ""
    done = (f'<p class="muted">this run: {e(work.get("shards_done", 0))} shards done, '
            f'{e(work.get("hand_backs", 0))} handed back, {e(work.get("shards_failed", 0))} '
            f'failed</p>') if work else ""
    return (f'<section id="state"><h2>Now</h2><p><span class="state {"on" if on else "off"}" '
            f'id="computing">{"computing" if on else "not computing"}</span> {e(mesh)}</p>'
            f'<ul id="why">{why}</ul>{vehicle}{run}{done}'
            f'<p class="muted">status at {when(st.get("now", now), now, off)}</p></section>')


def _changes(doc: Doc) -> str:
    st = doc.get("status")
    if st is None:
        return ""
    now, off = st.get("now", doc["now"]), doc["tz_offset_s"]
    items = [f"<li>{e(r['text'])}: {when(r['until'], now, off)}</li>"
             for r in st.get("reasons") or [] if r.get("until") is not None]
    v = st.get("vehicle_now") or {}
    if v.get("departure_at") is not None:
        items.append(f"<li>planned departure: {when(v['departure_at'], now, off)}</li>")
    if st.get("next_wake_at") is not None and st["next_wake_at"] > now:
        items.append(f"<li>the policy decides again at {when(st['next_wake_at'], now, off)}</li>")
    quiet = st.get("quiet_hours") or []
    items.append(f"<li>quiet hours: {e(', '.join(quiet)) if quiet else 'none set'}</li>")
    return (f'<section id="changes"><h2>When this may change</h2><ul>{"".join(items)}</ul>'
            '</section>')


def _ticks(t0: float, t1: float, off: int) -> list[tuple[float, str]]:
    span = t1 - t0
    step = next((s for s in (60, 300, 600, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400)
                 if span / s <= 6), 86400)
    first = (int(t0 + off) // step + 1) * step - off
    return [(t, time.strftime("%H:%M", time.gmtime(t + off)))
            for t in range(int(first), int(t1) + 1, step)]


def _vehicle(doc: Doc) -> str:
    st = doc.get("status")
    if st is None:
        return ""
    v = st.get("vehicle_now")
    off = doc["tz_offset_s"]
    if v is None:
        now_line = "<p>no vehicle state observed yet</p>"
    else:
        plug = "plugged in" if v.get("plugged_in") else "not plugged in"
        park = "parked" if v.get("parked") else "driving"
        now_line = (f'<p id="vehicle-now">battery {e(round(float(v["soc_pct"])))}% (limit '
                    f'{e(round(float(v["charge_limit_pct"])))}%), {e(plug)}, {e(park)}, network '
                    f'{e(v.get("network"))}</p>')
    points = st.get("timeline") or []
    chart = ""
    if points:
        t1 = float(st.get("now", doc["now"]))
        t0 = min(float(points[0][0]), t1 - 60)
        chart = timeline_chart("battery-chart", points, t0, t1, _ticks(t0, t1, off))
    else:
        chart = '<p class="muted">no timeline yet (the node draws it while it runs)</p>'
    return (f'<section id="vehicle"><h2>Battery and plug</h2>{now_line}{chart}'
            '<p class="muted">since the node started; from the vehicle provider</p></section>')


def _today(doc: Doc) -> str:
    st = doc.get("status")
    if st is None or not st.get("today"):
        return ""
    t = st["today"]
    used, cap = t["transfer_bytes"], t.get("transfer_cap_bytes")
    label = (f"{used / MB:.1f} of {cap / MB:g} MB data used today" if cap else
             f"{used / MB:.1f} MB data used today (no daily cap)")
    wh, budget = t["energy_wh"], t.get("energy_budget_wh")
    elabel = (f"{wh:.0f} of {budget:g} Wh energy used today" if budget else
              f"{wh:.0f} Wh energy used today (no daily budget)")
    return (f'<section id="today"><h2>Today\'s allowances</h2>'
            f'{meter("data-meter", used, cap, label)}{meter("energy-meter", wh, budget, elabel)}'
            '<p class="muted">both reset at local midnight</p></section>')


def _publisher(p: Doc, i: int) -> str:
    c, k = p["credit"], p["energy_kwh"]
    days = p.get("days") or []
    labels = [d["day"] for d in days]
    credit = bar_chart(f"credit-chart-{i}", "credit paid per day", labels,
                       [("credit paid", [d["credit_paid"] for d in days], "#1f5fa8")],
                       "credit")
    results = bar_chart(f"results-chart-{i}", "results per day", labels,
                        [("results", [d["results"] for d in days], "#6c8ebf")], "results")
    kwh = bar_chart(f"kwh-chart-{i}", "energy per day", labels,
                    [("metered", [d["energy_kwh"]["metered"] for d in days], "#2e8b57"),
                     ("estimated", [d["energy_kwh"]["estimated"] for d in days], "#9fd3a8")],
                    "kWh")
    rows = "".join(
        f'<tr><td>{e(d["day"])}</td><td>{e(d["results"])}</td><td>{e(d["credit_paid"])}</td>'
        f'<td>{_hms(d["compute_ms"])}</td><td>{d["energy_kwh"]["metered"]:.4f}</td>'
        f'<td>{d["energy_kwh"]["estimated"]:.4f}</td></tr>' for d in days)
    return (
        f'<section class="wide publisher" data-publisher="{e(p["publisher"])}">'
        f'<h2>Publisher <span class="mono">{e(p["publisher"])}</span></h2>'
        f'<p>credit in this publisher\'s own units: promised <b class="credit-promised">'
        f'{e(c["promised"])}</b>, paid <b class="credit-paid">{e(c["paid"])}</b>, unpaid '
        f'<b class="credit-unpaid">{e(c["unpaid"])}</b> (last 7 days)</p>'
        f'<p>results delivered <b class="results">{e(p["results_delivered"])}</b> (pending '
        f'{e(p["results_pending"])}), failures {e(p["failures"])}, hand-backs '
        f'{e(p["hand_backs"])}, compute {_hms(p["compute_ms"])}, energy '
        f'<span class="kwh-metered">{k["metered"]:.4f}</span> kWh metered + '
        f'<span class="kwh-estimated">{k["estimated"]:.4f}</span> kWh estimated</p>'
        f'<div class="charts">{"".join(f"<div>{c_}</div>" for c_ in (credit, results, kwh))}'
        f'</div><div class="scroll"><table><tr><th>day</th><th>results</th><th>credit paid'
        f'</th><th>compute</th><th>kWh metered</th><th>kWh estimated</th></tr>{rows}</table>'
        '</div></section>')


def _ledger(doc: Doc) -> str:
    pubs = (doc.get("ledger") or {}).get("publishers") or []
    if not pubs:
        return ('<section class="wide" id="ledger"><h2>Results and credit</h2><p>no work '
                'recorded yet</p></section>')
    return ('<section class="wide" id="ledger"><h2>Results and credit</h2><p class="muted">'
            "Each publisher pays in its own units: they are never added up. Energy is metered "
            "where the car or charger measures the computer's use, estimated otherwise.</p>"
            "</section>" + "".join(_publisher(p, i) for i, p in enumerate(pubs)))


def _hand_backs(doc: Doc) -> str:
    rows = doc.get("hand_backs") or []
    now, off = doc["now"], doc["tz_offset_s"]
    body = "".join(
        f'<tr><td>{when(h["at"], now, off)}</td><td class="reason">{e(h["reason"])}</td>'
        f'<td class="mono" title="{e(h["publisher"])}">{e(_short(h["publisher"]))}</td>'
        f'<td class="mono">{e(str(h["job_id"])[:12])}…</td><td>{e(h["shard"])}</td>'
        f'<td>{e(h["done"])}</td></tr>' for h in rows)
    table = (f'<div class="scroll"><table id="hand-backs"><tr><th>when</th><th>why</th>'
             f'<th>publisher</th><th>job</th><th>shard</th><th>micro-batches done</th></tr>'
             f'{body}</table></div>' if rows else "<p>none</p>")
    return f'<section class="wide" id="hand-back-list"><h2>Recent hand-backs</h2>{table}</section>'


def _events(doc: Doc) -> str:
    st = doc.get("status")
    if not st or not st.get("history"):
        return ""
    now, off = st.get("now", doc["now"]), doc["tz_offset_s"]
    items = "".join(f"<li>{when(t, now, off)}: {e(what)}</li>"
                    for t, what in reversed(st["history"]))
    return f'<section id="events"><h2>Recent events</h2><ul>{items}</ul></section>'


def build_page(doc: Doc) -> str:
    """The whole page for `doc` (see the module docstring)."""
    st = doc.get("status") or {}
    peer = st.get("peer_id") or doc.get("peer_id") or ""
    network = st.get("network") or doc.get("network") or ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f'<meta http-equiv="refresh" content="{REFRESH_S}">'
        f'<title>p2pfleet node {e(_short(peer))}</title><style>{CSS}</style></head><body>'
        f'<header><h1>p2pfleet: your node</h1><div class="peer">{e(peer)} on network '
        f'{e(network)}</div></header><main>'
        + _state(doc) + _changes(doc) + _vehicle(doc) + _today(doc) + _events(doc)
        + _ledger(doc) + _hand_backs(doc) +
        f'</main><footer>Read-only; refreshes every {REFRESH_S} s. The same facts as '
        '<code>p2pfleet node status</code> and <code>p2pfleet ledger</code>.</footer>'
        '</body></html>')
