"""Real `p2pfleet node start` processes on loopback: records, traces, leaving, signals."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from p2pfleet.live.localfleet import LocalFleet, mesh_sockets, wait_for

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    with LocalFleet(tmp_path_factory.mktemp("fleet"), 4, network="systest") as f:
        yield f


def test_every_node_finds_every_record(fleet):
    for reader in fleet.nodes:
        for owner in fleet.nodes:
            reply = wait_for(lambda: (r := reader.ask("lookup", peer_id=owner.peer_id))["found"] and r,
                             30, f"node {reader.index} to find node {owner.index}'s record")
            assert reply["record"]["state"] == "available"
            # measured at start by the canary and reference models (exec/hwclass.py)
            assert len(bytes.fromhex(reply["record"]["hw_class"])) == 32
            assert reply["record"]["bench"] > 0
            assert any(a.startswith(f"/ip4/{owner.ip}/") for a in reply["record"]["addrs"])


def test_status_explains_itself_in_json(fleet):
    status = fleet.nodes[1].ask("status")
    assert status["computing"] and status["in_mesh"] and status["peers"] >= 1
    assert status["network"] == "systest" and status["why"][0].startswith("computing")


def test_sigterm_publishes_leaving_record_and_exits(tmp_path):
    with LocalFleet(tmp_path, 3, network="systest") as f:
        leaver, reader = f.nodes[2], f.nodes[1]
        wait_for(lambda: reader.ask("lookup", peer_id=leaver.peer_id)["found"], 30, "record")
        start = time.monotonic()
        assert leaver.stop(signal.SIGTERM) == 0
        assert time.monotonic() - start < 10
        reply = wait_for(lambda: (r := reader.ask("lookup", peer_id=leaver.peer_id))["found"]
                         and r["record"]["state"] == "leaving" and r, 30, "leaving record")
        assert reply["record"]["state"] == "leaving"


TRACE = [
    {"format": "p2pfleet-vehicle-trace", "version": 1, "start": 0, "loop": False,
     "description": "plugged in, unplugged for a while, plugged in again"},
    {"t": 0, "parked": True, "plugged_in": True, "soc_pct": 80, "charge_limit_pct": 90,
     "network": "wifi", "metered": False},
    {"t": 36, "plugged_in": False},
    {"t": 84, "plugged_in": True},
]


def test_trace_driven_node_leaves_goes_silent_and_rejoins(tmp_path):
    trace = tmp_path / "car.jsonl"
    trace.write_text("\n".join(json.dumps(line) for line in TRACE) + "\n")
    with LocalFleet(tmp_path / "f", 3, network="systest", traces={2: str(trace)},
                    trace_speedup=3.0) as f:
        car, reader = f.nodes[2], f.nodes[0]
        wait_for(lambda: car.ask("status")["in_mesh"], 20, "the car to join")
        wait_for(lambda: reader.ask("lookup", peer_id=car.peer_id)["found"], 20, "its record")
        # unplugged at trace t=36 s, real ~12 s after start
        status = wait_for(lambda: (s := car.ask("status")) and not s["in_mesh"] and s, 30,
                          "the car to leave")
        assert any("plugged" in line for line in status["why"]), status["why"]  # the trace's doing
        leaving = wait_for(lambda: (r := reader.ask("lookup", peer_id=car.peer_id))["found"]
                           and r["record"]["state"] == "leaving", 20, "leaving record")
        assert leaving
        # silent: no TCP socket at all in the car's process, no peer connected to it, and
        # not one byte more on the wire
        moved = car.ask("status")
        moved = moved["bytes_sent"] + moved["bytes_received"]
        for _ in range(5):
            status = car.ask("status")
            assert status["in_mesh"] is False
            assert status["bytes_sent"] + status["bytes_received"] == moved
            assert mesh_sockets(car) == 0
            assert all(car.peer_id not in n.ask("peers")["peers"] for n in f.nodes[:2])
            time.sleep(0.5)
        # plugged in again at trace t=84 s, real ~28 s
        wait_for(lambda: car.ask("status")["in_mesh"], 30, "the car to rejoin")
        record = wait_for(lambda: (r := reader.ask("lookup", peer_id=car.peer_id))["found"]
                          and r["record"]["state"] == "available" and r, 30, "fresh record")
        assert record["record"]["state"] == "available"


def test_announcement_reaches_every_node(fleet):
    from p2pfleet.identity import Identity
    from p2pfleet.wire.envelope import seal
    from p2pfleet.wire.kinds import JobAnnouncement, Requirements

    publisher = Identity.from_seed(b"system test publisher")
    job_id = os.urandom(16)
    body = JobAnnouncement(
        seq=int(time.time() * 1000), exp=int(time.time() * 1000) + 600_000, job_id=job_id,
        model_digest=b"m" * 32, model_size=1000,
        requirements=Requirements(min_memory_mb=128, providers=(), min_sw_version="0.1.0",
                                  ort_versions=">=1.19"),
        credit_rate=2, quorum=2, shards_total=8, shards_left=8, addrs=())
    time.sleep(1.5)  # the gossip mesh forms over a few heartbeats
    fleet.nodes[3].ask("announce", envelope_hex=seal(body, publisher, "systest").hex())
    for node in fleet.nodes:
        heard = wait_for(lambda: [j for j in node.ask("jobs")["jobs"] if j["job_id"] == job_id.hex()],
                         15, f"node {node.index} to hear the job")
        assert heard[0]["publisher"] == publisher.peer_id and heard[0]["quorum"] == 2


def test_demo_runs_and_checks_itself():
    """`make demo` is the README's main command: it must pass as the README runs it."""
    import subprocess
    import sys
    from pathlib import Path

    demo = Path(__file__).resolve().parents[2] / "tools" / "demo.py"
    proc = subprocess.run([sys.executable, str(demo)], capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "demo passed" in proc.stdout


def test_daily_transfer_cap_takes_the_node_out_of_the_mesh(tmp_path):
    """Bytes on the wire are counted; past the owner's daily cap the node leaves."""
    with LocalFleet(tmp_path, 2, network="systest") as f:
        capped = f.nodes[1]
        capped.stop()
        capped.settings["policy.daily_transfer_cap_mb"] = "0.005"  # 5 kB
        capped.start(f.network, [f.nodes[0].addr])
        # received bytes count once their peer's minute ended within its budget
        # (core/peer_budget.py), so the cap is reached about a minute after the start
        status = wait_for(lambda: (s := capped.try_ask("status")) and s["mesh_leaves"] >= 1 and s,
                          150, "the capped node to leave")
        assert not status["in_mesh"]
        assert any(r["code"] == "transfer_cap" for r in status["reasons"]), status["reasons"]
        assert status["bytes_sent"] + status["bytes_received"] >= 5000
        assert mesh_sockets(capped) == 0


def test_prometheus_metrics_on_localhost(fleet):
    import urllib.request

    status = fleet.nodes[0].ask("status")
    host, port = status["metrics_addr"].rsplit(":", 1)
    assert host == "127.0.0.1"
    text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read().decode()
    assert "p2pfleet_in_mesh 1" in text and "# TYPE p2pfleet_bytes_sent_total counter" in text
    assert f'peer_id="{fleet.nodes[0].peer_id}"' in text
