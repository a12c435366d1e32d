"""Fixes 16 and 21: a node a fleet joins through lets settled connections go, so newcomers
keep getting in.

Before, a bootstrap node's unreserved inbound slots (fix 16) kept the first joiners for
good, each useful since its first DHT request, and upstream's pruner never closed a
connection holding a stream (each of ours holds a GossipSub stream): every later newcomer
was refused (issue 15). Real hosts on loopback, one address each.
"""

from __future__ import annotations

import time

import trio

from p2pfleet.identity import Identity
from p2pfleet.net.libp2p_fixes import InboundReserve
from p2pfleet.net.mesh import Mesh, MeshError

from fleetkit import settings, wait_until

SPOKES = 12


async def test_a_full_bootstrap_node_trims_and_every_newcomer_gets_in():
    async with trio.open_nursery() as nursery:
        # 6 inbound slots, 4 of them unreserved; high watermark 6, low 4, hard limit 8;
        # at most 2 GossipSub mesh peers (those are kept)
        hub = Mesh(Identity.from_seed(b"trim-hub"), settings(
            0, max_connections=8, min_connections=2, trim_grace_s=0.5, gossip_degree=1,
            inbound_reserve=InboundReserve(grace_s=0.2, settle_s=0.5)))
        await nursery.start(hub.run)
        hub_addr = hub.listen_addrs()[0]
        joined = []
        for i in range(1, SPOKES + 1):
            spoke = Mesh(Identity.from_seed(f"trim-spoke-{i}".encode()), settings(i))
            await nursery.start(spoke.run)

            async def joins(spoke=spoke) -> bool:
                try:
                    await spoke.connect(hub_addr, timeout=2.0)
                except MeshError:
                    return False
                return hub.identity.peer_id in spoke.connected_peers()

            # a newcomer retries (as the bootstrap loop does); before the fix the hub
            # refused every one after its fourth, for good
            with trio.fail_after(30):
                while not await joins():
                    await trio.sleep(0.5)
            joined.append(spoke)
            assert len(hub.connected_peers()) <= 8
        assert len(joined) == SPOKES
        # the hub trimmed back under its high watermark, keeping its GossipSub mesh peers
        await wait_until(lambda: len(hub.connected_peers()) <= 6 or _only_mesh_left(hub),
                         timeout=20)
        nursery.cancel_scope.cancel()


def _only_mesh_left(hub: Mesh) -> bool:
    mesh_peers = {str(p) for peers in hub.pubsub.router.mesh.values() for p in peers}
    return set(hub.connected_peers()) <= mesh_peers


async def test_trimming_stops_at_the_watermarks_midpoint_and_spares_routing_table_peers():
    """A trim went down to the low watermark and took the oldest inbound peers first, the
    routing table's included: the host's next walk dialled those right back, it climbed
    over the high watermark and trimmed again (issue 15: connections churning at rest).
    Now it stops at the midpoint of the watermarks and closes non-table peers first."""
    from libp2p.peer.id import ID

    spokes_n, in_table_n = 10, 4
    async with trio.open_nursery() as nursery:
        # hard limit 12: low watermark 4, high 9, midpoint 6; no reserve (fix 16 stays out)
        hub = Mesh(Identity.from_seed(b"trim-mid-hub"), settings(
            0, max_connections=12, min_connections=2, trim_grace_s=0.5, gossip_degree=1,
            dht_refresh_s=0, inbound_reserve=InboundReserve(fraction=0.0)))
        await nursery.start(hub.run)
        hub_addr = hub.listen_addrs()[0]
        spokes = []
        for i in range(1, spokes_n + 1):  # the first ones connect first: the oldest
            spoke = Mesh(Identity.from_seed(f"trim-mid-spoke-{i}".encode()), settings(
                i, dht_refresh_s=0, min_connections=1))
            await nursery.start(spoke.run)
            if i == spokes_n:  # the connection over the high watermark: the others are all
                # past their grace, else the table's (the oldest) were the only candidates
                await wait_until(lambda: all(
                    time.time() - c._created_at > 0.6
                    for c in hub.host.get_network().get_connections()))
            await spoke.connect(hub_addr)
            spokes.append(spoke)
            if i == in_table_n:  # the oldest connections: the old order trimmed these first
                for peer in [ID.from_base58(s.identity.peer_id) for s in spokes]:
                    await wait_until(lambda peer=peer: hub.host.get_peerstore().get_protocols(peer))
                    assert await hub.dht.routing_table.add_peer(peer)
                assert hub.stats.trims == 0  # 4 connections: under the high watermark
        table = [s.identity.peer_id for s in spokes[:in_table_n]]
        await wait_until(lambda: hub.stats.trims > 0, timeout=30)
        # what the trim itself closed: on a loaded machine a connection may also fail on
        # its own (a muxer negotiation running out of time), which is no trim's doing
        before, trimmed = hub.stats.last_trim
        assert before - len(trimmed) >= 6, f"trimmed below the midpoint: {before} - {trimmed}"
        assert not set(table) & set(trimmed), "a routing-table peer was trimmed"
        nursery.cancel_scope.cancel()
