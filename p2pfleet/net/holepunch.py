"""Hole punching (DCUtR, `/libp2p/dcutr`) over py-libp2p 0.8.1, started by one side only.

py-libp2p's `DCUtRProtocol` drives a punch towards every peer it holds a relayed connection
to, so when two NATed nodes meet through a relay both start a punch at once: their SYNs
leave seconds apart, each side's first SYN reaches a NAT with no mapping yet, and both
punches miss. The DCUtR specification has only the side that *received* the relayed
connection start: it sends CONNECT, measures the round trip, sends SYNC and dials RTT/2
later, while the side that dialled through the relay answers and dials as soon as SYNC
arrives, so both SYNs cross the two NATs at about the same moment (TCP simultaneous open).

`HolePunch` keeps py-libp2p's exchange and dialling (from the listen port, to the peer's
predicted address: its NAT's address and its listen port) and replaces the driver: only
inbound relayed connections are punched, and each outcome is kept per peer for `node
status` and logged ("direct", or why the punch failed).
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from libp2p.relay.circuit_v2.dcutr import MAX_HOLE_PUNCH_ATTEMPTS, DCUtRProtocol

log = logging.getLogger(__name__)

DRIVE_EVERY_S = 1.0   # look for inbound relayed connections to upgrade this often
RETRY_AFTER_S = 20.0  # a failed attempt is tried again after this (3 attempts per peer)
MAX_OUTCOMES = 256    # peers whose last outcome `node status` shows

FAILED_WHY = ("no direct connection after dialling {addrs} from our listen port: the NAT "
              "on one side maps each destination to its own port (symmetric NAT) or "
              "filters the peer's SYN; staying on the relay")


def _relayed(conn: Any) -> bool:
    """Whether the connection runs over a relay; remembered on the connection once its
    addresses are known (they do not change): the drive loop asks every second for every
    connection, and `Multiaddr.__str__` was most of an idle host's hole-punch cost."""
    known = getattr(conn, "_p2pfleet_relayed", None)
    if known is not None:
        return known
    try:
        addrs = conn.get_transport_addresses() or []
    except Exception:  # noqa: BLE001 - no addresses known: not marked relayed
        return False
    relayed = any("/p2p-circuit" in str(a) for a in addrs)
    if addrs:
        try:
            conn._p2pfleet_relayed = relayed
        except AttributeError:  # a connection type without a __dict__: asked again next time
            pass
    return relayed


def _inbound(conn: Any) -> bool:
    """Whether the remote side opened this connection (we received it)."""
    secured = getattr(getattr(conn, "muxed_conn", None), "secured_conn", None)
    return getattr(secured, "is_initiator", True) is False


class HolePunch(DCUtRProtocol):
    """py-libp2p's DCUtR with the spec's single initiator and a per-peer outcome."""

    def __init__(self, host: Any, *, clock: Any = trio.current_time) -> None:
        super().__init__(host)
        self._clock = clock
        self.outcomes: dict[str, str] = {}     # peer id -> "direct" or why not
        self._next_try: dict[Any, float] = {}  # peer -> when a failed punch may be retried

    def report(self) -> dict[str, str]:
        return dict(self.outcomes)

    def _note(self, peer: Any, outcome: str) -> None:
        self.outcomes.pop(str(peer), None)
        self.outcomes[str(peer)] = outcome
        while len(self.outcomes) > MAX_OUTCOMES:
            self.outcomes.pop(next(iter(self.outcomes)))

    async def _handle_dcutr_stream(self, stream: Any) -> None:
        """The answering side (it dialled through the relay): note a punch that worked."""
        peer = stream.muxed_conn.peer_id
        await super()._handle_dcutr_stream(stream)
        if await self._verify_direct_connection(peer):
            self._note(peer, "direct")

    async def _auto_drive_loop(self) -> None:
        while True:
            await trio.sleep(DRIVE_EVERY_S)
            for peer in self._to_punch():
                try:
                    await self._punch(peer)
                except trio.Cancelled:
                    raise
                except Exception as exc:  # noqa: BLE001 - one peer's failure ends no loop
                    log.warning("hole punch to %s failed: %s: %s", peer, type(exc).__name__, exc)

    def _to_punch(self) -> list[Any]:
        """Peers that reached us through a relay and that we hold no direct connection to."""
        network = self.host.get_network()
        now, chosen = self._clock(), []
        for peer, conns in list((getattr(network, "connections", {}) or {}).items()):
            conns = conns if isinstance(conns, list) else [conns]
            if (peer == self.host.get_id() or peer in self._in_progress
                    or self._hole_punch_attempts.get(peer, 0) >= MAX_HOLE_PUNCH_ATTEMPTS
                    or now < self._next_try.get(peer, 0.0)):
                continue
            if not any(_inbound(c) for c in conns):
                continue  # we dialled it: the other side punches (cheap test first)
            if any(not _relayed(c) for c in conns):
                continue  # already direct
            if any(_relayed(c) and _inbound(c) for c in conns):
                chosen.append(peer)
        return chosen

    async def _punch(self, peer: Any) -> None:
        if await self.initiate_hole_punch(peer):
            self._note(peer, "direct")
            log.info("hole punch to %s: direct connection", peer)
            return
        self._next_try[peer] = self._clock() + RETRY_AFTER_S
        if len(self._next_try) > 4 * MAX_OUTCOMES:
            self._next_try.pop(next(iter(self._next_try)))
        try:
            addrs = [str(a) for a in self.host.get_peerstore().addrs(peer)
                     if "/p2p-circuit" not in str(a)]
        except Exception:  # noqa: BLE001 - a peer the peerstore forgot
            addrs = []
        why = FAILED_WHY.format(addrs=", ".join(addrs[:4]) or "no address")
        attempts = self._hole_punch_attempts.get(peer, 0)
        self._note(peer, f"failed (attempt {attempts} of {MAX_HOLE_PUNCH_ATTEMPTS}): {why}")
        log.warning("hole punch to %s failed (attempt %d of %d): %s", peer, attempts,
                    MAX_HOLE_PUNCH_ATTEMPTS, why)
