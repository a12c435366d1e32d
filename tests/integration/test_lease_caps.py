"""The per-identity lease cap without a capacity record (issue 15, item 4).

The rule (work-and-leases.md, section 4): the publisher caps a worker's outstanding leases
by its trust (2 fresh, 16 established) and by the request's `free_slots`; a capacity
record's `slots` is the worker's own statement, which binds the worker, not the publisher
(anyone can publish a record with any `slots`). So a fresh worker with no record in the
DHT asking for many leases gets at most 2 outstanding. Real meshes, publisher and store.
"""

from __future__ import annotations

import trio

from p2pfleet.net.blobs import BlobService
from p2pfleet.publisher import Publisher
from p2pfleet.store.blobcache import BlobCache
from p2pfleet.wire.kinds import LeaseBatch, NoWork

from test_publisher import meshes, pub_settings, spec
from workerkit import TestWorker


async def test_a_fresh_worker_without_a_capacity_record_gets_at_most_two_leases(tmp_path):
    async with meshes(2) as (pm, wm):
        blobs = BlobService(pm, BlobCache(tmp_path / "pub-blobs", 64 * 1024 * 1024))
        blobs.install()
        greedy = TestWorker.start(wm, tmp_path / "w")
        pub = Publisher(pm.identity, pm, tmp_path / "jobs.sqlite", blobs, settings=pub_settings())
        pid = pm.identity.peer_id
        async with trio.open_nursery() as nursery:
            await nursery.start(pub.run)
            pub.submit(spec(shard_size=10))  # 12 shards
            assert await wm.get_capacity(wm.identity.peer_id) is None  # it published none
            first = await greedy.request(pid, free_slots=64)
            assert isinstance(first, LeaseBatch) and len(first.leases) == 2
            again = await greedy.request(pid, free_slots=64)
            assert isinstance(again, NoWork) and again.reason == "quota"
            nursery.cancel_scope.cancel()
        pub.close()
