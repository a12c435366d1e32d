"""Filling and refreshing the Kademlia routing table (py-libp2p 0.8.1 does neither for us).

Upstream, a peer enters our routing table only when it opens a DHT stream to us or when we
add it by hand; our walks (net/dht_lookup.py) learn peers but kept none. A node that joined
through a bootstrap peer therefore held only that peer, and the record it published at join
went to whatever few peers its walk reached (issue 15: a median of 0 copies at 10 x 10
hosts). go-libp2p-kad-dht and rust-libp2p bootstrap the same way we now do:

1. a self-lookup: a walk for our own key through the bootstrap peers; every peer that
   answers enters the table, and the walk converges on our neighbours (the peers that will
   hold our records and that route to us);
2. a refresh of each bucket: a walk for a random key at each common-prefix length with our
   own key (0 .. the deepest bucket we hold + 1), so the table also knows far regions.

The refresh repeats periodically (sooner while the table is smaller than k) and the mesh
republishes its records when the peers closest to a record's key changed much since the
put (net/mesh.py). The table keeps peers without a live connection: the walk dials them
when it needs them.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any

import trio

from . import dht_lookup

MAX_REFRESH_CPL = 15   # deeper buckets hold ~n / 2^16 peers: empty below a million nodes
PARALLEL_WALKS = 1     # walks at once: more trip the per-peer DHT stream caps (fix 15)
_MAX_GRIND = 1 << 20   # tries to find a key with a given common prefix (2^(cpl+1) expected)


@dataclass
class RefreshStats:
    """What one fill or refresh did: walks, peers learned, the table size after."""

    walks: int = 0
    rpcs: int = 0
    table_before: int = 0
    table_after: int = 0
    cpls: list[int] = field(default_factory=list)


def common_prefix_len(a: bytes, b: bytes) -> int:
    """Leading bits `a` and `b` share."""
    x = int.from_bytes(a, "big") ^ int.from_bytes(b, "big")
    return len(a) * 8 - x.bit_length()


def key_at_cpl(own: bytes, cpl: int, rng: random.Random) -> bytes:
    """A random lookup key whose DHT position (sha256, as py-libp2p hashes every key)
    shares exactly `cpl` leading bits with `own`, the hashed local peer id."""
    if not 0 <= cpl <= MAX_REFRESH_CPL:
        raise ValueError(f"refresh prefix length {cpl} outside 0..{MAX_REFRESH_CPL}")
    for _ in range(_MAX_GRIND):
        key = rng.randbytes(16)
        if common_prefix_len(hashlib.sha256(key).digest(), own) == cpl:
            return key
    raise RuntimeError(f"no key with common prefix {cpl} found in {_MAX_GRIND} tries")


def own_position(dht: Any) -> bytes:
    return hashlib.sha256(dht.host.get_id().to_bytes()).digest()


def deepest_cpl(dht: Any) -> int:
    """The longest common prefix of any table peer with us (-1 for an empty table)."""
    own = own_position(dht)
    cpls = [common_prefix_len(hashlib.sha256(p.to_bytes()).digest(), own)
            for p in dht.routing_table.get_peer_ids()]
    return max(cpls, default=-1)


async def fill(dht: Any, *, k: int, rng: random.Random) -> RefreshStats:
    """Self-lookup, then one walk per bucket up to the deepest one held + 1."""
    stats = RefreshStats(table_before=dht.routing_table.size())
    walk_stats = dht_lookup.WalkStats()
    await dht_lookup.walk(dht, dht.host.get_id().to_bytes(), k=k, stats=walk_stats, learn=True)
    stats.walks += 1
    own = own_position(dht)
    stats.cpls = list(range(0, min(MAX_REFRESH_CPL, deepest_cpl(dht) + 1) + 1))
    limiter = trio.CapacityLimiter(PARALLEL_WALKS)

    async def bucket(cpl: int) -> None:
        async with limiter:
            await dht_lookup.walk(dht, key_at_cpl(own, cpl, rng), k=k, stats=walk_stats,
                                  learn=True)

    async with trio.open_nursery() as nursery:
        for cpl in stats.cpls:
            nursery.start_soon(bucket, cpl)
    stats.walks += len(stats.cpls)
    stats.rpcs = walk_stats.rpcs
    stats.table_after = dht.routing_table.size()
    return stats


def moved(stored_at: set[Any], now_closest: list[Any]) -> bool:
    """Whether the peers closest to a record's key changed much since we stored it there:
    fewer than half of today's closest hold our copy (by our last put)."""
    if not now_closest:
        return False
    held = sum(1 for p in now_closest if p in stored_at)
    return held * 2 < len(now_closest)
