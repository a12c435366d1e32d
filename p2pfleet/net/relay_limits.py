"""A relay's per-peer and per-address limits on reservations and circuits.

py-libp2p 0.8.1's relay (`CircuitV2Protocol`) caps reservations only in total and circuits
only per destination, and reserves for whatever peer id a RESERVE names (it then fails to
answer, but the slot is taken): one connection could fill every slot with made-up ids,
one address with a few dozen keys could too, and one peer opening circuits to a car could
take all of that car's circuits. `LimitedRelay` refuses, before py-libp2p sees the request:

- a RESERVE naming a peer other than the one asking (PERMISSION_DENIED);
- a new reservation from an address that already holds RESERVATIONS_PER_IP
  (RESOURCE_LIMIT_EXCEEDED; renewing one it holds is always allowed);
- a CONNECT from a peer already holding CIRCUITS_PER_PEER circuits at this relay, or from
  an address holding CIRCUITS_PER_IP (RESOURCE_LIMIT_EXCEEDED).

Refusals are counted by reason (`refused`, shown as `relay_refused` in `node status`).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode

log = logging.getLogger(__name__)

RESERVATIONS_PER_IP = 8   # go-libp2p's default
CIRCUITS_PER_PEER = 4     # circuits one source peer may hold open at this relay
CIRCUITS_PER_IP = 8       # circuits all source peers at one address may hold open


def remote_ip(stream: Any) -> str:
    """The IP address a stream's connection comes from ("unknown" if it has none)."""
    try:
        return str(stream.muxed_conn.secured_conn.get_remote_address()[0])
    except Exception:  # noqa: BLE001 - e.g. a relayed connection: no address of its own
        return "unknown"


class LimitedRelay(CircuitV2Protocol):
    """py-libp2p's Circuit Relay v2 with per-peer and per-address shares."""

    def __init__(self, host: Any, **kwargs: Any) -> None:
        super().__init__(host, **kwargs)
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
        ip = remote_ip(stream)
        held = self.resource_manager._reservations.get(peer)
        renewing = held is not None and not held.is_expired()
        if not renewing and self._reservations_at(ip) >= RESERVATIONS_PER_IP:
            await self._refuse(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED,
                               "reservations per address",
                               f"{ip} already holds {RESERVATIONS_PER_IP} reservations")
            return
        # counted before the first await, so concurrent requests see it
        self._reserved_from[peer] = ip
        try:
            await super()._handle_reserve(stream, msg)
        finally:
            if peer not in self.resource_manager._reservations:
                self._reserved_from.pop(peer, None)

    async def _handle_connect(self, stream: Any, msg: Any) -> None:
        source, ip = stream.muxed_conn.peer_id, remote_ip(stream)
        if self._circuits_of_peer[source] >= CIRCUITS_PER_PEER:
            await self._refuse(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED, "circuits per peer",
                               f"{source} already holds {CIRCUITS_PER_PEER} circuits here")
            return
        if self._circuits_of_ip[ip] >= CIRCUITS_PER_IP:
            await self._refuse(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED, "circuits per address",
                               f"{ip} already holds {CIRCUITS_PER_IP} circuits here")
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
