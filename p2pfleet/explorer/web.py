"""The explorer's web dashboard: a small hand-written ASGI app served by hypercorn on trio.

Pages (HTML and server-drawn inline SVG, no external assets; readable with JavaScript off):
`/` peers, totals and the capacity chart; `/peers/<peer id>` one peer; `/jobs` (jobs_page);
`/mesh` the mesh picture (mesh_page); `/evidence` and `/evidence/<id>` one item with its
signed messages (evidence_page). `/static/explorer.js`, hand-written and vendored, only
enhances the chart (charts: values on hover, hardware classes toggled). The JSON
API behind them is under `/api/...` and described by the OpenAPI document at
`/openapi.json`; `/metrics` is Prometheus text. Every page is built from one snapshot
document (`Snapshot.to_json()`), the same the terminal prints. Only GET and HEAD.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from ..humantime import span
from . import metrics
from .charts import capacity_chart
from .evidence_page import evidence_id, evidence_item_html
from .jobs_page import jobs_html as _jobs_page
from .mesh_page import mesh_html

Doc = dict[str, Any]
# hand-written, vendored: enhances the server-drawn chart (hover values, class toggles)
SCRIPT = (Path(__file__).parent / "static" / "explorer.js").read_bytes()
JSON_TYPE = b"application/json"


class WebApp:
    """ASGI application over `source()`, which returns the latest snapshot document or None
    while the first crawl runs."""

    def __init__(self, source: Callable[[], Doc | None], *, title: str = "p2pfleet explorer"):
        self.source = source
        self.title = title

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        status, ctype, body = self.handle(scope["method"], scope["path"])
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode()),
                                (b"cache-control", b"no-store"),
                                (b"content-security-policy", b"default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; script-src 'self'")]})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})

    # --- routing (pure: method and path in, response out) ------------------------------------
    def handle(self, method: str, path: str) -> tuple[int, bytes, bytes]:
        if method not in ("GET", "HEAD"):
            return 405, JSON_TYPE, _json({"error": f"method {method} not allowed; use GET"})
        if path == "/openapi.json":
            return 200, JSON_TYPE, _json(OPENAPI)
        if path == "/static/explorer.js":
            return 200, b"text/javascript; charset=utf-8", SCRIPT
        doc = self.source()
        parts = [p for p in path.split("/") if p]
        if parts[:1] == ["api"]:
            return self._api(parts[1:], doc)
        if path == "/metrics":
            if doc is None:
                return 503, b"text/plain; charset=utf-8", b"# first crawl still running\n"
            return 200, b"text/plain; version=0.0.4; charset=utf-8", metrics.render(doc).encode()
        if doc is None:
            return 503, b"text/html; charset=utf-8", self._page(
                "crawling", "<p>The first crawl is still running; reload in a few seconds.</p>")
        if path in ("/", "/peers"):
            return 200, b"text/html; charset=utf-8", self._page("peers", peers_html(doc))
        if len(parts) == 2 and parts[0] == "peers":
            peer = next((p for p in doc["peers"] if p["peer_id"] == parts[1]), None)
            if peer is None:
                return 404, b"text/html; charset=utf-8", self._page(
                    "unknown peer", f"<p>No peer {_e(parts[1])} is known.</p>")
            return 200, b"text/html; charset=utf-8", self._page(
                f"peer {peer['peer_id'][:12]}…", peer_html(peer, doc))
        if path == "/jobs":
            return 200, b"text/html; charset=utf-8", self._page("jobs", jobs_html(doc))
        if path == "/mesh":
            return 200, b"text/html; charset=utf-8", self._page("mesh", mesh_html(doc))
        if path == "/evidence":
            return 200, b"text/html; charset=utf-8", self._page("evidence", evidence_html(doc))
        if len(parts) == 2 and parts[0] == "evidence":
            item = next((e for e in doc["evidence"] if evidence_id(e) == parts[1]), None)
            if item is None:
                return 404, b"text/html; charset=utf-8", self._page(
                    "unknown evidence", f"<p>No evidence {_e(parts[1][:80])} is known.</p>")
            return 200, b"text/html; charset=utf-8", self._page(
                f"evidence {parts[1]}", evidence_item_html(item, doc["network"]))
        return 404, b"text/html; charset=utf-8", self._page("not found",
                                                            f"<p>Nothing at {_e(path)}.</p>")

    def _api(self, parts: list[str], doc: Doc | None) -> tuple[int, bytes, bytes]:
        if doc is None:
            return 503, JSON_TYPE, _json({"error": "the first crawl is still running"})
        if parts == ["snapshot"]:
            return 200, JSON_TYPE, _json(doc)
        if parts == ["peers"]:
            return 200, JSON_TYPE, _json(doc["peers"])
        if len(parts) == 2 and parts[0] == "peers":
            peer = next((p for p in doc["peers"] if p["peer_id"] == parts[1]), None)
            if peer is None:
                return 404, JSON_TYPE, _json({"error": f"no peer {parts[1][:80]} is known"})
            evidence = [e for e in doc["evidence"] if e["accused"] == parts[1]]
            return 200, JSON_TYPE, _json({**peer, "evidence": evidence})
        if parts == ["totals"]:
            return 200, JSON_TYPE, _json({"totals": doc["totals"], "capacity": doc["capacity"],
                                          "counts": doc["counts"]})
        if parts == ["jobs"]:
            return 200, JSON_TYPE, _json(doc["jobs"])
        if parts == ["evidence"]:
            return 200, JSON_TYPE, _json(doc["evidence"])
        if parts == ["history"]:
            return 200, JSON_TYPE, _json(doc["history"])
        return 404, JSON_TYPE, _json({"error": f"no API endpoint /api/{'/'.join(parts)[:80]}"})

    def _page(self, title: str, content: str) -> bytes:
        nav = " · ".join(f'<a href="{h}">{n}</a>' for h, n in (
            ("/", "peers"), ("/jobs", "jobs"), ("/mesh", "mesh"), ("/evidence", "evidence"),
            ("/openapi.json", "API"), ("/metrics", "metrics")))
        return (f"<!doctype html><html lang=en><head><meta charset=utf-8>"
                f'<meta name="viewport" content="width=device-width, initial-scale=1">'
                f"<title>{_e(title)} · {_e(self.title)}</title><style>{CSS}</style>"
                f'<script src="/static/explorer.js" defer></script></head>'
                f"<body><header><b>{_e(self.title)}</b> <nav>{nav}</nav></header>"
                f"<main><h1>{_e(title)}</h1>{content}</main></body></html>").encode()


CSS = ("body{font-family:sans-serif;margin:1em 2em;color:#222}table{border-collapse:collapse;"
       "margin:.5em 0 1.5em}td,th{border-bottom:1px solid #ddd;padding:.25em .6em;text-align:left;"
       "font-size:.9em}code{font-size:.85em}.available{color:#080}.offline{color:#b00}"
       ".busy{color:#a60}.flag{color:#fff;background:#b00;padding:0 .3em}header{margin-bottom:1em}"
       "nav a{margin:0 .2em}.wide{max-width:100%;overflow-x:auto}svg{max-width:100%;height:auto}"
       "td code,th code{word-break:break-all}.job{border-top:1px solid #ccc;margin-top:1em}"
       ".legend .key{white-space:nowrap;margin-right:.6em}details{margin:.6em 0}"
       "pre{white-space:pre-wrap;word-break:break-all;font-size:.8em}tr.differs{background:#fe9}"
       "@media (max-width:600px){body{margin:.5em}td,th{font-size:.8em;padding:.2em .3em}}")


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _json(data: Any) -> bytes:
    return json.dumps(data, indent=1).encode()


def human_time(t: float | None, now: float | None = None) -> str:
    """Local clock time (with the date unless today), how long ago or ahead, and ISO 8601
    in UTC: '14:05:09 (3 min ago; 2026-06-01T12:05:09Z)'."""
    if t is None:
        return "-"
    now = time.time() if now is None else now
    local = time.localtime(t)
    shown = time.strftime("%H:%M:%S" if local[:3] == time.localtime(now)[:3]
                          else "%Y-%m-%d %H:%M:%S", local)
    rel = f"{span(now - t)} ago" if t <= now else f"in {span(t - now)}"
    return f"{shown} ({rel}; {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(t))})"


def _ago(t: float | None) -> str:
    return human_time(t)


def peers_html(doc: Doc) -> str:
    cap = doc["capacity"]
    rows = []
    for p in doc["peers"]:
        state = p["state"] + (f" ({p['why_offline']})" if p["why_offline"] else "")
        rtt = f"{p['rtt_ms']:.1f} ms ({p['rtt_by']})" if p["rtt_ms"] is not None else "-"
        flag = ' <span class="flag">flagged</span>' if p["flagged"] else ""
        rows.append(
            f'<tr class="peer"><td><a class="peer-link" href="/peers/{_e(p["peer_id"])}">'
            f'<code>{_e(p["peer_id"])}</code></a>{flag}</td>'
            f'<td class="{_e(p["state"])}">{_e(state)}</td><td>{_e(p["sw_version"] or "-")}</td>'
            f'<td><code>{_e(p["hw_class_short"] or "-")}</code></td>'
            f'<td>{_e(p["bench"] if p["bench"] is not None else "-")}</td><td>{_e(rtt)}</td>'
            f'<td>{_e(_ago(p["last_seen"]))}</td></tr>')
    note = f'<p class="note">{_e(doc["note"])}</p>' if doc.get("note") else ""
    totals = "".join(f"<tr><td>{_e(r['state'])}</td><td><code>{_e(r['hw_class'])}</code></td>"
                     f"<td>{r['nodes']}</td><td>{r['samples_per_s']:g}</td><td>{r['est_kw']:g}</td></tr>"
                     for r in doc["totals"])
    return (f"<p>Network <b>{_e(doc['network'])}</b>: {len(doc['peers'])} peers, "
            f"{doc['discovered']} found in the DHT, crawl {doc['duration_s']:.1f} s "
            f"(crawl {doc['crawls']}).</p>{note}"
            f'<div class="wide"><table id="peers"><tr><th>peer</th><th>state</th><th>version</th><th>hw class</th>'
            f"<th>bench (samples/s of the reference MLP)</th><th>RTT</th><th>last seen</th></tr>"
            f"{''.join(rows)}</table></div>"
            f"<h2>Capacity</h2><p>Available: <b>{cap['available_samples_per_s']:g}</b> samples/s, "
            f"~{cap['available_est_kw']:g} kW (estimated at {cap['estimate_w_per_node']:g} W per "
            f"computing node); used: {cap['used_samples_per_s']:g} samples/s.</p>"
            f'<div class="wide"><table><tr><th>state</th><th>hw class</th><th>nodes</th>'
            f"<th>samples/s</th><th>est. kW</th></tr>{totals}</table></div>"
            f"<h2>Available and used capacity over time</h2>"
            f"{capacity_chart(with_classes(doc))}")


def with_classes(doc: Doc) -> list[dict]:
    """The history points with their `by_class` split (kept apart in the JSON API)."""
    split = doc.get("history_by_class") or []
    return [{**h, "by_class": split[i] if i < len(split) else {}}
            for i, h in enumerate(doc["history"])]


def peer_html(p: dict, doc: Doc) -> str:
    fields = [("peer id", p["peer_id"]), ("state", p["state"]), ("why offline", p["why_offline"]),
              ("software version", p["sw_version"]), ("onnxruntime", p["ort_version"]),
              ("hardware class", p["hw_class"]), ("cores", p["cores"]),
              ("memory (MiB)", p["memory_mb"]), ("benchmark (samples/s of the reference 784-256-10 MLP, batch 64)", p["bench"]),
              ("slots", p["slots"]), ("providers", ", ".join(p["providers"])),
              ("addresses", ", ".join(p["addrs"])), ("record seq", p["record_seq"]),
              ("record expires", None if p["record_exp_ms"] is None else
               f"{human_time(p['record_exp_ms'] / 1000)}, Unix ms {p['record_exp_ms']}"),
              ("record copies in the DHT", p["copies"]),
              ("RTT", f"{p['rtt_ms']} ms by {p['rtt_by']}" if p["rtt_ms"] is not None else None),
              ("last seen", _ago(p["last_seen"])),
              ("DHT role (as identify told)", p.get("dht_role") or "not told"),
              ("reachability (this crawl)", p.get("reach") or "not reached")]
    info = p["info"]
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v if v not in (None, '') else '-')}</td></tr>"
                   for k, v in fields)
    info_html = ("<h2>node_info (signed by the node, opted in)</h2><table>" + "".join(
        f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in info.items()) + "</table>"
        if info else "<p>The owner has not opted in to node_info.</p>")
    evidence = [e for e in doc["evidence"] if e["accused"] == p["peer_id"]]
    return (f'<div class="wide"><table id="peer-detail">{rows}</table></div>{info_html}'
            + (f"<h2>Evidence</h2>{evidence_table(evidence)}" if evidence else ""))


def jobs_html(doc: Doc) -> str:
    return _jobs_page(doc, human_time)


def evidence_table(items: list[dict]) -> str:
    rows = "".join(
        f"<tr><td><code>{_e(e['accused'])}</code></td>"
        f'<td><a class="evidence-link" href="/evidence/{evidence_id(e)}">{_e(e["kind"])}</a></td>'
        f"<td>{'verified by this explorer' if e['verified_by_explorer'] else 'claim signed by publisher <code>' + _e(e['verified_by']) + '</code>'}</td>"
        f"<td>{_e(e['detail'])}</td><td>{len(e['proofs'])}</td></tr>" for e in items)
    return (f'<div class="wide"><table class="evidence"><tr><th>accused</th><th>what</th><th>who says so</th>'
            f"<th>detail</th><th>proofs</th></tr>{rows}</table></div>")


def evidence_html(doc: Doc) -> str:
    if not doc["evidence"]:
        return "<p>No evidence of misbehaviour.</p>"
    return ("<p>Findings verified by this explorer are proven by signed envelopes; publishers' "
            "reports are their signed claims. Click what was found for its signed messages "
            "and why they prove it.</p>"
            + evidence_table(doc["evidence"]))


def _schema_ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _ok(schema: dict, what: str) -> dict:
    return {"200": {"description": what, "content": {"application/json": {"schema": schema}}},
            "503": {"description": "the first crawl is still running"}}


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "p2pfleet explorer API", "version": "1",
             "description": "What the explorer found in the DHT, verified by itself. "
                            "Evidence with verified_by other than 'explorer' is a publisher's "
                            "signed claim."},
    "paths": {
        "/api/snapshot": {"get": {"summary": "Everything of the last crawl",
                                  "responses": _ok(_schema_ref("Snapshot"), "the snapshot")}},
        "/api/peers": {"get": {"summary": "Peers found", "responses": _ok(
            {"type": "array", "items": _schema_ref("Peer")}, "peers")}},
        "/api/peers/{peer_id}": {"get": {
            "summary": "One peer, with the evidence against it",
            "parameters": [{"name": "peer_id", "in": "path", "required": True,
                            "schema": {"type": "string"}}],
            "responses": {**_ok(_schema_ref("Peer"), "the peer"),
                          "404": {"description": "no such peer is known"}}}},
        "/api/totals": {"get": {"summary": "Capacity by state and hardware class",
                                "responses": _ok({"type": "object"}, "totals")}},
        "/api/jobs": {"get": {"summary": "Announced jobs heard, with progress", "responses": _ok(
            {"type": "array", "items": _schema_ref("Job")}, "jobs")}},
        "/api/evidence": {"get": {"summary": "Evidence of misbehaviour", "responses": _ok(
            {"type": "array", "items": _schema_ref("Evidence")}, "evidence")}},
        "/api/history": {"get": {"summary": "Available and used capacity over time",
                                 "responses": _ok({"type": "array", "items": {
                                     "type": "object", "properties": {
                                         "t": {"type": "number"}, "available": {"type": "number"},
                                         "used": {"type": "number"}}}}, "samples")}},
        "/metrics": {"get": {"summary": "The totals as Prometheus text", "responses": {
            "200": {"description": "Prometheus text format 0.0.4",
                    "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
    },
    "components": {"schemas": {
        "Peer": {"type": "object", "required": ["peer_id", "state"], "properties": {
            "peer_id": {"type": "string"},
            "state": {"type": "string", "enum": ["available", "busy", "paused", "offline", "unknown"]},
            "why_offline": {"type": ["string", "null"]},
            "sw_version": {"type": ["string", "null"]}, "ort_version": {"type": ["string", "null"]},
            "hw_class": {"type": ["string", "null"]}, "hw_class_short": {"type": ["string", "null"]},
            "cores": {"type": ["integer", "null"]}, "memory_mb": {"type": ["integer", "null"]},
            "bench": {"type": ["number", "null"]}, "slots": {"type": ["integer", "null"]},
            "providers": {"type": "array", "items": {"type": "string"}},
            "addrs": {"type": "array", "items": {"type": "string"}},
            "record_seq": {"type": ["integer", "null"]}, "record_exp_ms": {"type": ["integer", "null"]},
            "rtt_ms": {"type": ["number", "null"]}, "rtt_by": {"type": ["string", "null"]},
            "last_seen": {"type": ["number", "null"]}, "info": {"type": ["object", "null"]},
            "copies": {"type": "integer"}, "flagged": {"type": "boolean"},
            "dht_role": {"type": ["string", "null"], "enum": ["server", "client", None]},
            "reach": {"type": ["string", "null"],
                      "enum": ["direct", "relayed", "not reached", None]}}},
        "Job": {"type": "object", "properties": {
            "publisher": {"type": "string"}, "job_id": {"type": "string"},
            "shards_total": {"type": "integer"}, "shards_left": {"type": "integer"},
            "shards_done": {"type": "integer"}, "progress": {"type": "number"},
            "quorum": {"type": "integer"}, "credit_rate": {"type": "integer"},
            "first_heard_at": {"type": ["number", "null"]},
            "heard": {"type": "array", "description": "announcements heard, oldest first",
                      "items": {"type": "object", "properties": {
                          "t": {"type": "number"}, "shards_left": {"type": "integer"}}}}}},
        "Evidence": {"type": "object", "properties": {
            "kind": {"type": "string"}, "accused": {"type": "string"},
            "verified_by": {"type": "string"}, "verified_by_explorer": {"type": "boolean"},
            "detail": {"type": "string"}, "served_by": {"type": "array", "items": {"type": "string"}},
            "proofs": {"type": "array", "items": {"type": "string", "description": "envelope hex"}}}},
        "Snapshot": {"type": "object", "properties": {
            "network": {"type": "string"}, "crawled_at": {"type": "number"},
            "duration_s": {"type": "number"}, "discovered": {"type": "integer"},
            "sampled": {"type": "boolean"}, "note": {"type": ["string", "null"]},
            "peers": {"type": "array", "items": _schema_ref("Peer")},
            "jobs": {"type": "array", "items": _schema_ref("Job")},
            "evidence": {"type": "array", "items": _schema_ref("Evidence")},
            "totals": {"type": "array"}, "capacity": {"type": "object"},
            "history": {"type": "array"},
            "history_by_class": {"type": "array", "description": "per history point: short "
                                 "hardware class -> available, used (samples/s), "
                                 "available_nodes, used_nodes"}}},
    }},
}


async def serve(app: WebApp, host: str, port: int, *,
                task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `app` with hypercorn on trio; `task_status.started` gets the bound URL."""
    from hypercorn.config import Config
    from hypercorn.trio import serve as hypercorn_serve

    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = None
    config.use_reloader = False

    async def _started(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await hypercorn_serve(app, config, task_status=task_status)

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(_started)
        task_status.started(binds[0] if binds else f"http://{host}:{port}")
