"""Count the bytes this process moves over libp2p TCP connections.

The vehicle policy enforces a daily transfer cap (a car must not burn its owner's data), so
the node needs to know how many bytes it sent and received. py-libp2p 0.8.1 keeps no byte
counters, so we count at its TCP stream class (`libp2p.io.trio.TrioTCPStream`), below
Noise and Yamux: what is counted is what crosses the wire (payload plus encryption and
framing overhead, without TCP/IP headers). One counter per process: a node runs one host.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Traffic:
    sent: int = 0
    received: int = 0

    @property
    def total(self) -> int:
        return self.sent + self.received


TRAFFIC = Traffic()
_installed = False


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
        return data

    async def write(self, data: bytes) -> None:  # type: ignore[no-untyped-def]
        await original_write(self, data)
        TRAFFIC.sent += len(data)

    TrioTCPStream.read = read  # type: ignore[method-assign]
    TrioTCPStream.write = write  # type: ignore[method-assign]
    _installed = True
    return TRAFFIC
