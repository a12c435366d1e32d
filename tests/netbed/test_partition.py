"""A 60 s partition splits a fleet mid-job and heals: real `p2pfleet node start` processes
and a `p2pfleet job submit` publisher in the bed, the cut an nftables drop rule on the
switch (netbed/partition.py), starting once a few shards are accepted. Side A: the
publisher and two nodes; side B: two nodes. After the heal:

- the job completes, every shard accepted and every output equal to a local run (no shard
  lost);
- no shard accepted twice, and more valid (paid) results than a shard asked for only where
  a replica was reissued after a far-side lease expired (its late result, if it agrees,
  is used and paid: work-and-leases.md, "Expiry and reissue");
- credit paid once per valid result: the publisher's receipts are exactly its paid leases,
  its job total their sum, and no node's ledger holds a lease twice or a credit the
  publisher did not pay;
- DHT records converge: every node finds every other node's capacity record.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from pathlib import Path

import numpy as np

from netbed.jobs import accepted_in_store, start_fleet, submit
from netbed.partition import partition
from p2pfleet.live.localfleet import wait_for

PARTITION_S = 60  # the rule's length: part of the test's design, held by the bed


def test_a_60s_partition_heals_without_lost_or_doubly_accepted_shards(new_bed, tmp_path,
                                                                       digits_job):
    model, inputs, local = digits_job
    X = np.concatenate([np.load(inputs)] * 3)  # 1200 rows: 24 shards, long enough to cut
    np.save(tmp_path / "x.npy", X)
    want = {name: np.concatenate([v] * 3) for name, v in local.items()}
    with new_bed() as bed:
        pub = bed.public("publisher")
        hosts = [bed.public(f"n{i}") for i in range(4)]
        nodes = start_fleet(hosts, tmp_path)
        pub_root, out = tmp_path / "pub", tmp_path / "out"
        proc = submit(pub, pub_root, model, tmp_path / "x.npy", out, nodes[0].addr,
                      "--shard-size", "50", "--micro-batch", "10", "--quorum", "2",
                      "--timeout", "400", *[a for n in nodes for a in ("--trust", n.peer_id)])
        wait_for(lambda: accepted_in_store(pub_root) >= 2 or proc.poll() is not None, 180,
                 "the publisher to accept a few shards", interval=0.05)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        with partition(bed, [pub, hosts[0], hosts[1]], [hosts[2], hosts[3]]) as cut:
            before = accepted_in_store(pub_root)
            # side A goes on working while B cannot reach the publisher
            wait_for(lambda: accepted_in_store(pub_root) > before or proc.poll() is not None,
                     PARTITION_S, "the publisher's side to go on accepting during the cut")
            wait_for(lambda: cut.elapsed() >= PARTITION_S, PARTITION_S + 5,
                     "the partition's length")
        assert cut.elapsed() >= PARTITION_S
        stdout, stderr = proc.communicate(timeout=420)
        assert proc.returncode == 0, stderr[-3000:]
        report = json.loads(stdout)["report"]
        assert report["state"] == "done" and report["accepted"] == report["shards"] == 24
        assert report["failed"] == 0
        for name, w in want.items():
            assert np.array_equal(np.load(out / f"{name}.npy"), w), name

        paid_by_worker = _assert_store(pub_root, report["job_id"])

        # records converge: every node finds every other node's capacity record
        def all_found() -> bool:
            # a lookup slower than the control socket's reply limit counts as not found yet
            return all((a.try_ask("lookup", peer_id=b.peer_id) or {}).get("found")
                       for a in nodes for b in nodes if a is not b)
        wait_for(all_found, 120, "every node to find every capacity record after the heal",
                 interval=1)

        from p2pfleet.identity import key_from_peer_id
        for node in nodes:
            ledger = _ledger_receipts(node.data_dir)
            leases = [lease for lease, _c in ledger]
            assert len(leases) == len(set(leases)), f"node {node.index}: a receipt twice"
            paid = paid_by_worker.get(key_from_peer_id(node.peer_id), {})
            for lease, credit in ledger:
                assert paid.get(lease) == credit, f"node {node.index}: credit not paid"
        assert all(n.stop() == 0 for n in nodes)


def _assert_store(pub_root: Path, job_id: str) -> dict[bytes, dict[bytes, int]]:
    """Checks the publisher's store; returns {worker: {lease: credit}} of paid leases."""
    db = sqlite3.connect(pub_root / "publisher" / "jobs.sqlite")
    jid = bytes.fromhex(job_id)
    shards = db.execute("select idx, status, accepted_lease, target from shards where job_id=?",
                        (jid,)).fetchall()
    assert len(shards) == 24 and all(s == "accepted" and lease for _i, s, lease, _t in shards)
    accepted = [lease for _i, _s, lease, _t in shards]
    assert len(set(accepted)) == len(accepted), "one lease accepted for two shards"
    leases = db.execute("select lease_id, shard, worker, credit, verdict, paid from leases "
                        "where job_id=?", (jid,)).fetchall()
    valid = Counter(shard for _l, shard, _w, _c, verdict, _p in leases if verdict == "valid")
    issued = Counter(shard for _l, shard, _w, _c, _v, _p in leases)
    targets = {i: t for i, _s, _l, t in shards}
    # More valid results than the target only where a replica was reissued: a lease of the
    # far side expired during the cut and its late result still agreed, which is used and
    # paid (work-and-leases.md, "Expiry and reissue"); never more than the leases issued.
    over = {i: (n, targets[i], issued[i]) for i, n in valid.items()
            if n > targets[i] and issued[i] <= targets[i]}
    assert not over, f"shards with more valid results than leases beyond the target: {over}"
    paid = [(lease, w, c) for lease, _s, w, c, verdict, p in leases if p]
    assert all(verdict == "valid" for *_x, verdict, p in leases if p)
    receipts = Counter(lease for (lease,) in db.execute(
        "select r.lease_id from receipts r join leases l using (lease_id) where l.job_id=?",
        (jid,)))
    assert set(receipts) == {lease for lease, _w, _c in paid}
    assert max(receipts.values()) == 1
    (total,) = db.execute("select paid from jobs where job_id=?", (jid,)).fetchone()
    assert total == sum(c for _l, _w, c in paid)
    by_worker: dict[bytes, dict[bytes, int]] = {}
    for lease, worker, credit in paid:
        by_worker.setdefault(worker, {})[lease] = credit
    return by_worker


def _ledger_receipts(data_dir: Path) -> list[tuple[bytes, int]]:
    db = sqlite3.connect(data_dir / "ledger.sqlite")
    return db.execute("select lease_id, credit from receipts").fetchall()
