"""Jobs always finish (issue 13, item 5), between real processes: three `p2pfleet node
start` workers, one computing with fp16 weights, and a `p2pfleet job serve` publisher on
loopback, running several jobs in a row.

Once the cheater is excluded, two honest nodes remain; a shard drawn for a re-check needs
three agreeing workers, so no remaining identity may take its last replica. Before the
stall rule such jobs never finished. Now, after `publishing.stall_wait_s`, the publisher
computes the missing replica itself: every job completes, every output equals a local
onnxruntime run, the cheater is excluded with signed evidence, and the shards the publisher
computed are marked in `job status` and in the store.
"""

from __future__ import annotations

import json
import signal
import subprocess

import numpy as np
import pytest
from pubkit import pub_args, try_attach

pytestmark = pytest.mark.system

NETWORK = "jfinish"
PUBLISHING = {"publishing.request_interval_s": "0.2", "publishing.min_lease_s": "20",
              "publishing.cross_class_wait_s": "1", "publishing.announce_interval_s": "2",
              "publishing.stall_wait_s": "2"}
JOBS = 3


def _pub_args(pub_root, *extra: str) -> list[str]:
    return pub_args(pub_root, NETWORK, PUBLISHING, *extra)


def test_three_nodes_one_excluded_cheater_every_job_finishes(tmp_path):
    import onnxruntime as ort

    from p2pfleet.identity import key_from_peer_id
    from p2pfleet.live.localfleet import LocalFleet, wait_for
    from p2pfleet.sdk.client import open_offline
    from p2pfleet.zoo import digits

    model, name, inputs = digits()
    X = inputs(300)
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    local = dict(zip(names, sess.run(names, {name: X})))

    fleet = LocalFleet(tmp_path / "fleet", 3, network=NETWORK, settings={
        "publishers.serve_anyone": "true", "publishers.retry_base_s": "1",
        "policy.max_threads": "1"})
    fleet.nodes[2].args = ("--cheat", "fp16")
    fleet.start()
    honest = fleet.nodes[:2]
    pub_root = tmp_path / "pub"
    serve = subprocess.Popen(
        _pub_args(pub_root, "job", "serve", "--listen", "/ip4/127.0.95.1/tcp/0",
                  "--bootstrap", fleet.nodes[0].addr,
                  *[a for n in honest for a in ("--trust", n.peer_id)]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client = wait_for(lambda: try_attach(pub_root / "publisher"), 60,
                          "the publisher to serve")
        # Jobs in a row; half of the shards are drawn for a re-check: each needs three
        # agreeing workers, which two honest nodes cannot give.
        job_ids = []
        for k in range(JOBS):
            job_id = client.submit(model, X, shard_size=50, micro_batch=10, quorum=2,
                                   recheck_rate=0.5)
            done = client.wait(job_id, timeout=240)
            assert done["state"] == "done", (k, done)
            assert done["accepted"] == done["shards"] == 6 and done["failed"] == 0, (k, done)
            job_ids.append(job_id)
        views = client.status()
        line = subprocess.run(_pub_args(pub_root, "job", "status"), capture_output=True,
                              text=True, timeout=60)
        assert line.returncode == 0, line.stderr
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(30)
        for node in fleet.nodes:
            node.stop()

    # What the user sees: shards the publisher computed itself are counted per job.
    self_computed = sum(v["self_computed"] for v in views)
    assert self_computed >= 1, views
    assert "computed by the publisher" in line.stdout
    cheater = key_from_peer_id(fleet.nodes[2].peer_id)
    with open_offline(pub_root / "publisher") as pub:
        shards, leases = [], {}
        for job_id in job_ids:
            jid = bytes.fromhex(job_id)
            got = pub.outputs(jid)
            for out_name, want in local.items():
                assert np.array_equal(got[out_name], want), (job_id, out_name)
            # an ended job's records are in the store (the publisher holds live jobs only)
            _jobs, its_shards, its_leases, _trust = pub.store.load_records(job_id=jid)
            assert len(its_shards) == 6
            shards += its_shards
            leases.update((l.lease_id, l) for l in its_leases)
        assert all(leases[sh.accepted_lease].worker != cheater for sh in shards)
        evidence = [(w, claim) for j in job_ids for w, claim, _env in pub.store.evidence(
            bytes.fromhex(j))]
        assert evidence and all(w == cheater for w, _c in evidence)
        marked = [sh for sh in shards if sh.fallback]
        assert len(marked) == self_computed
        own = pub.identity.public_key
        for sh in marked:  # the publisher's own result is in the quorum, never paid
            assert sh.fallback == "publisher"
            mine = [l for l in leases.values()
                    if (l.job_id, l.shard, l.worker) == (sh.job_id, sh.index, own)]
            assert any(l.verdict == "valid" for l in mine), sh
            assert not any(l.paid for l in mine), sh
        assert json.loads(json.dumps(views))  # plain data for --json
