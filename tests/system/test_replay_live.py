"""A live run replayed: real `p2pfleet node start` processes (one cheating with fp16 weights,
one stopped by its owner mid-job: the policy's stop, as when unplugged) and a real
`p2pfleet job submit` publisher, killed with SIGKILL mid-job and resumed, all with event
logs on; `p2pfleet sim replay` on the publisher's log and the nodes' logs takes
every decision the live machines took (exit 0), its totals are the publisher's report, and
each node's replayed receipt decisions sum to the credit in its ledger.

The job keeps the default re-check and audit rates: the draws must replay too (the log holds
the scheduler's key), so nothing here asserts a count that depends on them, only that the
replay and the live publisher agree.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import numpy as np
import pytest
from pubkit import cli, pub_args

pytestmark = pytest.mark.system

NETWORK = "replaylive"
PUBLISHING = {"publishing.request_interval_s": "0.2", "publishing.min_lease_s": "20",
              "publishing.cross_class_wait_s": "1", "publishing.announce_interval_s": "2"}


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _accepted_in_store(pub_root) -> int:
    import sqlite3

    path = pub_root / "publisher" / "jobs.sqlite"
    if not path.exists():
        return 0
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
        return db.execute("select count(*) from shards where status='accepted'").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_a_live_run_with_a_cheater_and_a_publisher_kill_replays_to_the_same_decisions(tmp_path):
    from p2pfleet.identity import key_from_peer_id
    from p2pfleet.live.localfleet import LocalFleet, wait_for
    from p2pfleet.zoo import digits

    model, _name, inputs = digits()
    (tmp_path / "model.onnx").write_bytes(model)
    np.save(tmp_path / "inputs.npy", inputs(1200))
    fleet = LocalFleet(tmp_path / "fleet", 5, network=NETWORK, settings={
        "publishers.serve_anyone": "true", "publishers.retry_base_s": "1",
        "policy.max_threads": "1", "node.event_log": "true"})
    fleet.nodes[4].args = ("--cheat", "fp16")
    fleet.start()
    pub_root, log = tmp_path / "pub", tmp_path / "publisher-events.jsonl"
    listen = f"/ip4/127.0.98.1/tcp/{_free_port('127.0.98.1')}"  # the same after the restart
    net = ["--listen", listen, "--bootstrap", fleet.nodes[0].addr, "--event-log", str(log),
           *[a for n in fleet.nodes[:3] for a in ("--trust", n.peer_id)]]
    try:
        submit = pub_args(pub_root, NETWORK, PUBLISHING, "job", "submit",
                          str(tmp_path / "model.onnx"), str(tmp_path / "inputs.npy"), "--json",
                          "--shard-size", "50", "--micro-batch", "10", "--quorum", "2", *net)
        proc = subprocess.Popen(submit, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wait_for(lambda: _accepted_in_store(pub_root) >= 3, 120,
                 "the publisher to accept a few shards", interval=0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        # the owner of node 3 stops it (the policy's stop, the path of unplugging): a lease it
        # holds is handed back to the restarted publisher, which restored it from its store
        fleet.nodes[3].ask("pause")
        status = subprocess.run(pub_args(pub_root, NETWORK, PUBLISHING, "job", "status",
                                         "--json"), capture_output=True, text=True, timeout=60)
        job_id = json.loads(status.stdout)["jobs"][0]["job_id"]
        resume = subprocess.run(pub_args(pub_root, NETWORK, PUBLISHING, "job", "resume", job_id,
                                         "--json", "--timeout", "150", *net),
                                capture_output=True, text=True, timeout=200)
        assert resume.returncode == 0, resume.stderr[-3000:]
        report = json.loads(resume.stdout)["report"]
        assert report["state"] == "done" and report["accepted"] == report["shards"] == 24
        cheater = fleet.nodes[4].peer_id
        assert [e["accused"] for e in report["evidence"]] == [cheater]
    finally:
        fleet.stop()  # the nodes' logs are complete once they have stopped

    node_logs = [n.data_dir / "logs" / name for n in fleet.nodes
                 for name in ("events.jsonl", "credit-events.jsonl")]
    assert all(p.exists() for p in node_logs)
    replay = subprocess.run(cli("sim", "replay", "--json", str(log), *map(str, node_logs)),
                            capture_output=True, text=True, timeout=300)
    assert replay.returncode == 0, (replay.stdout[-3000:], replay.stderr[-3000:])
    out = json.loads(replay.stdout)
    assert out["identical"] and out["divergence"] is None
    # two publisher starts (the second restored from the store) and every node's start
    assert out["segments"] >= 2 + len(fleet.nodes)
    counts = out["jobs"][job_id]
    assert (counts["accepted"], counts["failed"], counts["leases"], counts["invalid"],
            counts["paid"]) == (report["accepted"], report["failed"], report["replicas"],
                                report["rejected"], report["credit_paid"])
    assert out["excluded"] == [key_from_peer_id(cheater).hex()]
    assert out["totals"]["exclusions"] >= 1 and out["totals"]["leases"] >= report["replicas"]
    assert out["totals"]["compute_starts"] >= len(fleet.nodes)  # the nodes' policy decisions
    node3 = out["per_log"][str(fleet.nodes[3].data_dir / "logs" / "events.jsonl")]
    assert node3["compute_stops"] >= 1 and node3["mesh_leaves"] >= 1
    # each node's replayed receipt decisions add up to the credit its ledger holds
    for node in fleet.nodes:
        led = subprocess.run(cli("--data-dir", str(node.data_dir), "ledger", "--json"),
                             capture_output=True, text=True, timeout=60)
        assert led.returncode == 0, led.stderr
        paid = sum(p["credit"]["paid"] for p in json.loads(led.stdout)["publishers"])
        got = out["per_log"].get(str(node.data_dir / "logs" / "credit-events.jsonl"), {})
        assert got.get("credit_received", 0) == paid, node.index
        assert paid == 0 or node.index != 4  # the cheater was never paid
