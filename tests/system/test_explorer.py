"""`p2pfleet explore` against a fleet of real node processes and one malicious node.

The malicious node is this file run as a script (`malicious` mode): a Mesh that puts two
different capacity records with one sequence number on different DHT holders
(equivocation) and serves, under its own key, a record signed by another key. Such records
are refused by our validators on every normal path, so it writes its own DHT store directly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

NETWORK = "exptest"
HERE = Path(__file__).resolve()

TRACE_LEAVES = [  # plugged in, unplugged at trace t=30 s for good
    {"format": "p2pfleet-vehicle-trace", "version": 1, "start": 0, "loop": False,
     "description": "plugged in, then unplugged"},
    {"t": 0, "parked": True, "plugged_in": True, "soc_pct": 80, "charge_limit_pct": 90,
     "network": "wifi", "metered": False},
    {"t": 30, "plugged_in": False},
]
TRACE_STAYS = [
    {"format": "p2pfleet-vehicle-trace", "version": 1, "start": 0, "loop": False,
     "description": "plugged in all along"},
    {"t": 0, "parked": True, "plugged_in": True, "soc_pct": 70, "charge_limit_pct": 90,
     "network": "wifi", "metered": False},
]


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return json.loads(reply.read())


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return reply.read().decode()


@pytest.mark.system
def test_explorer_maps_the_fleet_and_flags_the_malicious_node(tmp_path):
    from p2pfleet.identity import Identity
    from p2pfleet.live.localfleet import P2PFLEET, LocalFleet, wait_for
    from p2pfleet.wire.envelope import seal
    from p2pfleet.wire.kinds import JobAnnouncement, Requirements

    traces = {}
    for name, trace in (("leaves", TRACE_LEAVES), ("stays", TRACE_STAYS)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(json.dumps(line) for line in trace) + "\n")
        traces[name] = str(path)
    fleet = LocalFleet(tmp_path / "fleet", 5, network=NETWORK,
                       traces={3: traces["leaves"], 4: traces["stays"]}, trace_speedup=3.0)
    fleet.nodes[1].settings["node.info_opt_in"] = "true"
    bad = explorer = None
    with fleet:
        try:
            leaver = fleet.nodes[3]
            addrs = [fleet.wait_addr(n, 30) for n in fleet.nodes if n is not leaver]
            bad = subprocess.Popen([sys.executable, str(HERE), "malicious", NETWORK, *addrs],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            line = bad.stdout.readline()
            assert line, "the malicious node did not start"
            bad_id = json.loads(line)["peer_id"]

            explorer = subprocess.Popen(
                [*P2PFLEET, "--data-dir", str(tmp_path / "explorer"), "explore", "--serve",
                 "--port", "0", "--interval", "2", "--timeout", "20", "--network", NETWORK,
                 "--bootstrap", addrs[0]],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            line = explorer.stdout.readline()
            assert "explorer dashboard at http://127.0.0.1:" in line, line
            base = line.split(" at ")[1].strip()
            honest = [n for n in fleet.nodes]

            def snapshot() -> dict | None:
                try:
                    return get_json(f"{base}/api/snapshot")
                except urllib.error.HTTPError:
                    return None

            def everyone_found() -> dict | None:
                snap = snapshot()
                if not snap:
                    return None
                peers = {p["peer_id"]: p for p in snap["peers"]}
                stayers = [n for n in honest if n is not leaver]
                if all(peers.get(n.peer_id, {}).get("state") == "available" for n in stayers) \
                        and bad_id in peers and len(snap["evidence"]) >= 2:
                    return snap
                return None

            snap = wait_for(everyone_found, 60, "the explorer to find every node and the evidence")
            peers = {p["peer_id"]: p for p in snap["peers"]}
            for node in honest:
                view = peers[node.peer_id]
                assert not view["flagged"], view
                if node is not leaver:
                    assert view["rtt_ms"] is not None and view["bench"] > 0
                    assert view["sw_version"] and view["hw_class_short"]
            assert peers[fleet.nodes[1].peer_id]["rtt_by"] == "info"  # opted in
            assert peers[fleet.nodes[1].peer_id]["info"]["uptime_s"] == 0  # rounded to hours
            assert peers[fleet.nodes[0].peer_id]["info"] is None      # not opted in
            assert peers[bad_id]["flagged"]
            kinds = {(e["kind"], e["accused"], e["verified_by"]) for e in snap["evidence"]}
            assert ("equivocation", bad_id, "explorer") in kinds
            assert ("wrong_key", bad_id, "explorer") in kinds

            # the car unplugged at trace t=30 s (real ~10 s): shown offline, as its trace says
            gone = wait_for(lambda: (s := snapshot()) and next(
                (p for p in s["peers"] if p["peer_id"] == leaver.peer_id
                 and p["state"] == "offline"), None), 60, "the leaving car to show offline")
            assert gone["why_offline"] in ("leaving", "expired", "no record", "gone from the DHT")
            # the leaving record goes out before the host closes: allow the node to finish
            wait_for(lambda: not leaver.ask("status")["in_mesh"], 15, "the car to leave the mesh")
            assert fleet.nodes[4].ask("status")["in_mesh"]

            # announced jobs show their progress
            publisher = Identity.from_seed(b"explorer test publisher")
            job_id = os.urandom(16)
            now = int(time.time() * 1000)
            body = JobAnnouncement(
                seq=now, exp=now + 600_000, job_id=job_id, model_digest=b"m" * 32,
                model_size=1000, requirements=Requirements(
                    min_memory_mb=128, providers=(), min_sw_version="0.1.0", ort_versions=""),
                credit_rate=2, quorum=2, shards_total=10, shards_left=4, addrs=())
            envelope = seal(body, publisher, NETWORK).hex()

            def job_seen() -> dict | None:
                fleet.nodes[2].ask("announce", envelope_hex=envelope)  # gossip has no history
                jobs = get_json(f"{base}/api/jobs")
                return next((j for j in jobs if j["job_id"] == job_id.hex()), None)

            job = wait_for(job_seen, 40, "the explorer to hear the job", interval=2.0)
            assert job["shards_done"] == 6 and job["publisher"] == publisher.peer_id

            metrics = get_text(f"{base}/metrics")
            assert 'p2pfleet_explorer_peers{network="exptest",state="available"}' in metrics
            assert "p2pfleet_explorer_capacity_samples_per_second{" in metrics
            assert 'kind="equivocation",verified_by="explorer"' in metrics
            assert get_json(f"{base}/openapi.json")["paths"]["/api/peers/{peer_id}"]
            detail = get_json(f"{base}/api/peers/{bad_id}")
            assert {e["kind"] for e in detail["evidence"]} >= {"wrong_key", "equivocation"}
            assert "<svg" in get_text(f"{base}/")

            # one-shot --json for scripts: the same document
            proc = subprocess.run(
                [*P2PFLEET, "--data-dir", str(tmp_path / "explorer2"), "explore", "--json",
                 "--timeout", "20", "--network", NETWORK, "--bootstrap", addrs[1]],
                capture_output=True, text=True, timeout=90)
            assert proc.returncode == 0, proc.stderr[-2000:]
            doc = json.loads(proc.stdout)
            found = {p["peer_id"]: p for p in doc["peers"]}
            for node in honest:
                if node is not leaver:
                    assert found[node.peer_id]["state"] == "available"
            assert found[bad_id]["flagged"] and doc["sampled"] is False
        finally:
            for proc in (explorer, bad):
                if proc is not None:
                    proc.kill()
                    proc.wait(10)


def test_explore_names_a_bad_bootstrap_address(tmp_path):
    from p2pfleet.live.localfleet import P2PFLEET

    proc = subprocess.run([*P2PFLEET, "--data-dir", str(tmp_path), "explore", "--bootstrap",
                           "/ip4/127.0.0.1/tcp/1"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--bootstrap" in proc.stderr and "/p2p/<peer id>" in proc.stderr


# --- the malicious node (run as a script) ---------------------------------------------------

async def _malicious(network: str, bootstrap: list[str]) -> None:
    import trio
    from libp2p.peer.id import ID

    from p2pfleet.identity import Identity
    from p2pfleet.net import dht_lookup
    from p2pfleet.net.mesh import Mesh, MeshSettings
    from p2pfleet.wire.envelope import seal
    from p2pfleet.wire.kinds import Capacity

    me = Identity.from_seed(b"the malicious node")
    mesh = Mesh(me, MeshSettings(network=network, listen=("/ip4/127.0.0.50/tcp/0",),
                                 bootstrap=tuple(bootstrap)))

    def record(seq: int, bench: float, signer: Identity) -> bytes:
        body = Capacity(seq=seq, exp=int(time.time() * 1000) + 900_000, sw_version="0.1.0",
                        state="available", hw_class=b"\x66" * 32, cores=4, memory_mb=2048,
                        bench=bench, providers=("CPUExecutionProvider",), ort_version="1.32.0",
                        slots=1, addrs=())
        return seal(body, signer, network)

    async with trio.open_nursery() as nursery:
        await nursery.start(mesh.run)
        holders = []
        for addr in bootstrap:
            holders.append(ID.from_base58(await mesh.connect(addr)))
        seq = int(time.time() * 1000)
        key = mesh.names.node_key(me.peer_id).encode()
        half = len(holders) // 2
        await dht_lookup.store_at(mesh.dht, holders[:half], key, record(seq, 10.0, me))
        await dht_lookup.store_at(mesh.dht, holders[half:], key, record(seq, 90.0, me))
        mesh.dht.value_store.put(key, record(seq + 1, 50.0, Identity.from_seed(b"someone else")))
        print(json.dumps({"peer_id": me.peer_id}), flush=True)
        await trio.sleep_forever()


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "malicious":
    import trio

    trio.run(_malicious, sys.argv[2], sys.argv[3:])


# --- views, web routes and publisher evidence, without a fleet ------------------------------

def _doc_with_everything() -> dict:
    from p2pfleet.explorer.evidence import Finding
    from p2pfleet.explorer.model import History, JobView, PeerView, Snapshot

    peers = [PeerView("12D3KooWAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", state="available",
                      sw_version="0.1.0", hw_class="ab" * 32, bench=120.0, rtt_ms=2.5, rtt_by="ping",
                      last_seen=time.time()),
             PeerView("12D3KooWBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB", state="offline",
                      why_offline="leaving", bench=80.0, hw_class="cd" * 32)]
    history = History()
    history.add(1.0, 120.0, 0.0)
    history.add(2.0, 100.0, 20.0)
    snap = Snapshot(
        network="viewtest", crawled_at=time.time(), duration_s=1.5, peers=peers,
        jobs=[JobView("12D3KooWPUB", "00" * 16, 1, 0, 10, 4, 2, 1, "ee" * 32, 10, 0.0)],
        findings=[Finding("wrong_result", peers[1].peer_id, "12D3KooWPUB", "reported <b>x</b>")],
        discovered=2, sampled=False, sample_cap=256, history=history)
    return snap.to_json()


def test_terminal_view_shows_peers_totals_jobs_and_who_claims_what():
    from rich.console import Console

    from p2pfleet.explorer import views

    con = Console(width=200, record=True)
    con.print(views.render(_doc_with_everything()))
    text = con.export_text()
    assert "offline (leaving)" in text and "2.5 ms" in text and "6/10 (60 %)" in text
    assert "claim signed by publisher" in text and "wrong_result" in text
    assert "available (all)" in text and "120" in text


def test_web_routes_escape_refuse_and_document():
    from p2pfleet.explorer.web import OPENAPI, WebApp

    doc = _doc_with_everything()
    app = WebApp(lambda: doc)
    status, _ctype, body = app.handle("GET", "/evidence")
    assert status == 200 and b"<b>x</b>" not in body and b"&lt;b&gt;x&lt;/b&gt;" in body
    assert b"claim signed by publisher" in body
    assert app.handle("POST", "/api/peers")[0] == 405
    assert app.handle("GET", "/api/peers/nobody")[0] == 404
    assert app.handle("GET", "/peers/nobody")[0] == 404
    assert app.handle("GET", "/nothing")[0] == 404
    status, _ctype, body = app.handle("GET", "/api/history")
    assert status == 200 and json.loads(body)[1] == {"t": 2.0, "available": 100.0, "used": 20.0}
    assert b"<polyline" in app.handle("GET", "/")[2]
    waiting = WebApp(lambda: None)
    assert waiting.handle("GET", "/api/snapshot")[0] == 503
    assert waiting.handle("GET", "/openapi.json")[0] == 200
    for path in OPENAPI["paths"]:
        route = path.replace("{peer_id}", doc["peers"][0]["peer_id"])
        assert app.handle("GET", route)[0] == 200, path


def test_publisher_evidence_is_attributed_and_checked():
    from p2pfleet.explorer.evidence import EvidenceRefused, open_publisher_evidence
    from p2pfleet.identity import Identity
    from p2pfleet.wire.envelope import seal
    from p2pfleet.wire.kinds import Evidence, Receipt

    publisher, accused, other = (Identity.from_seed(s) for s in (b"pub", b"acc", b"oth"))
    now = int(time.time() * 1000)

    def proof(signer: Identity) -> bytes:
        return seal(Receipt(lease_id=bytes(16), job_id=bytes(16), shard=0,
                            worker=signer.public_key, output_digest=bytes(32), credit=1, at=now),
                    signer, "evtest")

    def report(signer_of_proof: Identity) -> bytes:
        return seal(Evidence(accused=accused.public_key, job_id=bytes(16),
                             claim="conflicting_results", proofs=(proof(signer_of_proof),),
                             expected_digest=None, at=now, note="two digests"), publisher, "evtest")

    finding = open_publisher_evidence("evtest", report(accused), now)
    assert finding.verified_by == publisher.peer_id and finding.accused == accused.peer_id
    assert "reported by publisher" in finding.detail
    with pytest.raises(EvidenceRefused, match="not signed by the accused"):
        open_publisher_evidence("evtest", report(other), now)
    with pytest.raises(EvidenceRefused, match="wrong-network"):
        open_publisher_evidence("othernet", report(accused), now)
