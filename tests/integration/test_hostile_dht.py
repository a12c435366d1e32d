"""Hostile load on the DHT and on inbound slots (issue 14, items 2 and 4; fixes 15 and 16).

A victim mesh and an honest peer (another loopback address) run while attackers dial from
their own 127.0.x.y addresses; the honest peer keeps sending GET_VALUE requests for a
record only the victim holds, and each test counts how many were answered. Attackers are
raw py-libp2p hosts (`attacker` and `dial` from test_hostile.py).
"""

from __future__ import annotations

import time

import trio
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.utils.varint import encode_uvarint

from p2pfleet.core.peer_budget import PeerBudget
from p2pfleet.identity import Identity
from p2pfleet.net import traffic
from p2pfleet.net.mesh import Mesh
from p2pfleet.wire.envelope import seal
from test_hostile import attacker, dial, frame
from test_libp2p_fixes import assert_still_serving
from test_mesh import capacity, now_ms

from fleetkit import NETWORK, fleet, settings, wait_until

LOOKUPS = 100
ANSWERED = 99  # >= 99% of the honest lookups


async def victim_holds_a_record(victim: Mesh) -> bytes:
    """A capacity record stored at the victim only (no walk, no copies elsewhere)."""
    owner = Identity.from_seed(b"record owner")
    key = victim.names.node_key(owner.peer_id).encode()
    victim.dht.value_store.put(key, seal(capacity(now_ms()), owner, NETWORK))
    return key


async def honest_lookups(honest: Mesh, victim: Mesh, key: bytes, n: int = LOOKUPS) -> int:
    """Send `n` GET_VALUE requests to the victim one after another; how many were answered
    with the record (each one given the walk's per-query timeout)."""
    answered = 0
    for _ in range(n):
        with trio.move_on_after(5.0):
            try:
                record, _closer = await honest.dht.value_store._get_from_peer(
                    victim.host.get_id(), key, return_record=True, return_closer_peers=True)
            except Exception:  # a refused or reset stream: not answered
                continue
            if record is not None and record.value:
                answered += 1
    return answered


def find_node(target: bytes) -> bytes:
    return frame(Message(type=Message.MessageType.FIND_NODE, key=target).SerializeToString())


async def stall_streams(host, victim: Mesh, n: int, opened: list) -> None:
    """Open `n` DHT streams to the victim, each sending a length prefix and then nothing."""
    kad = TProtocol(victim.names.protocol("kad"))
    for _ in range(n):
        try:
            stream = await host.new_stream(victim.host.get_id(), [kad])
            await stream.write(encode_uvarint(200))
        except Exception:  # refused, reset or disconnected: that is the defence
            pass
        opened.append(1)


async def test_stalled_dht_streams_from_fresh_identities_do_not_deny_lookups():
    """Twelve stalled DHT streams held every inbound DHT slot of py-libp2p (12 in all, held
    for the whole stream), and an attacker re-stalling from a fresh identity kept honest
    lookups failing. Three identities at a time from one address, each stalling 12 streams
    and coming back under a new identity once cut off."""
    async with fleet(2) as meshes, trio.open_nursery() as nursery:
        victim, honest = meshes
        key = await victim_holds_a_record(victim)
        opened: list = []
        identities: list = []

        async def restaller(slot: int) -> None:
            for round_ in range(1000):
                seed = f"stall-{slot}-{round_}".encode()
                identities.append(seed)
                async with attacker(seed) as evil:
                    try:
                        await dial(evil, victim, "127.0.4.1")
                    except Exception:
                        await trio.sleep(0.1)
                        continue
                    await stall_streams(evil, victim, 12, opened)
                    # held until the victim cuts the identity off (or the test ends)
                    await wait_until(lambda: not victim.host.get_network().get_connections(
                        evil.get_id()), timeout=60)

        for slot in range(3):
            nursery.start_soon(restaller, slot)
        await wait_until(lambda: len(opened) >= 36, timeout=30)
        answered = await honest_lookups(honest, victim, key)
        assert answered >= ANSWERED, f"{answered} of {LOOKUPS} honest lookups answered"
        # the stallers were scored down for it
        await wait_until(lambda: any(victim.reputation.penalty(str(p), time.time()) > 0
                                     for p in _peer_ids(identities)), timeout=30)
        nursery.cancel_scope.cancel()
    async with fleet(2) as meshes:  # and a fresh pair still serves as before
        await assert_still_serving(meshes)


def _peer_ids(seeds: list) -> list:
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    return [ID.from_pubkey(create_new_key_pair(s.ljust(32, b"\0")[:32]).public_key)
            for s in list(seeds)]


async def test_find_node_flood_does_not_starve_honest_lookups():
    """A 32-way FIND_NODE flood from one peer held py-libp2p's 12 DHT slots for as long as it
    kept asking: 12.5% of honest lookups were answered. Now the flooder's streams over its
    cap are refused (and cost it), and its requests wait behind its own, not the honest
    peer's."""
    async with fleet(2) as meshes, trio.open_nursery() as nursery:
        victim, honest = meshes
        key = await victim_holds_a_record(victim)
        kad = TProtocol(victim.names.protocol("kad"))
        sent = [0]

        async def flood_stream(evil) -> None:
            try:
                stream = await evil.new_stream(victim.host.get_id(), [kad])
            except Exception:
                return
            request = find_node(evil.get_id().to_bytes())
            try:
                while True:
                    await stream.write(request)
                    sent[0] += 1
                    await stream.read(65536)  # read the answer (or part of it)
            except Exception:  # reset by the victim
                return

        flooders: list = []

        async def flooder() -> None:  # comes back under a fresh identity once cut off
            for round_ in range(1000):
                seed = f"find-node flooder {round_}".encode()
                flooders.append(seed)
                async with attacker(seed) as evil:
                    await dial(evil, victim, "127.0.4.2")
                    async with trio.open_nursery() as streams:
                        for _ in range(32):
                            streams.start_soon(flood_stream, evil)

        nursery.start_soon(flooder)
        await wait_until(lambda: sent[0] >= 100, timeout=30)
        answered = await honest_lookups(honest, victim, key)
        assert answered >= ANSWERED, f"{answered} of {LOOKUPS} honest lookups answered"
        # the flooder was scored down for its streams over the cap
        assert any(victim.reputation.penalty(str(p), time.time()) > 0
                   for p in _peer_ids(flooders))
        nursery.cancel_scope.cancel()


# --- inbound slots: a flood of new addresses does not lock out the fleet --------------------

async def test_flood_from_many_addresses_leaves_room_for_the_fleet_and_newcomers():
    """Issue 14 item 4: 119 connections from forty addresses held every inbound slot and
    locked honest peers out. Here 20 inbound slots (max 24, floor 4) and 30 attacker
    identities on ten addresses that re-dial whenever cut off: a peer from our routing
    table re-connects at once, and a new honest peer gets in once flooders are pruned."""
    async with fleet(2, max_connections=24, min_connections=4, **_reserve()) as meshes, \
            trio.open_nursery() as nursery:
        victim, member = meshes
        traffic.install()  # as a node does: bytes count per peer
        now = [time.monotonic()]  # the byte budget's clock, moved on at the end
        victim.budget = PeerBudget(lambda: now[0])
        await member.get_capacity(victim.identity.peer_id)  # a DHT request: into victim's table
        await wait_until(lambda: victim.dht.routing_table.peer_in_table(member.host.get_id()))
        swarm = victim.host.get_network()
        held: set = set()

        async def flooder(i: int) -> None:
            async with attacker(f"slot flooder {i}".encode()) as evil:
                while True:
                    try:
                        await dial(evil, victim, f"127.0.5.{1 + i % 10}")
                        held.add(i)
                    except Exception:
                        pass
                    while evil.get_network().get_connections(victim.host.get_id()):
                        await trio.sleep(0.05)  # held until the victim closes it
                    held.discard(i)
                    await trio.sleep(0.1)  # then straight back

        for i in range(30):
            nursery.start_soon(flooder, i)
        # the flood holds what it can (all free slots before; the unreserved share, less
        # the member's first connection, counted there until it was in the routing table)
        await wait_until(lambda: len(held) >= 12, timeout=30)
        # a fleet member drops its connection and comes back while the flood is held
        await member.host.get_network().close_peer(victim.host.get_id())
        await wait_until(lambda: not swarm.get_connections(member.host.get_id()))
        with trio.fail_after(10):
            await member.connect(victim.listen_addrs()[0])
        assert swarm.get_connections(member.host.get_id())
        # a new honest peer gets in (retrying, as a node's bootstrap loop does)
        newcomer = Mesh(Identity.from_seed(b"newcomer during the flood"), settings(8))
        await nursery.start(newcomer.run)

        async def joined() -> bool:
            # py-libp2p refuses to re-dial a peer for 60 s after a failed dial; a node's
            # bootstrap loop retries later than that, this test does not wait it out
            newcomer.host.get_network().unblock_peer(victim.host.get_id())
            try:
                await newcomer.connect(victim.listen_addrs()[0], timeout=3)
            except Exception:
                return False
            return True

        with trio.fail_after(60):
            while not await joined():
                await trio.sleep(0.2)
        reservation = victim.inbound_reservation  # flooders were pruned, never past their share
        assert reservation.pruned >= 1 and len(reservation.unknown) <= reservation.cap
        # what the pruned connections moved does not count toward the owner's cap
        now[0] += victim.budget.limits.window_s + 1
        victim.budget.settle()
        assert victim.budget.refused > 0
        await assert_still_serving([victim, newcomer])
        await assert_still_serving([victim, member])
        nursery.cancel_scope.cancel()


def _reserve() -> dict:
    """A short grace for new connections, so the test need not wait out the default."""
    try:
        from p2pfleet.net.libp2p_fixes import InboundReserve
    except ImportError:  # the code before fix 16
        return {}
    return {"inbound_reserve": InboundReserve(grace_s=2.0)}


async def test_a_flood_does_not_prune_a_publishers_leaseholders(tmp_path):
    """Fix 16 keeps peers in the routing table; a car behind NAT runs the DHT as a client and
    never enters it, so a publisher under a flood from many addresses pruned the very workers
    holding its leases (the oldest idle-looking connections, while the flooders' re-dials
    stayed younger than the grace). A leaseholder is marked useful and stays."""
    from test_publisher import pub_settings, spec

    from p2pfleet.net.blobs import BlobService
    from p2pfleet.publisher import Publisher
    from p2pfleet.store.blobcache import BlobCache
    from workerkit import TestWorker

    async with trio.open_nursery() as nursery:
        pm = Mesh(Identity.from_seed(b"flooded publisher"),
                  settings(0, max_connections=24, min_connections=4, **_reserve()))
        wm = Mesh(Identity.from_seed(b"worker behind nat"),
                  settings(1, listen=("/ip4/127.0.7.1/tcp/0",), dht_mode="client"))
        for mesh in (pm, wm):
            await nursery.start(mesh.run)
        await wm.connect(pm.listen_addrs()[0])
        blobs = BlobService(pm, BlobCache(tmp_path / "pub-blobs", 64 * 2**20))
        blobs.install()
        worker = TestWorker.start(wm, tmp_path / "w")
        pub = Publisher(pm.identity, pm, tmp_path / "jobs.sqlite", blobs,
                        settings=pub_settings({wm.identity.public_key}))
        await nursery.start(pub.run)
        pub.submit(spec(quorum=1, recheck_rate=0.0, audit_rate=0.0))
        pid, wid = pm.identity.peer_id, wm.host.get_id()
        assert (await worker.request(pid)).leases  # it holds a lease now
        assert not pm.dht.routing_table.peer_in_table(wid)  # a DHT client: not in the table
        swarm = pm.host.get_network()
        dropped = trio.Event()

        async def watch() -> None:
            while swarm.get_connections(wid):
                await trio.sleep(0.05)
            dropped.set()

        async def flooder(i: int) -> None:
            async with attacker(f"publisher flooder {i}".encode()) as evil:
                while True:
                    try:
                        await dial(evil, pm, f"127.0.6.{1 + i % 10}")
                    except Exception:
                        pass
                    while evil.get_network().get_connections(pm.host.get_id()):
                        await trio.sleep(0.05)
                    await trio.sleep(0.1)

        nursery.start_soon(watch)
        for i in range(30):
            nursery.start_soon(flooder, i)
        reservation = pm.inbound_reservation
        await wait_until(lambda: reservation.pruned >= 10 or dropped.is_set(), timeout=90)
        assert not dropped.is_set(), "the worker holding a lease was pruned for the flood"
        nursery.cancel_scope.cancel()
    pub.close()


async def test_bare_connects_do_not_rebuild_the_known_sources_each_time():
    """Fix 16 looks up an inbound connection's address among the addresses of our routing
    table's and dialled peers. It rebuilt that set from the peerstore on every inbound TCP
    connection (2-12 ms at a busy bootstrap node), work anyone triggers with bare connects;
    it is now rebuilt at most once a second."""
    async with fleet(2, **_reserve()) as meshes:
        victim, member = meshes
        await member.get_capacity(victim.identity.peer_id)
        await wait_until(lambda: victim.dht.routing_table.peer_in_table(member.host.get_id()))
        reservation = victim.inbound_reservation
        builds = []
        build = reservation._build_known_sources
        reservation._build_known_sources = lambda: builds.append(1) or build()
        _, _, host, _, port = victim.listen_addrs()[0].split("/")[:5]
        for i in range(40):
            stream = await trio.open_tcp_stream(host, int(port), local_address=f"127.0.6.{1 + i % 8}")
            await stream.aclose()
        await wait_until(lambda: builds)
        assert len(builds) <= 3
