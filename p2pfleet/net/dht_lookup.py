"""Record put and get by our own Kademlia walk over GET_VALUE (fix 5 for py-libp2p 0.8.1).

Upstream problems this avoids:
- A FIND_NODE server refuses keys longer than 50 bytes that are not multihashes ("FIND_NODE
  key is not a valid PeerId"), so `KadDHT.put_value` cannot find the peers closest to a
  record key such as /p2pfleet/<net>/node/1/<peer-id> (75+ bytes) beyond its own routing
  table: on a larger network records land on the wrong peers.
- `KadDHT.get_value` returns a locally held copy without asking anyone, so a node that once
  cached a record never sees its newer sequence numbers (a car's "leaving" record stays
  "available" to it until expiry).

GET_VALUE answers carry the responder's closest peers for any key, so one iterative walk
gives both the closest peers (targets for a put) and every copy they hold (for a get).
The newest valid copy wins (the validator's `select`), the local copy included; copies
older than the winner are corrected on the peers that held them, as Kademlia does.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from libp2p.kad_dht.utils import sort_peer_ids_by_distance, xor_distance

log = logging.getLogger(__name__)

K = 20          # replication: the k closest peers hold a record
ALPHA = 3       # parallel queries per round
QUERY_TIMEOUT_S = 5.0
GET_QUORUM = 0  # copies a get collects before it ends; 0: all k closest (MeshSettings.dht_get_quorum)


@dataclass
class WalkStats:
    """What one lookup cost: rounds of parallel queries (hops), GET_VALUE RPCs sent and the
    answers they got (summed over the walks that share it), and why the others failed:
    no answer within the query timeout, or an error (by exception name)."""

    rounds: int = 0
    rpcs: int = 0
    responses: int = 0
    timeouts: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def failed(self, exc: Exception) -> None:
        """Count a request that raised `exc`."""
        name = type(exc).__name__
        self.errors[name] = self.errors.get(name, 0) + 1


def start_shortlist(dht: Any, key: bytes, k: int) -> list[Any]:
    """Where a walk starts: the routing table's closest peers and the connected ones,
    nearest first, never this host."""
    host_id = dht.host.get_id()
    shortlist = list(dht.routing_table.find_local_closest_peers(key, k))
    for peer in dht.host.get_connected_peers():
        if peer not in shortlist:
            shortlist.append(peer)
    return [p for p in sort_peer_ids_by_distance(key, shortlist) if p != host_id]


async def query_rounds(key: bytes, shortlist: list[Any], query: Callable[[Any], Awaitable[None]],
                       *, k: int, alpha: int, stats: Any,
                       enough: Callable[[], bool] | None = None,
                       lockstep: bool = False) -> None:
    """Kademlia queries of the k closest unqueried peers, `alpha` in flight, until none is
    left (or `enough()`). `query(peer)` appends the closer peers it learns to `shortlist`;
    `stats` counts rounds (the hops: a peer named by an answer of hop h is queried at hop
    h + 1) and rpcs.

    A query ending starts the next at once, so one slow or dead peer delays nothing else
    (at 200 busy hosts, rounds that waited for their slowest query took the 5 s timeout
    each and a get's deadline ended its walk after 2 of them); once `enough()` holds after an
    answer, the queries still in flight are cancelled. `lockstep`: rounds of alpha
    that each wait for all their queries, `enough()` checked between rounds (fix 18's
    "no closer peer in a round" needs rounds)."""
    queried: set[Any] = set()
    hop: dict[Any, int] = {p: 1 for p in shortlist}
    if lockstep:
        while not (enough is not None and enough()):
            shortlist[:] = sort_peer_ids_by_distance(key, shortlist)
            pending = [p for p in shortlist[:k] if p not in queried][:alpha]
            if not pending:
                return
            queried.update(pending)
            stats.rounds += 1
            stats.rpcs += len(pending)
            async with trio.open_nursery() as nursery:
                for peer in pending:
                    nursery.start_soon(query, peer)
        return
    done_send, done_recv = trio.open_memory_channel[Any](math.inf)

    async def run(peer: Any) -> None:
        try:
            await query(peer)
        finally:
            done_send.send_nowait(peer)

    in_flight = 0
    async with trio.open_nursery() as nursery:
        while True:
            if not (enough is not None and enough()):
                shortlist[:] = sort_peer_ids_by_distance(key, shortlist)
                for peer in [p for p in shortlist[:k] if p not in queried][:alpha - in_flight]:
                    queried.add(peer)
                    in_flight += 1
                    stats.rpcs += 1
                    # named by a query still in flight: at least one hop past the last
                    stats.rounds = max(stats.rounds, hop.setdefault(peer, stats.rounds + 1))
                    nursery.start_soon(run, peer)
            if in_flight == 0:
                return
            answered = await done_recv.receive()
            in_flight -= 1
            if enough is not None and enough():  # the spec's "cancel outstanding requests"
                nursery.cancel_scope.cancel()
                return
            for p in shortlist:  # the peers its answer named are one hop further
                hop.setdefault(p, hop[answered] + 1)


async def walk(dht: Any, key: bytes, *, k: int = K, alpha: int = ALPHA,
               timeout: float = QUERY_TIMEOUT_S,
               stats: WalkStats | None = None,
               learn: bool = False,
               until_no_closer: bool = False,
               found: dict[Any, bytes] | None = None,
               quorum: int = 0,
               counts: Callable[[bytes], bool] | None = None) -> tuple[list[Any], dict[Any, bytes]]:
    """Iterative lookup of `key`: returns (the k closest responding peers, {peer: value}).

    With `learn`, every peer that really answered (we hold a connection to it after the
    query) enters the routing table: how the table fills (net/dht_refresh.py). With
    `until_no_closer`, the walk ends at the first round that named no peer closer to the key
    than the closest known before it (Kademlia's original termination) instead of querying
    all k closest: enough for a walk that only explores (fix 18), not for a put or get.
    `found`, if given, receives each value as it arrives: what a walk cut short by its
    caller's deadline had found is not lost (at 200 busy hosts a get holding a copy from
    its first round returned nothing when the deadline ended the walk).

    With `quorum` > 0, the walk ends (queries in flight cancelled) once that many peers
    returned a value that `counts(value)` accepts: the libp2p specification's Q for value
    retrieval. Values that do not count (forged, expired, unreadable) never end a walk."""
    stats = stats if stats is not None else WalkStats()
    host_id = dht.host.get_id()
    shortlist = start_shortlist(dht, key, k)
    responded: list[Any] = []
    values: dict[Any, bytes] = found if found is not None else {}

    async def query(peer: Any) -> None:
        with trio.move_on_after(timeout) as waited:
            try:
                result = await dht.value_store._get_from_peer(
                    peer, key, return_record=True, return_closer_peers=True)
            except Exception as exc:  # noqa: BLE001 - a failing peer is just not counted
                log.debug("GET_VALUE to %s failed: %s", peer, exc)
                stats.failed(exc)
                return
            if not isinstance(result, tuple):
                return
            record, closer = result
            # py-libp2p answers a failed dial with (None, []) just like a live peer that
            # holds nothing and knows no closer peers (common in small fleets), so both
            # count as responses: a dead put target costs a timeout, a skipped live one
            # would miss the record
            responded.append(peer)
            stats.responses += 1  # counted now: the caller's deadline may end the walk
            if learn and dht.host.get_network().get_connections(peer):
                # it answered a DHT request, so it serves the DHT: no identify check needed
                await dht.add_peer(peer, skip_server_mode_check=True)
            if record is not None and getattr(record, "value", None):
                values[peer] = bytes(record.value)
                if quorum > 0 and (counts is None or counts(values[peer])):
                    counted.append(peer)
            for p in closer or []:
                if p != host_id and p not in shortlist:
                    shortlist.append(p)
        if waited.cancelled_caught:
            stats.timeouts += 1

    counted: list[Any] = []  # peers whose value counts toward the quorum
    best: list[int] = []  # the closest distance known before the last round

    def no_closer() -> bool:
        if not shortlist:
            return True
        nearest = min(xor_distance(target, hashlib.sha256(p.to_bytes()).digest())
                      for p in shortlist)
        stop = bool(best) and nearest >= best[0]
        best[:] = [min([nearest, *best])]
        return stop

    target = hashlib.sha256(key).digest()
    enough = (no_closer if until_no_closer
              else (lambda: len(counted) >= quorum) if quorum > 0 else None)
    await query_rounds(key, shortlist, query, k=k, alpha=alpha, stats=stats,
                       enough=enough, lockstep=until_no_closer)
    closest = sort_peer_ids_by_distance(key, responded)[:k]
    return closest, values


async def store_at(dht: Any, peers: list[Any], key: bytes, value: bytes,
                   timeout: float = QUERY_TIMEOUT_S, accepted: set[Any] | None = None,
                   stats: WalkStats | None = None) -> int:
    """Store `value` at each peer; returns how many accepted it (added to `accepted`).
    `stats` counts the PUT_VALUE requests, those accepted (`responses`), timeouts and errors."""
    stored = 0
    stats = stats if stats is not None else WalkStats()

    async def one(peer: Any) -> None:
        nonlocal stored
        stats.rpcs += 1
        with trio.move_on_after(timeout) as waited:
            try:
                if await dht.value_store._store_at_peer(peer, key, value):
                    stored += 1
                    stats.responses += 1
                    if accepted is not None:
                        accepted.add(peer)
            except Exception as exc:  # noqa: BLE001
                log.debug("PUT_VALUE to %s failed: %s", peer, exc)
                stats.failed(exc)
        if waited.cancelled_caught:
            stats.timeouts += 1

    async with trio.open_nursery() as nursery:
        for peer in peers:
            nursery.start_soon(one, peer)
    return stored
