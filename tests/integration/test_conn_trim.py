"""Fixes 16 and 21: a node a fleet joins through lets settled connections go, so newcomers
keep getting in.

Before, a bootstrap node's unreserved inbound slots (fix 16) kept the first joiners for
good, each useful since its first DHT request, and upstream's pruner never closed a
connection holding a stream (each of ours holds a GossipSub stream): every later newcomer
was refused (issue 15). Real hosts on loopback, one address each.
"""

from __future__ import annotations

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
