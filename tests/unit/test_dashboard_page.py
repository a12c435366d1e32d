"""The owner's dashboard page (p2pfleet/dashboard/): pure functions from a state document
to HTML, everything escaped; the loopback-only server; the vehicle timeline."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from p2pfleet.dashboard.page import build_page, when
from p2pfleet.dashboard.serve import BindError, Dashboard, loopback_host
from p2pfleet.live.timeline import VehicleTimeline

NOW = 1_780_000_000.0
HOSTILE = '<script>alert("x")</script>'


def _publisher(peer: str = "12D3KooWPublisherA", paid: int = 180) -> dict:
    return {
        "publisher": peer, "publisher_key": "00", "leases": 4, "results_delivered": 3,
        "results_pending": 1, "failures": 0, "hand_backs": 1, "receipts": 2,
        "conflicting_receipts": 0, "credit": {"promised": 300, "paid": paid, "unpaid": 120},
        "unpaid_compute_ms": 60_000, "compute_ms": 180_000,
        "energy_kwh": {"metered": 0.0004, "estimated": 0.0025},
        "days": [{"day": "2026-06-01", "results": 2, "credit_paid": 100, "compute_ms": 120_000,
                  "energy_kwh": {"metered": 0.0, "estimated": 0.002}},
                 {"day": "2026-06-02", "results": 1, "credit_paid": 80, "compute_ms": 60_000,
                  "energy_kwh": {"metered": 0.0004, "estimated": 0.0005}}],
    }


def _status(**over) -> dict:
    st = {
        "peer_id": "12D3KooWMyNode", "network": "main", "computing": False, "in_mesh": False,
        "peers": 0, "why": ["not computing", "quiet hours until 06:00"],
        "reasons": [{"code": "quiet_hours", "text": "quiet hours until 06:00",
                     "until": NOW + 3600}],
        "vehicle": "ocpp: charger answering", "work": {"shards_done": 5, "hand_backs": 1,
                                                       "shards_failed": 0, "running": []},
        "history": [[NOW - 60, "left the mesh"]], "now": NOW,
        "vehicle_now": {"soc_pct": 72.4, "charge_limit_pct": 80, "plugged_in": True,
                        "parked": True, "network": "wifi", "metered": False,
                        "departure_at": NOW + 8 * 3600},
        "timeline": [[NOW - 7200, 60.0, False, True], [NOW - 3600, 65.0, True, True],
                     [NOW - 60, 72.4, True, True]],
        "today": {"energy_wh": 120.0, "energy_budget_wh": 2000.0,
                  "transfer_bytes": 123_000_000, "transfer_cap_bytes": 500_000_000},
        "quiet_hours": ["23:00-06:00"], "next_wake_at": NOW + 3600,
    }
    st.update(over)
    return st


def _doc(**over) -> dict:
    doc = {"now": NOW, "tz_offset_s": 3600, "status": _status(), "status_error": None,
           "ledger": {"publishers": [_publisher()]},
           "hand_backs": [{"at": NOW - 300, "publisher": "12D3KooWPublisherA",
                           "job_id": "ab" * 16, "shard": 3, "reason": "unplugged", "done": 2}]}
    doc.update(over)
    return doc


def test_page_says_why_when_and_shows_credit_and_charts():
    page = build_page(_doc())
    assert 'id="computing">not computing<' in page
    assert "quiet hours until 06:00" in page and "planned departure" in page
    assert "23:00-06:00" in page
    assert 'class="credit-paid">180<' in page and 'class="credit-promised">300<' in page
    assert "123.0 of 500 MB data used today" in page and "120 of 2000 Wh" in page
    for chart in ("battery-chart", "credit-chart-0", "results-chart-0", "kwh-chart-0"):
        assert f'id="{chart}"' in page
    assert "metered" in page and "estimated" in page
    assert 'class="reason">unplugged<' in page
    assert "<script" not in page and "http://" not in page and "https://" not in page


def test_computing_and_not_running():
    on = build_page(_doc(status=_status(computing=True, in_mesh=True, peers=4, why=["computing"])))
    assert 'id="computing">computing<' in on and "in the mesh with 4 peers" in on
    off = build_page(_doc(status=None, status_error="no node is running with this data dir"))
    assert "node not running" in off and "no node is running" in off
    assert 'class="credit-paid">180<' in off  # the ledger is there without the node


@pytest.mark.parametrize("where", ["reason", "publisher", "why", "vehicle", "history", "day"])
def test_hostile_strings_are_escaped_everywhere(where):
    doc = _doc()
    if where == "reason":
        doc["hand_backs"][0]["reason"] = HOSTILE
    elif where == "publisher":
        doc["ledger"]["publishers"] = [_publisher(peer=HOSTILE)]
        doc["hand_backs"][0]["publisher"] = HOSTILE
    elif where == "why":
        doc["status"]["why"] = [HOSTILE]
        doc["status"]["reasons"][0]["text"] = HOSTILE
    elif where == "vehicle":
        doc["status"]["vehicle"] = HOSTILE
        doc["status"]["vehicle_now"]["network"] = HOSTILE
    elif where == "history":
        doc["status"]["history"] = [[NOW, HOSTILE]]
    else:
        doc["ledger"]["publishers"][0]["days"][0]["day"] = HOSTILE
    page = build_page(doc)
    assert "<script" not in page
    assert "&lt;script&gt;" in page


def test_when_gives_local_time_relative_and_iso():
    out = when(NOW + 2 * 3600 + 300, NOW, 0)
    assert "in 2 h 5 min" in out and 'datetime="' in out and "Z" in out
    assert "ago" in when(NOW - 120, NOW, 0)
    assert when(None, NOW, 0) == "unknown"


def test_phone_layout_has_viewport_and_fluid_charts():
    page = build_page(_doc())
    assert 'name="viewport"' in page and "minmax(" in page and 'width="100%"' in page


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "example.org", "10.0.0.1"])
def test_non_loopback_bind_is_refused(host):
    with pytest.raises(BindError, match="loopback"):
        loopback_host(host)
    with pytest.raises(BindError):
        Dashboard(host, 0, lambda: "")


def test_server_answers_only_at_its_secret_path():
    dash = Dashboard("127.0.0.1", 0, lambda: build_page(_doc()))
    dash.start_thread()
    try:
        assert dash.url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(dash.url, timeout=10) as r:
            assert r.status == 200 and b"not computing" in r.read()
            assert "default-src 'none'" in r.headers["Content-Security-Policy"]
        root = dash.url.rsplit("/", 2)[0] + "/"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(root, timeout=10)
        assert err.value.code == 404
    finally:
        dash.close()
    assert loopback_host("localhost") == "127.0.0.1" and loopback_host("::1") == "::1"


def test_timeline_keeps_changes_and_drops_repeats():
    tl = VehicleTimeline(max_points=3, every_s=300)
    tl.note(0, 50, False, True)
    tl.note(5, 50.2, False, True)      # same state, soon after: dropped
    tl.note(10, 50.2, True, True)      # plugged in: kept
    tl.note(20, 52, True, True)        # a percent more: kept
    tl.note(400, 52, True, True)       # every_s later: kept, the oldest goes
    assert [p[0] for p in tl.points] == [10, 20, 400]
    tl.note(100, 10, False, False)     # time going backwards is ignored
    assert tl.points[-1][0] == 400


def test_plugged_spans_merge_points():
    from p2pfleet.dashboard.svg import plugged_spans

    pts = [[0, 50, True, True], [10, 51, True, True], [20, 52, False, True],
           [30, 52, True, True]]
    assert plugged_spans(pts, 40) == [(0, 20), (30, 40)]
