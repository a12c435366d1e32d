"""Fix 21 for py-libp2p 0.8.1: trimming connections above the high watermark (`trim_connections`).

Upstream's ConnectionPruner (go-libp2p's TrimOpenConns) closes connections once a host holds
more than `high_watermark`, but skips every connection with an open stream "to never
interrupt live traffic". Every connection of our mesh holds a GossipSub stream for as long
as it lives (and often a pooled DHT stream, fix 19), so it never closed anything: a
bootstrap node that a fleet joins through filled to its `max_connections` and refused every
later newcomer (issue 15: at 200 hosts, 62 hosts had no peer after 30 s, and routing tables
held little more than the bootstrap peers, so 98 % of lookups failed).

go-libp2p's connection manager trims whatever the streams, protecting by value. We do the
same, keeping upstream's trigger (a new connection, debounced), grace period and batch of at
most 20, with our own choice of how far and of what may go:
- down to the midpoint of the watermarks, not to the low watermark: the auto-dialler (fix
  17) fills up to the low watermark and our DHT walks dial whom they need, so a host
  trimmed to the low watermark climbed back over the high one and trimmed again, and the
  peers it dropped fell under their own low watermarks and dialled again (issue 15: 40
  hosts in a process held to 0.3 of a core, watermarks 8 and 24, still trimmed and
  auto-dialled ~70 connections a minute each two minutes after joining, each a Noise,
  identify and GossipSub handshake on both ends);
- never a connection within the grace period, nor one carrying live work: a stream of any
  protocol other than the long-lived ones (GossipSub, the DHT, identify push), e.g. a lease
  request, a report or a blob transfer;
- never a peer in our GossipSub mesh (what propagates announcements) nor a protected one;
- of the rest, peers outside our routing table first (a routing-table peer is what our
  next walk dials right back), then inbound before outbound (we chose those we dialled),
  oldest first.
A trimmed peer stays in the routing table, which needs no live connection: a walk dials it
again when it is among the closest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)

MAX_BATCH = 20  # connections closed per trim, as upstream


def busy(conn: Any, long_lived: frozenset[str]) -> bool:
    """Whether the connection carries a stream of a protocol that does work (not long-lived)."""
    try:
        streams = conn.get_streams()
    except Exception:  # noqa: BLE001 - a connection half torn down: leave it to its owner
        return True
    for stream in streams:
        protocol = stream.get_protocol()
        if protocol is None or str(protocol) not in long_lived:
            return True  # a stream still negotiating its protocol counts as work
    return False


def trim_floor(low_watermark: int, high_watermark: int) -> int:
    """How far a trim goes down: the midpoint of the watermarks (see the module docstring)."""
    return max(low_watermark, (low_watermark + high_watermark) // 2)


def trim_order(conns: Iterable[Any], *, now: float, grace_s: float, long_lived: frozenset[str],
               keep: Callable[[Any], bool],
               in_table: Callable[[Any], bool] = lambda peer: False) -> list[Any]:
    """The connections that may be trimmed, first to go first."""
    from libp2p.rcmgr import Direction

    candidates = []
    for conn in conns:
        created = getattr(conn, "_created_at", None)
        if not isinstance(created, (int, float)) or now - created < grace_s:
            continue
        peer = getattr(getattr(conn, "muxed_conn", None), "peer_id", None)
        if peer is None or keep(peer) or busy(conn, long_lived):
            continue
        outbound = getattr(conn, "direction", None) == Direction.OUTBOUND
        candidates.append((in_table(peer), outbound, created, conn))
    candidates.sort(key=lambda c: c[:3])
    return [c[3] for c in candidates]


def trim_connections(swarm: Any, long_lived: Iterable[str], keep: Callable[[Any], bool],
                     in_table: Callable[[Any], bool] = lambda peer: False,
                     on_trim: Callable[[int, list[Any]], None] | None = None) -> None:
    """Fix 21: replace the swarm's pruning decision (see the module docstring). `keep(peer)`:
    a peer whose connections must stay (our GossipSub mesh peers, protected peers);
    `in_table(peer)`: in our routing table (trimmed last); `on_trim(connections before,
    peers of the connections closed)` after each trim."""
    pruner = swarm.connection_pruner
    lived = frozenset(long_lived)

    async def maybe_prune() -> None:
        config = swarm.connection_config
        conns = list(swarm.get_connections())
        if len(conns) <= config.high_watermark:
            return
        tags = getattr(swarm, "tag_store", None)

        def kept(peer: Any) -> bool:
            return keep(peer) or (tags is not None and tags.is_protected(peer))

        order = trim_order(conns, now=time.time(), grace_s=config.grace_period,
                           long_lived=lived, keep=kept, in_table=in_table)
        floor = trim_floor(config.low_watermark, config.high_watermark)
        batch = order[:max(0, min(MAX_BATCH, len(conns) - floor))]
        if batch:
            log.info("trimming %d of %d connections (high watermark %d)", len(batch),
                     len(conns), config.high_watermark)
        for conn in batch:
            try:
                await conn.close()
            except Exception as exc:  # noqa: BLE001 - already closing: fine
                log.debug("trimming a connection: %s", exc)
        if batch:
            pruner._last_trim_time = time.time()
            if on_trim is not None:
                on_trim(len(conns), [c.muxed_conn.peer_id for c in batch])

    pruner._maybe_prune_connections = maybe_prune
