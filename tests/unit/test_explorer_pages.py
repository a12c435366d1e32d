"""The explorer's page builders (issue 18 item 2): jobs view, mesh picture, capacity chart
and evidence pages, fed hostile strings (evidence and records are hostile input: nothing
may come out unescaped), real signed envelopes for the evidence page, and 150 peers for the
mesh picture."""

from __future__ import annotations

import html
import json
import re
import time

from p2pfleet.explorer.evidence import Finding, check_copies
from p2pfleet.explorer.evidence_page import evidence_id
from p2pfleet.explorer.model import History, JobView, PeerView, Snapshot, capacity_by_class, job_heard
from p2pfleet.explorer.web import WebApp
from p2pfleet.identity import Identity
from p2pfleet.wire.envelope import seal
from p2pfleet.wire.kinds import Capacity

NET = "pagetest"
EVIL = "<script>alert(1)</script>\"'><img src=x onerror=alert(2)>"
PUB = "12D3KooWPUB" + EVIL


def _capacity(seq: int, bench: float, signer: Identity, exp: int) -> bytes:
    return seal(Capacity(seq=seq, exp=exp, sw_version="0.1.0",
                         state="available", hw_class=b"\x66" * 32, cores=4, memory_mb=2048,
                         bench=bench, providers=("CPUExecutionProvider",), ort_version="1.32.0",
                         slots=1, addrs=()), signer, NET)


def _doc(n_peers: int = 3) -> dict:
    now = time.time()
    liar = Identity.from_seed(b"liar")
    peers = []
    for i in range(n_peers):
        peers.append(PeerView(
            f"12D3KooW{i:04d}{EVIL}" if i == 0 else f"12D3KooWPEER{i:04d}",
            state=("available", "busy", "offline")[i % 3], sw_version=EVIL if i == 0 else
            f"0.{i % 4}.0", hw_class=("ab" if i % 2 else "cd") * 32, bench=100.0 + i,
            addrs=(EVIL,), dht_role=("server", "client", None)[i % 3],
            reach=("direct", "relayed", "not reached")[i % 3], flagged=i == 1,
            providers=(EVIL,)))
    peers.append(PeerView(liar.peer_id, state="available", sw_version="0.1.0"))
    history = History()
    history.add(now - 60, 201.0, 0.0, capacity_by_class(peers[:1]))
    history.add(now, 100.0, 101.0, capacity_by_class(peers))
    held = None
    job = None
    for k, (t, left) in enumerate(((now - 120, 10), (now - 60, 7), (now, 4))):
        job = job_heard(held, JobView(PUB, "ab" * 16 + EVIL, k + 1, int((now + 600) * 1000),
                                      10, left, 2, 3, "ee" * 32, 4096, t))
        held = job
    exp = int(now * 1000) + 900_000
    a, b = _capacity(5, 100.0, liar, exp), _capacity(5, 999.0, liar, exp)
    equivocation = check_copies(NET, liar.peer_id, {"s1": a, "s2": b}, int(now * 1000)).findings
    assert equivocation and equivocation[0].kind == "equivocation"
    findings = [*equivocation,
                Finding("wrong_result", peers[1].peer_id, PUB, "reported " + EVIL, (),
                        (b"\x00not an envelope" + EVIL.encode(),))]
    return Snapshot(network=NET, crawled_at=now, duration_s=1.0, peers=peers, jobs=[job],
                    findings=findings, discovered=len(peers), sampled=False, sample_cap=256,
                    history=history).to_json()


def _pages(app: WebApp, doc: dict) -> dict[str, str]:
    paths = ["/", "/jobs", "/mesh", "/evidence", *(f"/evidence/{evidence_id(e)}"
                                                   for e in doc["evidence"]),
             *(f"/peers/{p['peer_id']}" for p in doc["peers"] if "/" not in p["peer_id"])]
    out = {}
    for path in paths:
        status, _ctype, body = app.handle("GET", path)
        assert status == 200, path
        out[path] = body.decode()
    return out


def test_no_page_lets_a_hostile_string_through():
    doc = _doc()
    for path, page in _pages(WebApp(lambda: doc), doc).items():
        assert "<script>alert" not in page and "<img" not in page, path
        assert "onerror=alert(2)>" not in page, path
    jobs = WebApp(lambda: doc).handle("GET", "/jobs")[2].decode()
    assert html.escape(EVIL) in jobs  # shown, escaped


def test_jobs_view_shows_progress_throughput_replication_and_its_limits():
    doc = _doc()
    page = WebApp(lambda: doc).handle("GET", "/jobs")[2].decode()
    assert "6 done, 4 left of 10 shards (60 %)" in page
    assert "3.00 shards/min" in page  # 6 shards in 2 min of announcements
    assert "at least 12 agreeing results accepted" in page  # quorum 2 x 6 done
    assert "What public messages can and cannot tell" in page
    assert "secret re-checks and audits" in page
    assert page.count('class="job-chart"') == 1
    assert [h["shards_left"] for h in doc["jobs"][0]["heard"]] == [10, 7, 4]


def test_mesh_picture_stays_grouped_and_clickable_at_150_peers():
    doc = _doc(150)
    page = WebApp(lambda: doc).handle("GET", "/mesh")[2].decode()
    svg = page[page.index('<svg id="mesh"'):page.index("</svg>", page.index('<svg id="mesh"'))]
    assert svg.count('class="mesh-peer"') == 151
    size = float(re.search(r'viewBox="0 0 (\d+)', svg).group(1))
    for cx, cy, r in re.findall(r'cx="([\d.]+)" cy="([\d.]+)" r="([\d.]+)"', svg):
        assert 0 <= float(cx) - float(r) and float(cx) + float(r) <= size
        assert 0 <= float(cy) - float(r) and float(cy) + float(r) <= size
        assert float(r) >= 2.0
    assert "<line" not in svg and "<path" not in svg  # no hairball: rings, no edges
    assert 'stroke-dasharray="2,1.5"' in svg and 'stroke="#d00"' in svg  # relayed, flagged
    assert "DHT servers" in page and "reachability" in page
    assert svg.count('class="version-label"') >= 3 * 4  # arcs by version on each ring


def test_evidence_is_one_click_away_with_its_signed_messages():
    doc = _doc()
    app = WebApp(lambda: doc)
    listing = app.handle("GET", "/evidence")[2].decode()
    own = next(e for e in doc["evidence"] if e["verified_by_explorer"])
    assert f'href="/evidence/{evidence_id(own)}"' in listing
    page = app.handle("GET", f"/evidence/{evidence_id(own)}")[2].decode()
    assert page.count("signature verified on this page") == 2
    assert "same sequence number with different bodies" in page
    assert own["accused"] in page and "999.0" in page and "100.0" in page
    assert page.count("← differs") == 2  # the bench: 100.0 in one, 999.0 in the other
    claim = next(e for e in doc["evidence"] if not e["verified_by_explorer"])
    page = app.handle("GET", f"/evidence/{evidence_id(claim)}")[2].decode()
    assert "signed claim, not the explorer" in page and "does not open" in page
    assert app.handle("GET", "/evidence/" + "0" * 16)[0] == 404


def test_capacity_chart_draws_classes_for_the_script_and_states_the_kw_assumption():
    doc = _doc()
    app = WebApp(lambda: doc)
    page = app.handle("GET", "/")[2].decode()
    assert 'data-series="available"' in page and 'data-series="abababab:used"' in page
    assert 'data-series="cdcdcdcd:available"' in page
    points = json.loads(html.unescape(re.search(r'data-points="([^"]*)"', page).group(1)))
    assert points[-1]["by_class"]["abababab"]["used_nodes"] >= 1
    assert "60 W per computing node" in page and 'id="capacity-by-class"' in page
    assert '<script src="/static/explorer.js"' in page
    status, ctype, body = app.handle("GET", "/static/explorer.js")
    assert status == 200 and ctype.startswith(b"text/javascript") and b"series-toggle" in body
    assert b"http" not in body.replace(b"http://www.w3.org/2000/svg", b"")  # fetches nothing
    assert json.loads(app.handle("GET", "/api/history")[2])[1].keys() == {"t", "available", "used"}
