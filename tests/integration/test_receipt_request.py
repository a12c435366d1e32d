"""A worker that cannot be dialled asks the publisher for its receipts (issue 15, item 4).

Receipts of a quorum-2 shard are issued when the second result arrives, after the first
worker's report was answered; the publisher then pushes them on `notice`, which a worker
behind NAT never receives. Real meshes, a real publisher and job store, real onnxruntime.
"""

from __future__ import annotations

import os
from dataclasses import replace

import trio

from p2pfleet.net import streams
from p2pfleet.net.blobs import BlobService
from p2pfleet.publisher import Publisher
from p2pfleet.store.blobcache import BlobCache
from p2pfleet.store.ledger import Ledger
from p2pfleet.wire.envelope import open_envelope, seal
from p2pfleet.wire.kinds import ReceiptRequest
from p2pfleet.live.worker import Worker, WorkerSettings

from fleetkit import NETWORK, wait_until
from test_notices import now_ms, offer
from test_publisher import meshes, pub_settings, spec
from workerkit import TestWorker, was_reset


def receipt_request(worker: TestWorker, lease_ids=()) -> bytes:
    body = ReceiptRequest(req_id=os.urandom(16), exp=worker.now_ms() + 60_000,
                          lease_ids=tuple(lease_ids))
    return seal(body, worker.mesh.identity, NETWORK)


async def ask(worker: TestWorker, publisher: str, envelope: bytes) -> list | None:
    """Send a receipt_request; the opened receipts answered, or None if refused (reset)."""
    stream = await worker.mesh.open_stream(publisher, "report")
    await streams.write_envelope(stream, envelope)
    await stream.close_write()
    try:
        got = await streams.read_all_envelopes(stream, 2048, 64, 30)
    except streams.StreamError:
        return None
    if was_reset(stream):
        return None
    return [open_envelope(r, NETWORK, kinds={"receipt"}) for r in got]


async def test_a_worker_that_cannot_be_dialled_gets_its_receipts_by_asking(tmp_path):
    async with meshes(4) as (pm, nm, wm, sm):
        blobs = BlobService(pm, BlobCache(tmp_path / "pub-blobs", 64 * 1024 * 1024))
        blobs.install()
        natted = TestWorker(nm, BlobService(nm, BlobCache(tmp_path / "n", 64 * 1024 * 1024)))
        natted.blobs.install()  # no `notice` handler: pushes never reach it, as behind NAT
        other = TestWorker.start(wm, tmp_path / "w")
        stranger = TestWorker.start(sm, tmp_path / "s")
        pub = Publisher(pm.identity, pm, tmp_path / "jobs.sqlite", blobs,
                        # no refill during the test: the burst alone decides
                        settings=replace(pub_settings({nm.identity.public_key, wm.identity.public_key}),
                                         receipt_requests_per_minute=0.01))
        pid = pm.identity.peer_id
        async with trio.open_nursery() as nursery:
            await nursery.start(pub.run)
            # no re-check or audit draw: two agreeing results settle the shard
            job = pub.submit(spec(shard_size=120, quorum=2, recheck_rate=0.0, audit_rate=0.0))
            (lease,) = (await natted.request(pid, free_slots=1)).leases
            assert await natted.report(pid, await natted.compute(pid, lease)) == []  # not yet
            await other.work(pid)
            await wait_until(lambda: pub.store.receipts_for(nm.identity.public_key,
                                                            [lease.lease_id]), timeout=30)
            assert natted.receipts == []  # the push on `notice` could not reach it

            # a stranger asking for the natted worker's lease gets nothing
            assert await ask(stranger, pid, receipt_request(stranger, [lease.lease_id])) == []
            got = await ask(natted, pid, receipt_request(natted, [lease.lease_id]))
            assert got is not None and [r.body.lease_id for r in got] == [lease.lease_id]
            assert got[0].body.worker == nm.identity.public_key and got[0].signer == pm.identity.public_key
            # by lease id it is answered again (the worker did not keep it); over the
            # per-worker rate (bursts of 3) the stream is reset, without a penalty
            answers = [await ask(natted, pid, receipt_request(natted, [lease.lease_id]))
                       for _ in range(3)]
            assert answers[0] is not None and answers[-1] is None
            assert pm.reputation.penalty(nm.identity.peer_id, pm.clock()) == 0
            assert pub.status(job).state in ("live", "done")
            nursery.cancel_scope.cancel()
        pub.close()


async def test_our_worker_asks_for_a_receipt_whose_push_never_came(tmp_path):
    """The node's own work loop (p2pfleet/live/worker.py): a result acknowledged without a
    receipt, the publisher's `notice` push refused (as behind NAT): the node asks."""
    async with meshes(3) as (pm, nm, wm):
        blobs = BlobService(pm, BlobCache(tmp_path / "pub-blobs", 64 * 1024 * 1024))
        blobs.install()
        other = TestWorker.start(wm, tmp_path / "w")
        pub = Publisher(pm.identity, pm, tmp_path / "jobs.sqlite", blobs,
                        settings=pub_settings({nm.identity.public_key, wm.identity.public_key}))
        pid = pm.identity.peer_id
        ledger = Ledger(tmp_path / "ledger.sqlite")
        cache = BlobCache(tmp_path / "node-blobs", 64 * 1024 * 1024)
        node = Worker(nm.identity, WorkerSettings(network=NETWORK, receipt_ask_s=0.5), ledger,
                      cache, None, offer=offer)
        node_blobs = BlobService(nm, cache, authorize=node.authorize_blob)
        node_blobs.install()
        async with trio.open_nursery() as nursery:
            await nursery.start(pub.run)
            await nursery.start(node.run, nm, node_blobs, lambda: [])
            nm.set_handler("notice", streams.reset_quietly)  # no push gets through
            pub.submit(spec(shard_size=120, quorum=2, recheck_rate=0.0, audit_rate=0.0))
            # the node's lease and result, computed by the test kit under the node's key
            kit = TestWorker(nm, node_blobs)
            stream = await nm.open_stream(pid, "lease")
            await streams.write_envelope(stream, kit.work_request(1))
            await stream.close_write()
            batch = open_envelope(await streams.read_envelope(stream, 70_000, 30), NETWORK)
            ledger.add_leases(pm.identity.public_key, batch, now_ms())
            (lease,) = batch.body.leases
            result = open_envelope(await kit.compute(pid, lease), NETWORK)
            ledger.enqueue(pm.identity.public_key, lease.lease_id, "result", result.raw,
                           result.body.exp, now_ms(), output_digest=result.body.output_digest)
            await wait_until(lambda: ledger.pending() == 0, timeout=20)  # acknowledged
            await other.work(pid)  # the second replica: the shard is accepted, receipts issued
            await wait_until(lambda: pub.store.receipts_for(nm.identity.public_key,
                                                            [lease.lease_id]), timeout=30)
            await wait_until(lambda: ledger.receipt_rows(pm.identity.public_key), timeout=30)
            (row,) = ledger.receipt_rows(pm.identity.public_key)
            assert node.stats.receipts == 1
            nursery.cancel_scope.cancel()
        pub.close()
        ledger.close()
