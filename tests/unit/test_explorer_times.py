"""The explorer's web page gives times as people read them (local, relative, ISO 8601) and
names the unit of every figure (issue 18, item 2)."""

from __future__ import annotations

import time

from p2pfleet.explorer.web import WebApp, human_time

PEER = "12D3KooWAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"


def _doc(now: float) -> dict:
    from p2pfleet.explorer.model import History, PeerView, Snapshot

    peer = PeerView(PEER, state="available", sw_version="0.1.0", hw_class="ab" * 32,
                    bench=120.0, rtt_ms=2.5, rtt_by="ping", last_seen=now - 125,
                    record_exp_ms=int((now + 3600) * 1000))
    history = History()
    history.add(now - 60, 120.0, 0.0)
    history.add(now, 100.0, 20.0)
    return Snapshot(network="t", crawled_at=now, duration_s=1.0, peers=[peer], jobs=[],
                    findings=[], discovered=1, sampled=False, sample_cap=256,
                    history=history).to_json()


def test_human_time_is_local_relative_and_iso():
    now = time.time()
    assert "(2 min ago; " in human_time(now - 125, now)
    ahead = human_time(now + 3 * 3600 + 120, now)
    assert "in 3 h 2 min" in ahead and ahead.endswith("Z)")
    assert human_time(None) == "-"


def test_pages_show_human_times_and_units():
    now = time.time()
    app = WebApp(lambda: _doc(now))
    front = app.handle("GET", "/")[2].decode()
    assert "min ago" in front and "samples/s of the reference MLP" in front
    assert "samples/s</text>" in front  # the chart's axis names its unit
    detail = app.handle("GET", f"/peers/{PEER}")[2].decode()
    assert "record expires" in detail and "in 60 min" in detail and "Unix ms" in detail
    assert "reference 784-256-10 MLP" in detail
