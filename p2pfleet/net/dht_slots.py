"""Fix 15 for py-libp2p 0.8.1: DHT service slots shared fairly (issue 14, item 2).

Upstream: KadDHT.handle_stream holds one of 12 slots (`_inbound_limiter`, for all peers
together) for the whole life of an inbound stream, waiting for requests included, and
resets every stream that arrives while the 12 are taken. Twelve stalled streams, or one
peer asking FIND_NODE on 12 streams back to back, denied the DHT to everyone.

Here a slot is held only while one complete request is served, never while a stream waits
for its next request: the stream proxy reads a whole request frame itself, then waits for a
slot, then hands the frame to the DHT's handler; the slot is given back when the handler
asks for the next request (its answer is written by then) or returns. Waiting requests are
served round-robin across peers, so one peer's flood waits behind its own requests, not
everyone else's; one peer has at most `max_serving_per_peer` requests in service at once.
A peer may hold at most `max_streams_per_peer` open DHT streams and one source address
`max_streams_per_source` (many identities from one address); a stream over either cap is
reset and costs its peer (`DHT_FLOOD`). A stream's first request must be complete within
`first_request_s` of the stream opening (`STALLED_REQUEST`, counted as a stall), and an
answer written within `reply_s` (a peer that does not read its answers holds no slot).

Why not py-libp2p's resource manager (libp2p/rcmgr): its per-protocol, per-peer stream
limits (`set_protocol_peer_stream_limit`, checked by `acquire_scoped_stream`) are never
called by the swarm: an inbound stream is admitted with `acquire_stream(peer, direction)`
before multistream-select has named its protocol, so rcmgr cannot tell a DHT stream from
any other. It would also only refuse: it has no per-source-address stream count, no fair
order among waiting requests, no deadline for a stream's first request, and no hook to
score the peer down.
"""

from __future__ import annotations

import ipaddress
import logging
import math
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from .libp2p_fixes import IDLE_TIMEOUT, _peer_of, source_address

log = logging.getLogger(__name__)

DHT_FLOOD = "over its cap of open DHT streams"
STALLED_REQUEST = IDLE_TIMEOUT  # reported as a stall, like fixes 3 and 7
ViolationFn = Callable[[Any, str, str], None]  # (peer_id, protocol, reason)


@dataclass(frozen=True)
class DhtSlotLimits:
    service_slots: int = 8            # requests served at once, all peers together
    max_serving_per_peer: int = 2     # of those, at most this many for one peer
    max_streams_per_peer: int = 8     # open inbound DHT streams per peer
    max_streams_per_source: int = 16  # per source address (IPv4) or /64 (IPv6)
    first_request_s: float = 3.0      # a stream's first request is complete within this
    reply_s: float = 5.0              # an answer is written within this
    max_request: int = 64 * 1024      # bytes in one request frame

    def __post_init__(self) -> None:
        for name in ("service_slots", "max_serving_per_peer", "max_streams_per_peer",
                     "max_streams_per_source", "max_request"):
            if getattr(self, name) < 1:
                raise ValueError(f"DhtSlotLimits.{name} must be at least 1, "
                                 f"got {getattr(self, name)}")
        if not (self.first_request_s > 0 and self.reply_s > 0):
            raise ValueError("DhtSlotLimits.first_request_s and reply_s must be positive, got "
                             f"{self.first_request_s} and {self.reply_s}")


class FairSlots:
    """`total` slots handed out round-robin across the peers waiting for one."""

    def __init__(self, total: int, per_peer: int):
        self.total, self.per_peer = total, per_peer
        self.busy = 0
        self.serving: Counter[str] = Counter()
        self._waiting: OrderedDict[str, deque[trio.Event]] = OrderedDict()  # turn order

    def _take(self, peer: str) -> None:
        self.busy += 1
        self.serving[peer] += 1

    async def acquire(self, peer: str) -> None:
        if self.busy < self.total and self.serving[peer] < self.per_peer \
                and not self._waiting.get(peer):
            self._take(peer)
            return
        granted = trio.Event()
        self._waiting.setdefault(peer, deque()).append(granted)
        try:
            await granted.wait()
        except BaseException:
            if granted.is_set():     # granted as we were cancelled: pass it on
                self.release(peer)
            else:
                queue = self._waiting.get(peer)
                if queue is not None:
                    queue.remove(granted)
                    if not queue:
                        del self._waiting[peer]
            raise

    def release(self, peer: str) -> None:
        self.busy -= 1
        self.serving[peer] -= 1
        if self.serving[peer] <= 0:
            del self.serving[peer]
        self._dispatch()

    def _dispatch(self) -> None:
        while self.busy < self.total:
            for peer in self._waiting:  # the peer whose turn it is first
                if self.serving[peer] < self.per_peer:
                    break
            else:
                return
            queue = self._waiting[peer]
            granted = queue.popleft()
            if queue:
                self._waiting.move_to_end(peer)  # its next request waits for its next turn
            else:
                del self._waiting[peer]
            self._take(peer)
            granted.set()

    def waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values())


class _Stalled(Exception):
    pass


class _FairStream:
    """A DHT stream proxy: reads one whole request, waits for a fair slot, then hands it on."""

    def __init__(self, stream: Any, peer: str, slots: FairSlots, limits: DhtSlotLimits):
        self._stream = stream
        self._peer = peer
        self._slots = slots
        self._limits = limits
        self._buffer = b""
        self._holding = False
        self._requests = 0
        self._deadline = trio.current_time() + limits.first_request_s
        self.violation: str | None = None

    def release(self) -> None:
        if self._holding:
            self._holding = False
            self._slots.release(self._peer)

    async def read(self, n: int | None = None) -> bytes:
        if not self._buffer:
            self.release()  # the previous answer is written: the slot goes to the next turn
            request = await self._read_request()
            if not request:
                return b""
            await self._slots.acquire(self._peer)
            self._holding = True
            self._buffer = request
        size = len(self._buffer) if n is None or n < 0 else n
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    async def _read_request(self) -> bytes:
        """One varint-prefixed frame (prefix included); b"" at a clean end of stream."""
        from libp2p.io.exceptions import IncompleteReadError, MessageTooLarge
        from libp2p.network.stream.exceptions import StreamEOF
        from libp2p.utils.varint import decode_uvarint

        first = self._requests == 0
        self._requests += 1
        deadline = self._deadline if first else math.inf  # later ones: fixes 3 and 7
        got = bytearray()
        with trio.move_on_at(deadline):
            try:
                while not got or got[-1] & 0x80:
                    if len(got) >= 10:
                        raise IncompleteReadError("varint length prefix over 64 bits",
                                                  expected_bytes=1, received_bytes=1)
                    byte = await self._stream.read(1)
                    if not byte:
                        return bytes(got)  # end of stream; the handler decides
                    got += byte
                length = decode_uvarint(bytes(got))
                if length > self._limits.max_request:
                    raise MessageTooLarge(f"request of {length} bytes, cap "
                                          f"{self._limits.max_request}")
                end = len(got) + length
                while len(got) < end:
                    chunk = await self._stream.read(end - len(got))
                    if not chunk:
                        return bytes(got)
                    got += chunk
            except (StreamEOF, IncompleteReadError):
                # the end of the stream (cut off or not) reaches the handler's own read
                return bytes(got)
            return bytes(got)
        self.violation = STALLED_REQUEST
        raise _Stalled(f"first DHT request not complete within {self._limits.first_request_s} s")

    async def write(self, data: bytes) -> None:
        with trio.move_on_after(self._limits.reply_s):
            await self._stream.write(data)
            return
        self.violation = STALLED_REQUEST
        raise _Stalled(f"DHT answer not read within {self._limits.reply_s} s")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _source_of(stream: Any, prefix: int = 64) -> str | None:
    try:
        host = str(stream.get_remote_address()[0])
        ipaddress.ip_address(host.split("%")[0])
    except Exception:  # noqa: BLE001 - no address (e.g. a relayed stream): not counted
        return None
    return source_address(host, prefix)


class DhtSlots:
    """Fair DHT service (see the module docstring); counters for tests and metrics."""

    def __init__(self, limits: DhtSlotLimits, protocol: str, on_violation: ViolationFn):
        self.limits = limits
        self.protocol = protocol
        self.on_violation = on_violation
        self.slots = FairSlots(limits.service_slots, limits.max_serving_per_peer)
        self.streams: Counter[str] = Counter()
        self.sources: Counter[str] = Counter()
        self.refused = 0
        self.stalled = 0

    def wrap(self, handler: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Awaitable[None]]:
        async def fair_handler(stream: Any) -> None:
            peer_id = _peer_of(stream)
            peer, source = str(peer_id), _source_of(stream)
            if (self.streams[peer] >= self.limits.max_streams_per_peer
                    or (source is not None
                        and self.sources[source] >= self.limits.max_streams_per_source)):
                self.refused += 1
                log.debug("DHT stream from %s (%s) refused: %s", peer, source, DHT_FLOOD)
                self.on_violation(peer_id, self.protocol, DHT_FLOOD)
                await _reset(stream)
                return
            self.streams[peer] += 1
            if source is not None:
                self.sources[source] += 1
            fair = _FairStream(stream, peer, self.slots, self.limits)
            try:
                await handler(fair)
            except Exception as exc:  # noqa: BLE001 - fix 2 reports it unless we know why
                if fair.violation is None:
                    raise
                log.debug("DHT stream from %s: %s", peer, exc)
            finally:
                fair.release()
                _drop(self.streams, peer)
                if source is not None:
                    _drop(self.sources, source)
            if fair.violation is not None:  # the DHT swallows read/write errors: report here
                self.stalled += 1
                self.on_violation(peer_id, self.protocol, fair.violation)
                await _reset(stream)

        return fair_handler


def _drop(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


async def _reset(stream: Any) -> None:
    try:
        await stream.reset()
    except Exception:  # noqa: BLE001 - the stream may already be gone
        pass


def share_dht_slots(host: Any, dht: Any, protocol: str, limits: DhtSlotLimits,
                    on_violation: ViolationFn) -> DhtSlots:
    """Serve `dht`'s inbound streams through fair slots (fix 15); returns the counters.
    Call after creating the DHT and installing the wrappers of `host.set_stream_handler`
    (fixes 2, 7, 13), before fixes that wrap `dht.handle_stream` itself (fix 14), and
    before the DHT runs."""
    from libp2p.custom_types import TProtocol

    slots = DhtSlots(limits, protocol, on_violation)
    # upstream's 12 slots, held per stream, would still reset streams our slots admit
    dht._inbound_limiter = trio.CapacityLimiter(math.inf)
    # innermost, next to the DHT: later fixes that wrap dht.handle_stream wrap this one
    dht.handle_stream = slots.wrap(dht.handle_stream)
    if protocol in {str(p) for p in host.get_mux().handlers}:  # a server's KadDHT registered
        host.set_stream_handler(TProtocol(protocol), dht.handle_stream)  # it in its constructor
    return slots
