"""What a job announcement tells a worker written from the specs alone (issue 15, item 4).

A real publisher on a real mesh; the announcement is read as another node reads it.
"""

from __future__ import annotations

from dataclasses import replace

import trio

from p2pfleet.core import scheduler as S
from p2pfleet.net.blobs import BlobService
from p2pfleet.publisher import Publisher
from p2pfleet.store.blobcache import BlobCache
from p2pfleet.wire.envelope import open_envelope

from fleetkit import NETWORK
from test_publisher import meshes, pub_settings, spec


async def announced_quorum(tmp_path, quorum: int, min_replicas: int) -> int:
    async with meshes(1) as (pm,):
        blobs = BlobService(pm, BlobCache(tmp_path / f"blobs-{quorum}-{min_replicas}", 1 << 26))
        base = pub_settings()
        pub = Publisher(pm.identity, pm, tmp_path / f"jobs-{quorum}-{min_replicas}.sqlite", blobs,
                        settings=replace(base, scheduler=replace(base.scheduler,
                                                                 min_replicas=min_replicas)))
        async with trio.open_nursery() as nursery:
            await nursery.start(pub.run)
            job = pub.submit(spec(quorum=quorum))
            opened = open_envelope(pub.announcement(job), NETWORK, kinds={"job"})
            nursery.cancel_scope.cancel()
        pub.close()
        return opened.body.quorum


async def test_a_quorum_one_job_announces_the_two_agreeing_results_it_needs(tmp_path):
    # untrusted work is replicated: a quorum-1 job needs two agreeing results (only a worker
    # drawn for a single copy, which it is never told, has its result accepted alone)
    assert S.SchedulerSettings().min_replicas == 2
    assert await announced_quorum(tmp_path, quorum=1, min_replicas=2) == 2
    assert await announced_quorum(tmp_path, quorum=3, min_replicas=2) == 3
    # a publisher that does not replicate announces the job's own quorum
    assert await announced_quorum(tmp_path, quorum=1, min_replicas=1) == 1


async def test_gossip_signing_and_message_ids_are_what_the_specs_say():
    """reachability-and-discovery.md, section 7: StrictSign, id = from + seqno (an 8-byte
    big-endian counter), seen 120 s."""
    from libp2p.pubsub.pb import rpc_pb2

    from fleetkit import fleet

    async with fleet(1) as (mesh,):
        pubsub = mesh.pubsub
        assert pubsub.strict_signing and pubsub.sign_key is not None
        assert pubsub.seen_messages.ttl == 120
        msg = rpc_pb2.Message(from_id=b"peer", seqno=(7).to_bytes(8, "big"), data=b"x")
        assert pubsub._msg_id_constructor(msg) == b"peer" + (7).to_bytes(8, "big")
        seqno = pubsub._next_seqno()
        assert len(seqno) == 8 and pubsub._next_seqno() == (int.from_bytes(seqno, "big") + 1
                                                              ).to_bytes(8, "big")
