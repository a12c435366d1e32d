"""A relay's per-peer and per-address limits on reservations and circuits.

py-libp2p 0.8.1's relay (`CircuitV2Protocol`) caps reservations only in total and circuits
only per destination, and reserves for whatever peer id a RESERVE names (it then fails to
answer, but the slot is taken): one connection could fill every slot with made-up ids,
one address with a few dozen keys could too, and one peer opening circuits to a car could
take all of that car's circuits. `LimitedRelay` refuses, before py-libp2p sees the request:

- a RESERVE naming a peer other than the one asking (PERMISSION_DENIED);
- a new reservation from an address that already holds `reservations_per_ip`
  (RESOURCE_LIMIT_EXCEEDED; renewing one it holds is always allowed);
- a CONNECT from a peer already holding `circuits_per_peer` circuits at this relay, from
  an address holding `circuits_per_ip`, or when the relay carries `circuits_total` circuits
  already (RESOURCE_LIMIT_EXCEEDED): py-libp2p's own caps (per destination, times the
  reservations) would let a relay carry hundreds.

An "address" is libp2p_fixes.source_address: an IPv4 address or an IPv6 /64, since one
IPv6 subscriber holds a whole /64 and can give every identity an address of its own.

Refusals are counted by reason (`refused`, shown as `relay_refused` in `node status`).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode

from .libp2p_fixes import source_address

log = logging.getLogger(__name__)

RESERVATIONS_PER_IP = 8   # go-libp2p's default
CIRCUITS_PER_PEER = 4     # circuits one source peer may hold open at this relay
CIRCUITS_PER_IP = 8       # circuits all source peers at one address may hold open
CIRCUITS_TOTAL = 32       # circuits the relay carries at once (signalling only: small)


@dataclass(frozen=True)
class RelayShares:
    """What one address, one peer, and everyone together may hold at this relay."""

    reservations_per_ip: int = RESERVATIONS_PER_IP
    circuits_per_peer: int = CIRCUITS_PER_PEER
    circuits_per_ip: int = CIRCUITS_PER_IP
    circuits_total: int = CIRCUITS_TOTAL

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"relay share {name} must be a whole number >= 1, not {value!r}")


def remote_source(stream: Any) -> str:
    """The source address (IPv4 address or IPv6 /64) a stream's connection comes from
    ("unknown" if it has none)."""
    try:
        remote = stream.muxed_conn.secured_conn.get_remote_address()
    except Exception:  # noqa: BLE001 - e.g. a relayed connection: no address of its own
        remote = None
    return source_address(str(remote[0])) if remote else "unknown"


class LimitedRelay(CircuitV2Protocol):
    """py-libp2p's Circuit Relay v2 with per-peer, per-address and total shares."""

    def __init__(self, host: Any, *, shares: RelayShares | None = None, **kwargs: Any) -> None:
        super().__init__(host, **kwargs)
        self.shares = shares or RelayShares()
        self.refused: Counter[str] = Counter()
        self._reserved_from: dict[Any, str] = {}   # peer -> address of its reservation
        self._circuits_of_peer: Counter[Any] = Counter()
        self._circuits_of_ip: Counter[str] = Counter()

    def _reservations_at(self, ip: str) -> int:
        held = self.resource_manager._reservations
        self.resource_manager._clean_expired()
        for peer in [p for p in self._reserved_from if p not in held]:
            del self._reserved_from[peer]
        return sum(1 for a in self._reserved_from.values() if a == ip)

    async def _refuse(self, stream: Any, code: StatusCode, reason: str, detail: str) -> None:
        self.refused[reason] += 1
        log.info("relay refused %s: %s", stream.muxed_conn.peer_id, detail)
        await self._send_status(stream, code, detail)

    async def _handle_reserve(self, stream: Any, msg: Any) -> None:
        peer = stream.muxed_conn.peer_id
        if msg.HasField("peer") and msg.peer.id and msg.peer.id != peer.to_bytes():
            await self._refuse(stream, StatusCode.PERMISSION_DENIED, "reservation for another peer",
                               "a reservation is for the asking peer only")
            return
        ip = remote_source(stream)
        held = self.resource_manager._reservations.get(peer)
        renewing = held is not None and not held.is_expired()
        cap = self.shares.reservations_per_ip
        if not renewing and self._reservations_at(ip) >= cap:
            await self._refuse(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED,
                               "reservations per address",
                               f"{ip} already holds {cap} reservations")
            return
        # counted before the first await, so concurrent requests see it
        self._reserved_from[peer] = ip
        try:
            await super()._handle_reserve(stream, msg)
        finally:
            if peer not in self.resource_manager._reservations:
                self._reserved_from.pop(peer, None)

    async def _handle_connect(self, stream: Any, msg: Any) -> None:
        source, ip, shares = stream.muxed_conn.peer_id, remote_source(stream), self.shares
        if self._circuits_of_peer[source] >= shares.circuits_per_peer:
            await self._refuse(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED, "circuits per peer",
                               f"{source} already holds {shares.circuits_per_peer} circuits here")
            return
        if self._circuits_of_ip[ip] >= shares.circuits_per_ip:
            await self._refuse(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED, "circuits per address",
                               f"{ip} already holds {shares.circuits_per_ip} circuits here")
            return
        if sum(self._circuits_of_peer.values()) >= shares.circuits_total:
            await self._refuse(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED, "circuits in total",
                               f"this relay carries {shares.circuits_total} circuits already")
            return
        self._circuits_of_peer[source] += 1
        self._circuits_of_ip[ip] += 1
        try:
            await super()._handle_connect(stream, msg)  # returns when the circuit ends
        finally:
            for counter, key in ((self._circuits_of_peer, source), (self._circuits_of_ip, ip)):
                counter[key] -= 1
                if counter[key] <= 0:
                    del counter[key]
