"""Fix 18 (net/dht_refresh.py): routing-table refreshes walk less, against real hosts.

Bucket walks only explore, so they end at the first round that names nothing closer, and a
refresh walks only the buckets no walk of ours visited within the refresh period."""

from __future__ import annotations

import random

import trio

from p2pfleet.identity import Identity
from p2pfleet.net import dht_lookup, dht_refresh
from p2pfleet.net.mesh import Mesh

from fleetkit import settings, wait_until

HOSTS = 8


async def start(nursery: trio.Nursery, n: int, tag: str) -> list[Mesh]:
    meshes: list[Mesh] = []
    bootstrap: tuple[str, ...] = ()
    for i in range(n):
        mesh = Mesh(Identity.from_seed(f"lean-refresh-{tag}-{i}".encode()),
                    settings(i, listen=(f"/ip4/127.0.8.{i + 1}/tcp/0",), bootstrap=bootstrap,
                             min_connections=2))
        await nursery.start(mesh.run)
        meshes.append(mesh)
        bootstrap = bootstrap or tuple(mesh.listen_addrs()[:1])
    return meshes


async def test_a_bucket_walk_ends_when_a_round_names_nothing_closer():
    async with trio.open_nursery() as nursery:
        meshes = await start(nursery, HOSTS, "walk")
        walker = meshes[-1]
        await wait_until(lambda: walker.dht is not None
                         and walker.dht.routing_table.size() == HOSTS - 1, timeout=120)
        # it knows every host, so the first round's answers name nobody closer than the
        # closest it knew: an exploring walk stops there; a full walk asks all k closest
        key = dht_refresh.key_at_cpl(dht_refresh.own_position(walker.dht), 0, random.Random(1))
        lean, full = dht_lookup.WalkStats(), dht_lookup.WalkStats()
        await dht_lookup.walk(walker.dht, key, k=20, stats=lean, until_no_closer=True)
        await dht_lookup.walk(walker.dht, key, k=20, stats=full)
        assert lean.rounds == 1 and lean.rpcs == dht_lookup.ALPHA, lean
        assert full.rpcs == HOSTS - 1, full
        nursery.cancel_scope.cancel()


async def test_a_refresh_right_after_the_join_walks_no_bucket_again():
    async with trio.open_nursery() as nursery:
        meshes = await start(nursery, HOSTS, "stale")
        joiner = meshes[-1]
        await joiner.table_ready.wait()
        first = joiner.last_refresh
        assert first.cpls, "the join walks every bucket once"
        done = joiner.refreshes
        joiner.refresh_now()
        await wait_until(lambda: joiner.refreshes > done, timeout=120)
        again = joiner.last_refresh
        # every bucket was walked within the refresh period: only the self-lookup runs
        assert again.cpls == [] and set(again.fresh) >= set(first.cpls), again
        assert again.walks == 1, again
        nursery.cancel_scope.cancel()
