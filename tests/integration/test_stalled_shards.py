"""Stalled shards on real libp2p hosts (work-and-leases.md, section 4, "Stalled shards"): two
workers, and every shard drawn for a re-check, so each needs three agreeing workers and no
asking worker may take its third replica. After the stall wait the publisher computes it
itself (real onnxruntime, its own key, never paid); the job finishes, equal to a local run,
and the shards are marked; a restarted publisher still knows which."""

from __future__ import annotations

from dataclasses import replace

import trio

from p2pfleet.net.blobs import BlobService
from p2pfleet.publisher import Publisher
from p2pfleet.store.blobcache import BlobCache

from fleetkit import hosts
from test_publisher import assert_matches_local, finish, keep_working, pub_settings, spec
from workerkit import TestWorker


async def test_two_workers_a_job_needing_three_finishes_with_the_publisher_computing(tmp_path):
    async with hosts([f"127.0.{i}.1" for i in range(3)], "stall-itest") as (pm, *wm):
        blobs = BlobService(pm, BlobCache(tmp_path / "pub-blobs", 64 * 1024 * 1024))
        blobs.install()
        workers = [TestWorker.start(m, tmp_path / f"w{i}") for i, m in enumerate(wm)]
        trusted = {m.identity.public_key for m in wm}
        settings = pub_settings(trusted, stall_wait_ms=500)
        pub = Publisher(pm.identity, pm, tmp_path / "jobs.sqlite", blobs, settings=settings)
        async with trio.open_nursery() as nursery:
            await nursery.start(pub.run)
            job = pub.submit(spec(recheck_rate=1.0, audit_rate=0.0))
            done = lambda: pub.status(job).state != "live"  # noqa: E731
            for w in workers:
                nursery.start_soon(keep_working, w, pm.identity.peer_id, done)
            st = await finish(pub, job, workers, timeout=60)
            assert (st.shards, st.accepted, st.failed) == (4, 4, 0)
            assert st.self_computed == 4 and st.relaxed == 0
            assert_matches_local(pub.outputs(job))
            own = pm.identity.public_key
            for i in range(4):
                sh = pub.sched.shards[(job, i)]
                assert sh.fallback == "publisher"
                mine = [l for l in pub.sched.shard_leases(job, i) if l.worker == own]
                assert len(mine) == 1 and mine[0].verdict == "valid" and not mine[0].paid
            # both workers were paid for every shard (8 valid results), the publisher never
            assert st.credit_paid == 8 * 31
            nursery.cancel_scope.cancel()
        pub.close()
        again = Publisher(pm.identity, pm, tmp_path / "jobs.sqlite", None,
                          settings=replace(settings, self_audit=True))
        try:
            assert again.status(job).self_computed == 4
            assert all(sh.fallback == "publisher" for sh in again.shard_records(job))
        finally:
            again.close()

