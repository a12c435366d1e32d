"""Real py-libp2p hosts on loopback: DHT records, job gossip, and what a bad peer costs."""

from __future__ import annotations

import time

import pytest
import trio

from p2pfleet.identity import Identity
import msgpack

from p2pfleet.wire.envelope import pack_envelope, seal, signed_bytes
from p2pfleet.wire.kinds import Capacity, JobAnnouncement, Requirements

from fleetkit import NETWORK, fleet, wait_until


def now_ms() -> int:
    return int(time.time() * 1000)


def capacity(seq: int, **over) -> Capacity:
    fields = dict(seq=seq, exp=now_ms() + 600_000, sw_version="0.1.0", state="available",
                  hw_class=b"\x07" * 32, cores=2, memory_mb=1024, bench=50.0,
                  providers=("CPUExecutionProvider",), ort_version="1.32.0", slots=1, addrs=())
    fields.update(over)
    return Capacity(**fields)


def announcement(publisher: Identity, seq: int = 1) -> bytes:
    body = JobAnnouncement(
        seq=seq, exp=now_ms() + 600_000, job_id=bytes(16), model_digest=b"m" * 32,
        model_size=1234, requirements=Requirements(min_memory_mb=256, providers=(),
                                                   min_sw_version="0.1.0", ort_versions=">=1.19"),
        credit_rate=1, quorum=2, shards_total=10, shards_left=10, addrs=())
    return seal(body, publisher, NETWORK)


async def test_capacity_record_is_found_from_every_node():
    async with fleet(5) as meshes:
        owner = meshes[2]
        await owner.put_capacity(seal(capacity(now_ms()), owner.identity, NETWORK))
        for mesh in meshes:
            opened = await mesh.get_capacity(owner.identity.peer_id)
            assert opened is not None and opened.signer == owner.identity.public_key


async def test_forged_stale_and_oversized_records_are_refused():
    async with fleet(3) as meshes:
        a, b, c = meshes
        key = a.names.node_key(a.identity.peer_id)
        newer = seal(capacity(2000), a.identity, NETWORK)
        await a.put_capacity(newer)
        # b signs a record under a's key: refused by every validator
        forged = seal(capacity(3000), b.identity, NETWORK)
        with pytest.raises(Exception, match="not the peer the key names"):
            await c.dht.put_value(key, forged)
        # an older sequence loses against the stored one
        stale = seal(capacity(1000), a.identity, NETWORK)
        assert c.record_validator.select(key, [newer, stale]) == 0
        # an expired record is refused
        expired = seal(capacity(4000, exp=now_ms() - 60_000), a.identity, NETWORK)
        with pytest.raises(Exception, match="expired"):
            await c.dht.put_value(key, expired)
        body = msgpack.packb({"pad": b"x" * 3000})
        big = pack_envelope(NETWORK, "capacity", 1, a.identity.public_key, body,
                            a.identity.sign(signed_bytes(NETWORK, "capacity", 1, body)))
        with pytest.raises(Exception, match="oversized"):
            await c.dht.put_value(key, big)
        got = await c.get_capacity(a.identity.peer_id)
        assert got is not None and got.body.seq == 2000


async def test_announcement_reaches_every_node():
    async with fleet(6) as meshes:
        publisher = Identity.from_seed(b"publisher")
        await wait_until(lambda: all(len(m.connected_peers()) >= 1 for m in meshes))
        await trio.sleep(1.5)  # a few heartbeats so the gossip mesh forms
        await meshes[3].announce_job(announcement(publisher))
        for mesh in meshes:
            if mesh is meshes[3]:
                continue
            with trio.fail_after(10):
                opened = await mesh.jobs.receive()
            assert opened.signer == publisher.public_key and opened.body.quorum == 2


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


async def test_mdns_finds_a_lan_peer_without_bootstrap():
    """Opt-in mDNS: two nodes on the LAN connect with no bootstrap address given."""
    from p2pfleet.net.mesh import Mesh

    from fleetkit import settings

    async with trio.open_nursery() as nursery:
        a = Mesh(Identity.from_seed(b"mdns a"),
                 settings(0, mdns=True, listen=(f"/ip4/0.0.0.0/tcp/{free_port()}",)))
        b = Mesh(Identity.from_seed(b"mdns b"),
                 settings(1, mdns=True, listen=(f"/ip4/0.0.0.0/tcp/{free_port()}",)))
        await nursery.start(a.run)
        await nursery.start(b.run)
        await wait_until(lambda: a.connected_peers() and b.connected_peers(), timeout=20)
        assert b.identity.peer_id in a.connected_peers()
        nursery.cancel_scope.cancel()


async def test_unknown_kinds_on_the_jobs_topic_are_dropped_unpunished_and_not_forwarded():
    from p2pfleet.wire.envelope import pack_envelope, signed_bytes

    publisher = Identity.from_seed(b"publisher from the future")
    body = msgpack.packb({"anything": 1})
    future = pack_envelope(NETWORK, "job", 2, publisher.public_key, body,
                           publisher.sign(signed_bytes(NETWORK, "job", 2, body)))
    async with fleet(3, dht_refresh_s=0) as meshes:  # no table fill: it would connect them
        hub, sender, far = meshes  # sender and far are connected only through hub
        await wait_until(lambda: len(hub.connected_peers()) == 2)
        await trio.sleep(1.5)  # gossip mesh forms
        # the sender's own validator would stop it at the source: an old-version sender
        # would not, so publish past it
        sender.pubsub.remove_topic_validator(sender.names.topic("jobs"))
        await sender.pubsub.publish(sender.names.topic("jobs"), future)
        sender.pubsub.set_topic_validator(sender.names.topic("jobs"), sender._validate_job, False)
        await sender.announce_job(announcement(publisher))
        with trio.fail_after(10):
            got = await far.jobs.receive()
        assert got.version == 1 and got.kind == "job"  # the valid one, not the v2 one
        assert hub.reputation.penalty(sender.identity.peer_id, time.time()) == 0
        assert hub.stats.rejected_messages == 0
        assert hub.stats.ignored_messages == 1  # seen and dropped at the hub,
        assert far.stats.ignored_messages == 0  # so never forwarded to far
        with pytest.raises(trio.WouldBlock):
            far.jobs.receive_nowait()
