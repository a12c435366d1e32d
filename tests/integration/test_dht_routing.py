"""A DHT larger than k: 30 real py-libp2p hosts in one process with k = 4, so that records
live on a few peers and lookups must route (issue 15 item 3, net/dht_refresh.py)."""

from __future__ import annotations

import dataclasses
import time

import trio

from p2pfleet.identity import Identity
from p2pfleet.net.mesh import Mesh
from p2pfleet.wire.envelope import seal
from p2pfleet.wire.kinds import Capacity

from fleetkit import NETWORK, settings, wait_until

HOSTS = 30
BOOTSTRAP = 3
K = 4


def capacity() -> Capacity:
    now = int(time.time() * 1000)
    return Capacity(seq=now, exp=now + 600_000, sw_version="0.1.0", state="available",
                    hw_class=b"\x07" * 32, cores=2, memory_mb=1024, bench=50.0,
                    providers=("CPUExecutionProvider",), ort_version="1.32.0", slots=1,
                    addrs=())


async def join(nursery: trio.Nursery, i: int, bootstrap: tuple[str, ...]) -> Mesh:
    mesh = Mesh(Identity.from_seed(f"dht-routing-{i}".encode()),
                settings(i, listen=(f"/ip4/127.0.{i // 200 + 1}.{i % 200 + 1}/tcp/0",),
                         bootstrap=bootstrap, dht_k=K, min_connections=2))
    await nursery.start(mesh.run)
    return mesh


async def test_record_published_right_after_join_is_found_by_hosts_that_never_met_it():
    async with trio.open_nursery() as nursery:
        boots = [await join(nursery, 0, ())]
        first = (boots[0].listen_addrs()[0],)
        boots += [await join(nursery, i, first) for i in range(1, BOOTSTRAP)]
        bootstrap = tuple(m.listen_addrs()[0] for m in boots)
        fleet = boots + [await join(nursery, i, bootstrap) for i in range(BOOTSTRAP, HOSTS - 1)]
        await wait_until(lambda: all(m.table_ready.is_set() for m in fleet), timeout=120)

        publisher = await join(nursery, HOSTS - 1, bootstrap)
        await publisher.table_ready.wait()  # joined: first peer, then the table filled
        await publisher.put_capacity(seal(capacity(), publisher.identity, NETWORK))
        # a put that reached few peers (on a busy machine) is repeated after a refresh
        await wait_until(lambda: publisher.last_put_peers >= K - 1, timeout=90)

        met = set(publisher.connected_peers())
        strangers = [m for m in fleet if m.identity.peer_id not in met]
        assert len(strangers) >= HOSTS // 3, "the walk met nearly everyone: no routing tested"
        missed = []
        for reader in strangers:
            opened = await reader.get_capacity(publisher.identity.peer_id)
            if opened is None or opened.signer != publisher.identity.public_key:
                missed.append(reader.identity.peer_id)
        assert not missed, f"{len(missed)} of {len(strangers)} hosts did not find the record"
        nursery.cancel_scope.cancel()



async def test_a_get_ends_once_a_quorum_of_peers_returned_the_record():
    """The libp2p spec's Q: a get stops asking once `dht_get_quorum` peers returned a current
    copy, instead of querying all k closest (at 200 hosts every get ran into its deadline)."""
    async with trio.open_nursery() as nursery:
        fleet: list[Mesh] = []
        for i in range(8):  # k = 20 > the fleet: every host holds the record after the put
            mesh = Mesh(Identity.from_seed(f"dht-quorum-{i}".encode()),
                        settings(100 + i, bootstrap=tuple(m.listen_addrs()[0] for m in fleet[:1])))
            await nursery.start(mesh.run)
            fleet.append(mesh)
        publisher, readers = fleet[0], fleet[1:]
        await wait_until(lambda: all(m.table_ready.is_set() for m in fleet), timeout=60)
        for mesh in readers:  # every reader knows every other host
            for other in fleet:
                if other is not mesh:
                    await mesh.connect(other.listen_addrs()[0])
        await publisher.put_capacity(seal(capacity(), publisher.identity, NETWORK))
        await wait_until(lambda: publisher.last_put_peers == len(readers), timeout=60)

        async def get(mesh: Mesh, quorum: int) -> None:
            mesh.settings = dataclasses.replace(mesh.settings, dht_get_quorum=quorum)
            opened = await mesh.get_capacity(publisher.identity.peer_id)
            assert opened is not None and opened.signer == publisher.identity.public_key

        await get(readers[0], 0)  # no quorum: all k closest (every other host) are asked
        full = readers[0].last_lookup
        assert full.responses == len(fleet) - 1, full
        await get(readers[1], 2)
        quick = readers[1].last_lookup
        assert 2 <= quick.responses < full.responses and quick.rpcs < full.rpcs, (quick, full)
        nursery.cancel_scope.cancel()
