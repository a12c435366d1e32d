"""Shard inputs the publisher's blob cache lost, on real libp2p hosts with a real publisher,
its SQLite job store and its blob cache (specs/work-and-leases.md, section 9, "The cache").

Nothing in the cache is fsynced, so a power loss may zero a blob file whose index row
survived; the cache hashes a file before it first serves it and drops a damaged one. The
job store holds every input, so the publisher must store a lost input again and serve it:
the worker fetches the right bytes and computes the shard, rather than the shard stalling
until the publisher computes it itself. Only the holder of a live lease of an input may
make the publisher store it again."""

from __future__ import annotations

import hashlib

import trio

from p2pfleet.net.blobs import BlobError, BlobService
from p2pfleet.publisher import Publisher
from p2pfleet.store.blobcache import BlobCache
from p2pfleet.wire.kinds import LeaseBatch

from fleetkit import hosts
from test_publisher import assert_matches_local, finish, keep_working, pub_settings, spec
from workerkit import TestWorker

CACHE_BYTES = 64 * 1024 * 1024


async def test_inputs_a_power_loss_zeroed_are_stored_again_and_served(tmp_path):
    async with hosts(["127.0.0.1", "127.0.1.1"], "damaged-itest") as (pm, wm):
        settings = pub_settings({wm.identity.public_key}, min_replicas=1, stall_wait_ms=2_000)
        store, cache_dir = tmp_path / "jobs.sqlite", tmp_path / "pub-blobs"
        blobs = BlobService(pm, BlobCache(cache_dir, CACHE_BYTES))
        pub = Publisher(pm.identity, pm, store, blobs, settings=settings)
        job = pub.submit(spec(quorum=1, recheck_rate=0.0, audit_rate=0.0))  # 4 shards
        inputs = [d for d, _ka in pub._shards[job]]
        model = bytes.fromhex(pub._meta[job]["model_digest"])
        pub.close()
        blobs.cache.close()
        for d in [model, *inputs]:  # a power loss: index rows and names kept, data zeroed
            path = cache_dir / "blobs" / d.hex()
            path.write_bytes(bytes(path.stat().st_size))

        blobs = BlobService(pm, BlobCache(cache_dir, CACHE_BYTES))  # the publisher restarts
        blobs.install()
        pub = Publisher(pm.identity, pm, store, blobs, settings=settings)
        worker = TestWorker.start(wm, tmp_path / "w")
        async with trio.open_nursery() as nursery:
            await nursery.start(pub.run)
            done = lambda: pub.status(job).state != "live"  # noqa: E731
            nursery.start_soon(keep_working, worker, pm.identity.peer_id, done)
            st = await finish(pub, job, [worker], timeout=30)
            nursery.cancel_scope.cancel()
        # every shard served to the worker and computed by it, none by the publisher
        assert (st.accepted, st.self_computed) == (4, 0), st
        for i in range(4):
            sh = pub.sched.shards[(job, i)]
            assert sh.fallback == ""
            assert pub.sched.leases[sh.accepted_lease].worker == wm.identity.public_key
        assert_matches_local(pub.outputs(job))
        for d in inputs:  # the cache holds the right bytes again, kept for later leases
            assert hashlib.sha256(blobs.cache.get(d)).digest() == d
            assert blobs.cache.info(d).pins >= 1 and not blobs.cache.is_public(d)
        pub.close()


async def test_a_lost_input_is_stored_again_for_its_leaseholder_only(tmp_path):
    """A file gone while the publisher runs: a stranger asking for it (no lease, a forged
    token) gets nothing and makes the publisher store nothing; the leaseholder gets it."""
    async with hosts(["127.0.0.1", "127.0.1.1", "127.0.2.1"], "lost-itest") as (pm, wm, sm):
        blobs = BlobService(pm, BlobCache(tmp_path / "pub-blobs", CACHE_BYTES))
        blobs.install()
        pub = Publisher(pm.identity, pm, tmp_path / "jobs.sqlite", blobs,
                        settings=pub_settings({wm.identity.public_key}))
        worker = TestWorker.start(wm, tmp_path / "w")
        stranger = TestWorker.start(sm, tmp_path / "s")
        pid = pm.identity.peer_id
        async with trio.open_nursery() as nursery:
            await nursery.start(pub.run)
            job = pub.submit(spec(quorum=1, recheck_rate=0.0, audit_rate=0.0))
            answer = await worker.request(pid, job_id=job)
            assert isinstance(answer, LeaseBatch)
            lease = answer.leases[0]
            d = lease.input_digest
            path = tmp_path / "pub-blobs" / "blobs" / d.hex()
            path.unlink()  # lost while the publisher runs
            for token in (None, lease.token):  # the token is bound to the worker's peer id
                try:
                    await stranger.blobs.fetch(d, lease.input_size, [pid], token=token,
                                               timeout=5)
                    raise AssertionError("a stranger was served a private input")
                except BlobError:
                    pass
            assert not path.exists()  # nothing was stored again for the stranger
            data = await worker.blobs.fetch(d, lease.input_size, [pid], token=lease.token,
                                            timeout=10)
            assert hashlib.sha256(data).digest() == d == hashlib.sha256(
                pub.store.get_blob(d)).digest()
            assert path.exists() and not blobs.cache.is_public(d)
            nursery.cancel_scope.cancel()
        pub.close()
