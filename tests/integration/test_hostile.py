"""Hostile peers against a real fleet: malformed RPCs, forged records, floods, half-open
sockets, Sybils and churn (the issue "Mesh": hardening and bad input).

Each test ends the same way: an honest peer connects, reads a DHT record and receives a
job announcement (`assert_still_serving`). Attackers are raw py-libp2p hosts (or meshes
with their checks removed) that dial from their own loopback addresses (127.0.0.x is a
distinct source for the per-IP limits of fix 8).
"""

from __future__ import annotations

import os
import random
import time
from contextlib import asynccontextmanager

import msgpack
import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.utils.varint import encode_uvarint

from p2pfleet.identity import Identity
from p2pfleet.net import libp2p_fixes
from p2pfleet.net.gossip import MAX_GOSSIP_RPC
from p2pfleet.net.mesh import Mesh, _close_swarm
from p2pfleet.wire.envelope import pack_envelope, seal, signed_bytes
from test_libp2p_fixes import assert_still_serving
from test_mesh import announcement, capacity, now_ms

from fleetkit import NETWORK, fleet, settings, wait_until

GOSSIP = TProtocol("/meshsub/1.1.0")
IDENTIFY_PUSH = TProtocol(libp2p_fixes.IDENTIFY_PUSH)
PING = TProtocol("/ipfs/ping/1.0.0")


# --- attackers ------------------------------------------------------------------------------

@asynccontextmanager
async def attacker(seed: bytes):
    """A raw py-libp2p host (no DHT, no gossip, none of our checks). It closes its sockets
    on leaving (fix 6's helper): a host that vanished without closing would leave the
    victim's lookups waiting out their per-query timeout on a dead connection."""
    host = new_host(key_pair=create_new_key_pair(seed.ljust(32, b"\0")[:32]))
    async with host.run([]):
        try:
            yield host
        finally:
            await _close_swarm(host)


async def dial(host, mesh: Mesh, source_ip: str | None = None):
    """Connect `host` to `mesh`, from `source_ip` if given (one address, no happy-eyeballs
    delay: the upstream dial waits 250 ms even when the first address answers)."""
    info = info_from_p2p_addr(multiaddr.Multiaddr(mesh.listen_addrs()[0]))
    source = (source_ip, 0) if source_ip else None
    with trio.fail_after(10):
        return await host.get_network().dial_addr(info.addrs[0], info.peer_id, source=source)


def frame(body: bytes) -> bytes:
    return encode_uvarint(len(body)) + body


def put_value(key: str, value: bytes) -> bytes:
    msg = Message(type=Message.MessageType.PUT_VALUE, key=key.encode())
    msg.record.key = key.encode()
    msg.record.value = value
    return frame(msg.SerializeToString())


async def send(host, mesh: Mesh, protocol: str, data: bytes, *, close: bool = False) -> bool:
    """Write `data` on a new stream; False if the victim refused the stream."""
    try:
        stream = await host.new_stream(mesh.host.get_id(), [TProtocol(protocol)])
    except Exception:  # e.g. the victim closed the connection
        return False
    try:
        await stream.write(data)
        if close:
            await stream.close()
    except Exception:  # the victim may reset the stream before we are done: fine
        pass
    return True


def penalty(mesh: Mesh, peer) -> float:
    return mesh.reputation.penalty(str(peer), time.time())


async def offend(mesh: Mesh, host, protocol: str, data: bytes, *, close: bool = False) -> float:
    """Send one bad input on a new stream; wait until the victim scores the sender down."""
    before = penalty(mesh, host.get_id())
    await send(host, mesh, protocol, data, close=close)
    await wait_until(lambda: penalty(mesh, host.get_id()) > before + 1, timeout=5)
    return penalty(mesh, host.get_id())


def oversized_capacity(identity: Identity) -> bytes:
    body = msgpack.packb({"pad": b"x" * 3000})
    return pack_envelope(NETWORK, "capacity", 1, identity.public_key, body,
                         identity.sign(signed_bytes(NETWORK, "capacity", 1, body)))


# --- 1. malformed and oversized RPCs on every protocol ----------------------------------------

async def test_malformed_rpcs_cost_the_sender_and_end_in_a_ban(tmp_path):
    """Fix 7: the DHT, GossipSub over its cap and identify/push swallowed bad input into a
    quiet stream reset, so the sender lost nothing; now every bad frame costs it."""
    async with fleet(3, state_dir=tmp_path) as meshes:
        victim = meshes[0]
        kad = victim.names.protocol("kad")
        junk = random.Random(7).randbytes(300)

        async with attacker(b"dht junk") as evil:
            await dial(evil, victim, "127.0.1.1")
            await offend(victim, evil, kad, junk, close=True)                    # random bytes
            await offend(victim, evil, kad, encode_uvarint(100 * 1024 * 1024))  # 100 MB prefix
            await offend(victim, evil, kad, frame(b"\xff" * 40))                # garbage protobuf
            key = victim.names.node_key(victim.identity.peer_id)
            huge_record = put_value(key, os.urandom(200_000))
            score = await offend(victim, evil, kad, huge_record)
            assert 60 <= score < 100 and not victim.is_banned(evil.get_id())

        async with attacker(b"gossip junk") as evil:
            await dial(evil, victim, "127.0.1.2")
            under, over = MAX_GOSSIP_RPC - 8, MAX_GOSSIP_RPC + 1  # garbage RPCs around the cap
            await offend(victim, evil, GOSSIP, encode_uvarint(under) + b"\xff" * under)
            await offend(victim, evil, GOSSIP, encode_uvarint(over) + b"\0" * 64)
            await offend(victim, evil, GOSSIP, junk, close=True)  # random bytes
            assert victim.host.get_network().get_connections(evil.get_id())  # not banned yet

        async with attacker(b"identify junk") as evil:
            await dial(evil, victim, "127.0.1.3")
            await offend(victim, evil, IDENTIFY_PUSH, frame(b"\xff" * 40))
            await offend(victim, evil, IDENTIFY_PUSH, encode_uvarint(64 * 1024) + b"\0" * 64)
            # ping answers any 32 bytes: nothing to punish, and the host still answers
            before = penalty(victim, evil.get_id())
            stream = await evil.new_stream(victim.host.get_id(), [PING])
            await stream.write(junk[:32])
            with trio.fail_after(5):
                assert await stream.read(32) == junk[:32]
            assert penalty(victim, evil.get_id()) <= before + 0.01

        # a repeat offender is banned, the ban is persisted, and it is refused on reconnecting
        async with attacker(b"repeat offender") as evil:
            await dial(evil, victim, "127.0.1.4")
            for _ in range(10):
                if victim.is_banned(evil.get_id()):
                    break
                await offend(victim, evil, kad, frame(b"\xff" * 40))
            assert victim.is_banned(evil.get_id())
            assert str(evil.get_id()) in [p for p, _, _ in victim.state.active_bans(time.time())]
            await wait_until(lambda: not victim.host.get_network().get_connections(evil.get_id()))
            gated = victim.stats.gated_connections
            try:
                await dial(evil, victim, "127.0.1.4")
            except Exception:
                pass
            await wait_until(lambda: victim.stats.gated_connections > gated)
            await wait_until(lambda: not victim.host.get_network().get_connections(evil.get_id()))
        await assert_still_serving(meshes)


async def test_stalled_gossip_frame_is_dropped_but_idle_gossip_is_not():
    """Fix 7: a GossipSub stream that sent part of a frame and then nothing held its reader
    (and up to 64 KiB of buffer) for as long as the connection lived. A stream that is
    merely quiet between frames is normal for pubsub and is left alone."""
    async with fleet(2, dht_idle_timeout_s=1.0) as meshes:
        victim = meshes[0]
        async with attacker(b"half a frame") as evil:
            await dial(evil, victim, "127.0.1.5")
            quiet = await evil.new_stream(victim.host.get_id(), [GOSSIP])
            await quiet.write(frame(b""))  # a whole (empty) RPC, then silence
            stalled = await evil.new_stream(victim.host.get_id(), [GOSSIP])
            await stalled.write(encode_uvarint(1000) + b"\0" * 10)  # 10 of 1000 bytes
            await wait_until(lambda: penalty(victim, evil.get_id()) > 0, timeout=5)
            assert victim.stats.protocol_errors == 1  # the stalled one; the quiet one is fine
            with trio.fail_after(5):  # the victim reset the stalled stream
                try:
                    await stalled.read(1)
                except Exception:
                    pass
        await assert_still_serving(meshes)


# --- 2. forged records put straight into the victim's DHT -------------------------------------

async def test_forged_expired_and_oversized_records_are_not_stored():
    async with fleet(3) as meshes:
        victim, reader = meshes[0], meshes[-1]
        own = seal(capacity(5000), victim.identity, NETWORK)
        await victim.put_capacity(own)
        kad = victim.names.protocol("kad")
        store = victim.dht.value_store
        mallory, stale, fat = (Identity.from_seed(s) for s in (b"mallory", b"stale", b"fat"))
        key = {i: victim.names.node_key(i.peer_id) for i in (victim.identity, mallory, stale, fat)}

        async with attacker(b"record forger") as evil:
            await dial(evil, victim, "127.0.1.6")
            # the channel works: mallory's own valid record is stored
            await send(evil, victim, kad,
                       put_value(key[mallory], seal(capacity(1), mallory, NETWORK)))
            await wait_until(lambda: store.get(key[mallory].encode()) is not None)
            assert penalty(victim, evil.get_id()) == 0
            # signed by mallory under the victim's key
            await offend(victim, evil, kad, put_value(key[victim.identity],
                                                      seal(capacity(9999), mallory, NETWORK)))
            expired = seal(capacity(1, exp=now_ms() - 60_000), stale, NETWORK)
            await offend(victim, evil, kad, put_value(key[stale], expired))
            await offend(victim, evil, kad, put_value(key[fat], oversized_capacity(fat)))

        assert bytes(store.get(key[victim.identity].encode()).value) == own
        assert store.get(key[stale].encode()) is None and store.get(key[fat].encode()) is None
        got = await reader.get_capacity(victim.identity.peer_id)
        assert got is not None and got.body.seq == 5000
        await assert_still_serving(meshes)


# --- 3. announcement floods and invalid announcements ----------------------------------------

async def rogue_mesh(i: int, nursery) -> Mesh:
    """A mesh whose own checks on the jobs topic are off: it publishes whatever it is given."""
    rogue = Mesh(Identity.from_seed(f"rogue-{i}".encode()), settings(20 + i))
    await nursery.start(rogue.run)
    rogue.pubsub.remove_topic_validator(rogue.names.topic("jobs"))
    return rogue


async def in_gossip_mesh(a: Mesh, b: Mesh) -> None:
    topic = a.names.topic("jobs")
    await wait_until(lambda: b.host.get_id() in a.pubsub.router.mesh.get(topic, set())
                     and a.host.get_id() in b.pubsub.router.mesh.get(topic, set()), timeout=10)


async def received(mesh: Mesh, quiet_s: float = 1.0) -> list:
    """What `mesh` delivers until it has been quiet for `quiet_s`."""
    got = []
    while True:
        with trio.move_on_after(quiet_s):
            got.append(await mesh.jobs.receive())
            continue
        return got


async def test_a_flooding_publisher_is_cut_to_its_rate_and_invalid_ones_are_scored_down():
    async with fleet(2) as meshes, trio.open_nursery() as nursery:
        victim, reader = meshes
        topic = victim.names.topic("jobs")
        rogue = await rogue_mesh(0, nursery)
        await rogue.connect(victim.listen_addrs()[0])
        await in_gossip_mesh(rogue, victim)
        await in_gossip_mesh(victim, reader)

        # invalid announcements: scored down by us and by GossipSub (P4)
        good = announcement(Identity.from_seed(b"someone"))
        await rogue.pubsub.publish(topic, good[:-1] + bytes([good[-1] ^ 1]))  # bad signature
        await rogue.pubsub.publish(topic, b"\x93" + os.urandom(60_000))       # junk, oversized
        await wait_until(lambda: victim.stats.rejected_messages >= 2)
        scorer = victim.pubsub.router.scorer
        assert penalty(victim, rogue.host.get_id()) >= 19.9
        assert scorer.invalid_messages[rogue.host.get_id()][topic] >= 1
        assert scorer.topic_score(rogue.host.get_id(), topic) < 0  # fix 9: it rose before

        # a flood from one publisher: the burst passes, the rest is dropped at the first hop
        flooder = Identity.from_seed(b"flooder")
        for seq in range(1, 31):
            await rogue.pubsub.publish(topic, announcement(flooder, seq=seq))
        honest = Identity.from_seed(b"honest publisher")
        await victim.announce_job(announcement(honest))
        got = await received(reader)
        burst = victim.job_validator.rate.burst
        assert [o.signer for o in got].count(honest.public_key) == 1
        assert 1 <= [o.signer for o in got].count(flooder.public_key) <= burst
        assert penalty(reader, victim.host.get_id()) == 0      # the relay is not blamed
        assert penalty(victim, rogue.host.get_id()) >= 24.9  # the originator is
        await assert_still_serving(meshes)
        nursery.cancel_scope.cancel()


async def test_a_flood_split_between_two_entry_points_does_not_get_honest_relays_punished():
    """Fix 10: with a boolean validator, a flooder that sends the first burst to A and the
    next to B made A and B reject (and score down, and in the end ban) each other for
    relaying; over-rate messages are now ignored, and the relay is not blamed."""
    async with fleet(2) as meshes, trio.open_nursery() as nursery:
        a, b = meshes
        topic = a.names.topic("jobs")
        r1, r2 = await rogue_mesh(1, nursery), await rogue_mesh(2, nursery)
        await r1.connect(a.listen_addrs()[0])
        await r2.connect(b.listen_addrs()[0])
        for x, y in ((r1, a), (r2, b), (a, b)):
            await in_gossip_mesh(x, y)
        flooder = Identity.from_seed(b"split flooder")
        burst = a.job_validator.rate.burst
        async with trio.open_nursery() as both:
            for rogue, first in ((r1, 1), (r2, 1 + burst)):
                for seq in range(first, first + burst):
                    both.start_soon(rogue.pubsub.publish, topic, announcement(flooder, seq=seq))
        await received(a)
        await received(b)
        assert penalty(a, b.host.get_id()) == 0 and penalty(b, a.host.get_id()) == 0
        assert a.pubsub.router.scorer.invalid_messages[b.host.get_id()][topic] == 0
        nursery.cancel_scope.cancel()


# --- 4. half-open sockets ---------------------------------------------------------------------

async def test_half_open_sockets_from_one_address_do_not_lock_out_honest_peers():
    """Fix 8: 300 sockets that never start the handshake held every inbound slot."""
    async with fleet(2) as meshes, trio.open_nursery() as nursery:
        victim = meshes[0]
        port = int(multiaddr.Multiaddr(victim.listen_addrs()[0]).value_for_protocol("tcp"))
        socks = []
        for _ in range(300):
            sock = trio.socket.socket()
            await sock.bind(("127.0.0.66", 0))
            await sock.connect(("127.0.0.1", port))
            socks.append(sock)
        # while the attacker holds its sockets, a newcomer gets in and is served
        newcomer = Mesh(Identity.from_seed(b"newcomer"), settings(8))
        await nursery.start(newcomer.run)
        with trio.fail_after(10):
            await newcomer.connect(victim.listen_addrs()[0])
        await assert_still_serving([victim, newcomer])
        # the attacker's address got `max_pending` handshakes (until the handshake timeout)
        limits = victim.inbound_limiter.limits
        assert victim.inbound_limiter.refused >= 300 - limits.max_pending
        assert victim.host.get_network()._inbound_limiter.borrowed_tokens <= limits.max_pending + 2
        for sock in socks:
            sock.close()
        nursery.cancel_scope.cancel()


# --- 5. Sybils --------------------------------------------------------------------------------

async def test_two_hundred_sybils_come_and_go():
    """Connection limits hold while 200 fresh identities come (each storing records),
    their slots are released when they go (fix 4), the value store keeps one record per
    identity and record type, and an honest peer gets in afterwards."""
    async with fleet(2, max_connections=24, min_connections=4) as meshes, \
            trio.open_nursery() as nursery:
        victim = meshes[0]
        swarm = victim.host.get_network()
        kad = victim.names.protocol("kad")
        store = victim.dht.value_store
        stored_before = len(store.store)
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, len(swarm.get_connections()))
                await trio.sleep(0.01)

        nursery.start_soon(watch)
        sybils = [Identity.from_seed(f"sybil-{i}".encode()) for i in range(200)]
        came: list[int] = []

        def newest_seq(identity: Identity) -> int | None:
            record = store.get(victim.names.node_key(identity.peer_id).encode())
            if record is None:
                return None
            return victim.record_validator.open(victim.names.node_key(identity.peer_id),
                                                bytes(record.value)).body.seq

        async def sybil(i: int) -> None:
            me, other = sybils[i], sybils[(i + 1) % len(sybils)]
            async with attacker(f"sybil-{i}".encode()) as host:
                try:
                    await dial(host, victim, f"127.0.2.{1 + i % 50}")
                except Exception:
                    return  # refused at the connection limit: that is the limit holding
                came.append(i)
                # one DHT stream (the DHT serves 12 inbound streams at once, for everyone):
                # two records of its own, the newer replacing the older, then one under
                # another identity's key, refused
                mine, theirs = (victim.names.node_key(x.peer_id) for x in (me, other))
                if await send(host, victim, kad, put_value(mine, seal(capacity(1), me, NETWORK))
                              + put_value(mine, seal(capacity(2), me, NETWORK))
                              + put_value(theirs, seal(capacity(3), me, NETWORK))):
                    await wait_until(lambda: newest_seq(me) == 2, timeout=10)
            # leaving `attacker` closes its sockets

        limiter = trio.CapacityLimiter(10)

        async def limited(i: int) -> None:
            async with limiter:
                await sybil(i)

        async with trio.open_nursery() as wave:
            for i in range(len(sybils)):
                wave.start_soon(limited, i)
        assert peak <= 24
        assert len(came) >= 150  # far more than the 20 inbound slots: slots were released
        await wait_until(lambda: len(swarm.get_connections()) <= 2, timeout=10)
        await wait_until(lambda: swarm._inbound_limiter.borrowed_tokens <= 1)
        assert not victim.inbound_limiter.open.get("127.0.2.1")
        # at most one record per identity, its own (a forged one would not open), the newest
        held = [i for i in range(len(sybils)) if newest_seq(sybils[i]) is not None]
        assert len(store.store) - stored_before == len(held) and set(held) <= set(came)
        assert sum(newest_seq(sybils[i]) == 2 for i in held) >= 150
        newcomer = Mesh(Identity.from_seed(b"after the sybils"), settings(9))
        await nursery.start(newcomer.run)
        await newcomer.connect(victim.listen_addrs()[0])
        await assert_still_serving([victim, newcomer])
        nursery.cancel_scope.cancel()


# --- 6. churn ---------------------------------------------------------------------------------

async def test_150_connect_disconnect_cycles_leave_the_node_open():
    """Fix 4 at scale: 150 cycles are 15 times the inbound slots of max_connections=12."""
    async with fleet(2, max_connections=12, min_connections=2) as meshes:
        victim = meshes[0]
        swarm = victim.host.get_network()

        async def churner(i: int, cycles: int) -> None:
            async with attacker(f"churner-{i}".encode()) as host:
                for _ in range(cycles):
                    await dial(host, victim, f"127.0.3.{i + 1}")
                    await host.get_network().close_peer(victim.host.get_id())

        async with trio.open_nursery() as nursery:
            for i in range(6):
                nursery.start_soon(churner, i, 25)
        await wait_until(lambda: swarm._inbound_limiter.borrowed_tokens <= 1)
        await wait_until(lambda: set(victim.inbound_limiter.open) == {"127.0.0.2"})  # node 1
        await assert_still_serving(meshes)
