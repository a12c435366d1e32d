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

Fix 18 (`lean`, MeshSettings.dht_lean_refresh): these walks were nearly all of what an
idle host and a joining host cost in CPU (20 hosts in one process: 0.4-0.5 of a core idle
with the walks, 0.04 without; every DHT request ~5 ms of CPU on each end). go-libp2p-kad-dht
and the Kademlia paper do less, and so do we now:
- a bucket walk only explores, so it ends at the first round that names no peer closer to
  its key (`dht_lookup.walk(until_no_closer=True)`), not once all k closest answered;
- a periodic refresh walks only stale buckets: a bucket (prefix length) that no walk of ours
  (record gets and puts included) visited within the refresh period is refreshed, the rest
  is not (Kademlia's rule, with the period as its hour);
- "refresh sooner while the table is smaller than k" holds only while refreshes still grow
  the table or go mostly unanswered (a fleet of fewer than k + 1 hosts never fills it, and
  answers), and a refresh asked for
  because a put reached few peers backs off, doubling, while walks get answers from fewer
  than half the peers asked or puts keep reaching few peers (busy or departed peers: more
  walks would only add load).
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
    responses: int = 0
    table_before: int = 0
    table_after: int = 0
    cpls: list[int] = field(default_factory=list)  # buckets walked
    fresh: list[int] = field(default_factory=list)  # buckets skipped: walked recently (fix 18)

    @property
    def answered(self) -> float:
        """Share of the requests sent that got an answer (1.0 when none was sent)."""
        return self.responses / self.rpcs if self.rpcs else 1.0


class WalkedBuckets:
    """When a walk of ours last visited each bucket (prefix length with our own key)."""

    def __init__(self) -> None:
        self.at: dict[int, float] = {}

    def note(self, dht: Any, key: bytes, now: float) -> None:
        """A walk for `key` (as py-libp2p hashes it) visited its bucket at `now`."""
        cpl = common_prefix_len(hashlib.sha256(key).digest(), own_position(dht))
        if cpl <= MAX_REFRESH_CPL:
            self.at[cpl] = now

    def stale(self, cpls: list[int], now: float, period: float) -> list[int]:
        return [c for c in cpls if now - self.at.get(c, -float("inf")) >= period]


def next_wait(stats: RefreshStats, *, k: int, table: int, delay: float, period: float,
              lean: bool) -> tuple[float, float]:
    """(wait before the next refresh, the next "sooner" delay) after a refresh.

    Old rule: while the table holds fewer than k peers, wait `delay` and double it. Lean
    (fix 18): only while the last refresh grew the table or fewer than half of its requests
    were answered: an unanswered refresh (a fleet joining all at once keeps every peer busy)
    says nothing of the fleet's size, so it is tried again, backing off; a well answered one
    that found nobody new means a fleet of fewer than k + 1 hosts."""
    growing = stats.table_after > stats.table_before
    if table < k and (growing or not lean or stats.answered < 0.5):
        return delay, min(period, delay * 2)
    return period, delay


def asked_wait(stats: RefreshStats, *, backoff: float, first: float, period: float,
               lean: bool, poor_puts: int = 0) -> tuple[float, float]:
    """(wait before a refresh someone asked for, the next back-off) after a refresh.

    Old rule: `first` always. Lean (fix 18): while fewer than half of the last refresh's
    requests were answered, or puts keep reaching fewer than half of their peers
    (`poor_puts`: such puts in a row, each of which asks for a refresh), the wait doubles up
    to `period`; it drops back to `first` once neither holds. A put that reaches few peers
    on a saturated machine used to ask for a refresh every `first` seconds for good: the
    refresh republished the record (its holders "moved"), the put reached few peers again,
    and the walks kept the machine saturated (issue 15, 200 hosts on 2 cores)."""
    if not lean:
        return first, first
    if stats.answered < 0.5 or poor_puts > 1:
        return backoff, min(period, backoff * 2)
    return first, first


def disable_upstream_refresh(dht: Any) -> None:
    """Fix 23: py-libp2p's KadDHT runs its own routing-table refresh when it starts and every
    10 minutes after (`_run_main_loop`: a full lookup for our own id and one for every
    non-empty bucket, each to its k closest peers, dialling whom it must). It duplicated
    ours, with none of fix 18's economies, and it is synchronised: a fleet that started
    together refreshed all at once 600 s later. At 203 hosts on two cores, the 2 minutes of
    lookups that began ~10 minutes after the start saw 13 answers to 1,487 requests, 572 new
    connections dialled by that refresh among them. The rest of upstream's loop (expiry,
    22-hour republishing) stays; the table is refreshed by `Mesh._refresh_loop` alone."""
    async def refreshed_by_the_mesh() -> None:
        return None

    dht.refresh_routing_table = refreshed_by_the_mesh


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


async def fill(dht: Any, *, k: int, rng: random.Random, lean: bool = False,
               walked: WalkedBuckets | None = None, now: float = 0.0,
               period: float = 0.0) -> RefreshStats:
    """Self-lookup, then one walk per bucket up to the deepest one held + 1.

    With `lean` (fix 18), only the buckets `walked` did not visit within `period` before
    `now`, each walk ending when a round finds nothing closer."""
    stats = RefreshStats(table_before=dht.routing_table.size())
    walk_stats = dht_lookup.WalkStats()
    await dht_lookup.walk(dht, dht.host.get_id().to_bytes(), k=k, stats=walk_stats, learn=True)
    stats.walks += 1
    own = own_position(dht)
    cpls = list(range(0, min(MAX_REFRESH_CPL, deepest_cpl(dht) + 1) + 1))
    stats.cpls = walked.stale(cpls, now, period) if lean and walked is not None else cpls
    stats.fresh = [c for c in cpls if c not in stats.cpls]
    limiter = trio.CapacityLimiter(PARALLEL_WALKS)

    async def bucket(cpl: int) -> None:
        async with limiter:
            key = key_at_cpl(own, cpl, rng)
            await dht_lookup.walk(dht, key, k=k, stats=walk_stats, learn=True,
                                  until_no_closer=lean)
            if walked is not None:
                walked.note(dht, key, now)

    async with trio.open_nursery() as nursery:
        for cpl in stats.cpls:
            nursery.start_soon(bucket, cpl)
    stats.walks += len(stats.cpls)
    stats.rpcs, stats.responses = walk_stats.rpcs, walk_stats.responses
    stats.table_after = dht.routing_table.size()
    return stats


def moved(stored_at: set[Any], now_closest: list[Any]) -> bool:
    """Whether the peers closest to a record's key changed much since we stored it there:
    fewer than half of today's closest hold our copy (by our last put)."""
    if not now_closest:
        return False
    held = sum(1 for p in now_closest if p in stored_at)
    return held * 2 < len(now_closest)
