"""Count the bytes this process moves over libp2p TCP connections.

The vehicle policy enforces a daily transfer cap (a car must not burn its owner's data), so
the node needs to know how many bytes it sent and received. py-libp2p 0.8.1 keeps no byte
counters, so we count at its TCP stream class (`libp2p.io.trio.TrioTCPStream`), below
Noise and Yamux: what is counted is what crosses the wire (payload plus encryption and
framing overhead, without TCP/IP headers). One counter per process: a node runs one host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Traffic:
    sent: int = 0
    received: int = 0
    # Bytes of connections not yet attributed to a peer (handshakes; what arrives before the
    # mesh learns whose connection it is). They are the peer's once `attribute` runs; those
    # of connections that never get that far (failed or refused handshakes, half-open
    # sockets, banned peers) stay here and never count toward the transfer cap.
    unattributed: int = 0

    @property
    def total(self) -> int:
        return self.sent + self.received


TRAFFIC = Traffic()


def attribute(conn: Any, budget: Any, peer: str) -> bool:
    """From now on, report the bytes `conn` (a swarm connection) receives and sends to
    `budget.moved(peer, n)`. False if its TCP stream was not found."""
    from libp2p.io.trio import TrioTCPStream

    seen: set[int] = set()
    todo = [conn.muxed_conn]
    while todo:  # the TCP stream sits a few wrappers down (secure session, noise, raw conn)
        obj = todo.pop()
        if id(obj) in seen or len(seen) > 64:
            continue
        seen.add(id(obj))
        if isinstance(obj, TrioTCPStream):
            obj._p2pfleet_peer = (budget, peer)  # type: ignore[attr-defined]
            early = getattr(obj, "_p2pfleet_early", 0)
            if early:
                obj._p2pfleet_early = 0  # type: ignore[attr-defined]
                TRAFFIC.unattributed -= early
                budget.moved(peer, early)
            return True
        for name in ("secured_conn", "conn", "read_writer", "stream", "read_write_closer"):
            child = getattr(obj, name, None)
            if child is not None:
                todo.append(child)
    return False


_installed = False


def _account(stream: Any, n: int) -> None:
    owner = getattr(stream, "_p2pfleet_peer", None)
    if owner is not None:
        owner[0].moved(owner[1], n)
    else:
        stream._p2pfleet_early = getattr(stream, "_p2pfleet_early", 0) + n
        TRAFFIC.unattributed += n


def install() -> Traffic:
    """Start counting (idempotent); returns the process-wide counter."""
    global _installed
    if _installed:
        return TRAFFIC
    from libp2p.io.trio import TrioTCPStream

    original_read, original_write = TrioTCPStream.read, TrioTCPStream.write

    async def read(self, n: int | None = None) -> bytes:  # type: ignore[no-untyped-def]
        data = await original_read(self, n)
        TRAFFIC.received += len(data)
        _account(self, len(data))
        return data

    async def write(self, data: bytes) -> None:  # type: ignore[no-untyped-def]
        await original_write(self, data)
        TRAFFIC.sent += len(data)
        _account(self, len(data))

    TrioTCPStream.read = read  # type: ignore[method-assign]
    TrioTCPStream.write = write  # type: ignore[method-assign]
    _installed = True
    return TRAFFIC
