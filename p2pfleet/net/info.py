"""The `info` stream protocol: an opted-in node tells an explorer about itself.

specs/work-and-leases.md, section 9: the explorer opens `/p2pfleet/<net>/info/1.0.0` and
sends nothing (it closes its write side at once); the node answers one signed `node_info`
record and closes. A node whose owner has not opted in (`node.info_opt_in`, default off)
does not offer the protocol, so the explorer's negotiation fails, which it treats like a
reset. `node_info` carries nothing private (specs/privacy.md): software version, coarse
state, uptime rounded down to a whole hour, and two counters over all publishers.

Node side: `info_handler`. Explorer side: `fetch_node_info`, which verifies the signature
and that the signer is the peer it asked, and measures the round trip.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from ..identity import Identity, peer_id_from_key
from ..wire import errors as E
from ..wire.envelope import Opened, open_envelope, seal
from ..wire.kinds import KINDS, NodeInfo
from . import streams

log = logging.getLogger(__name__)

INFO_LIFETIME_MS = 10 * 60_000  # the record says what holds now; explorers re-ask
INFO_CAP = KINDS["node_info"].max_body + streams.FRAME_OVERHEAD
HOUR_S = 3600


@dataclass(frozen=True)
class InfoFacts:
    """What the node says about itself right now (no private field exists)."""

    sw_version: str
    state: str
    uptime_s: float
    shards_done: int = 0
    results_accepted: int = 0


def node_info_body(facts: InfoFacts, *, now_ms: int, seq: int,
                   lifetime_ms: int = INFO_LIFETIME_MS) -> NodeInfo:
    """The `node_info` record for `facts`; uptime rounded down to a whole hour (privacy.md)."""
    uptime = int(max(0.0, facts.uptime_s)) // HOUR_S * HOUR_S
    return NodeInfo(seq=seq, exp=now_ms + lifetime_ms, sw_version=facts.sw_version,
                    state=facts.state, uptime_s=uptime, shards_done=max(0, facts.shards_done),
                    results_accepted=max(0, facts.results_accepted))


def info_handler(identity: Identity, network: str, facts: Callable[[], InfoFacts], *,
                 next_seq: Callable[[int], int] | None = None,
                 clock: Callable[[], float] = time.time) -> Callable[[Any], Any]:
    """A stream handler answering one signed `node_info` and closing.

    `next_seq(now_ms)` gives the record's sequence number (the node persists it, so a
    restarted node still publishes newer records); without it, the Unix ms is used."""

    async def handle(stream: Any) -> None:
        try:
            now_ms = int(clock() * 1000)
            seq = next_seq(now_ms) if next_seq is not None else now_ms
            envelope = seal(node_info_body(facts(), now_ms=now_ms, seq=seq), identity, network)
            await streams.write_envelope(stream, envelope, timeout=10.0)
        except Exception as exc:  # noqa: BLE001 - a failed answer costs the asker nothing
            log.debug("info stream: %s", exc)
            await streams.reset_quietly(stream)
            return
        await streams.close_quietly(stream)

    return handle


@dataclass(frozen=True)
class InfoReply:
    """The outcome of asking one peer: its verified record, or why there is none."""

    peer_id: str
    opened: Opened | None
    rtt_s: float | None
    error: str | None = None

    @property
    def info(self) -> NodeInfo | None:
        return self.opened.body if self.opened is not None else None


async def fetch_node_info(mesh: Any, peer_id: str, *, timeout: float = 10.0,
                          clock: Callable[[], float] = time.time) -> InfoReply:
    """Ask `peer_id` for its `node_info` over `mesh`; never raises for the peer's faults.

    The reply is believed only if it opens as a valid, unexpired `node_info` of this
    network signed by `peer_id` itself."""
    from .mesh import MeshError

    try:
        stream = await mesh.open_stream(peer_id, "info", timeout=timeout)
    except MeshError as exc:
        return InfoReply(peer_id, None, None, f"not offered (not opted in?): {exc}")
    started = trio.current_time()  # the round trip: empty request out, record back
    try:
        with trio.fail_after(timeout):
            await stream.close_write()  # the request is empty
            data = await streams.read_envelope(stream, INFO_CAP, timeout=timeout)
        rtt = trio.current_time() - started
    except (streams.StreamError, trio.TooSlowError, Exception) as exc:  # noqa: BLE001
        await streams.reset_quietly(stream)
        return InfoReply(peer_id, None, None, f"no node_info: {type(exc).__name__}: {exc}")
    await streams.close_quietly(stream)
    try:
        opened = open_envelope(data, mesh.names.network, now_ms=int(clock() * 1000),
                               kinds={"node_info"})
    except E.WireError as exc:
        return InfoReply(peer_id, None, rtt, f"invalid node_info: {exc}")
    signer = peer_id_from_key(opened.signer)
    if signer != peer_id:
        return InfoReply(peer_id, None, rtt, f"node_info signed by {signer}, not by the peer asked")
    return InfoReply(peer_id, opened, rtt)
