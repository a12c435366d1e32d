"""Fix 19 for py-libp2p 0.8.1: DHT requests reuse open streams (`reuse_dht_streams`).

Upstream, every DHT request (GET_VALUE, PUT_VALUE, FIND_NODE, ...) opens a new yamux
stream, negotiates the protocol with multistream-select, writes the length prefix and the
message as two frames, reads the answer and closes the stream: about a dozen yamux frames,
each its own Noise message and socket write, for one request and its answer. With ~5 ms of
CPU per request on each end, the walks that fill and refresh routing tables were what kept
a host busy (net/dht_refresh.py). The libp2p Kademlia specification lets a client send
several requests on one stream, one after the other, and py-libp2p's server (as go's and
rust's) reads requests in a loop until the stream ends.

Here `host.new_stream` for the DHT protocol hands out a `_PooledStream`. When upstream's
request code closes it after reading one complete answer, the stream goes back to a per-peer
pool instead of closing; the next request to that peer within `idle_s` takes it (never one
the peer has closed or reset, never one with a request or an answer half-way, e.g. a
query cancelled by its deadline, nor one holding unread bytes past the answer: those are
closed as before; and an answer frame whose type or key is not the request's, a copy from a
peer that answered an earlier request twice arriving after the stream was reused, is
dropped and the stream is not pooled again). Streams idle longer are
closed, below every server's idle timeout (ours: `MeshSettings.dht_idle_timeout_s`, fix 3),
so a server does not close a stream as we send on it. The length prefix is sent with the
message in one frame. Servers need nothing new to answer: fix 15 serves each request on its own,
fairly, whatever stream it came on. Only one thing upstream's server did per stream must now
happen per request (`learn_peer_per_request`): it adds the asking peer to its routing table
when a stream opens, and that add fails while the peer's addresses are not known yet (its
first request, right after connecting); with a stream per request the next one added it.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import trio

from .streams import close_quietly, reset_quietly

log = logging.getLogger(__name__)

MAX_POOLED_PER_PEER = 2  # idle streams kept per peer (walks send 1 request per peer at once)


def _alive(stream: Any) -> bool:
    """Open both ways, and holding no unread bytes: between requests, bytes beyond the
    answer read (a peer that answered twice) would be read as the next request's answer."""
    muxed = getattr(stream, "muxed_stream", None)
    if muxed is None:
        return False
    if any(getattr(muxed, flag, False)
           for flag in ("closed", "send_closed", "recv_closed", "reset_received")):
        return False
    buffers = getattr(getattr(muxed, "conn", None), "stream_buffers", None)
    if buffers is None or buffers.get(getattr(muxed, "stream_id", None)):
        return False  # unread bytes (or a muxer whose buffer we cannot see: not reused)
    conn = getattr(stream, "muxed_conn", None)
    return not getattr(conn, "is_closed", False)


class _FrameTracker:
    """Follows varint-length-prefixed frames as they are read, to know when an answer is
    complete (upstream reads the prefix byte by byte, then the body)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.varint, self.shift, self.body_left, self.in_prefix = 0, 0, 0, True
        self.started = False

    @property
    def complete(self) -> bool:
        return self.started and not self.in_prefix and self.body_left == 0

    def feed(self, data: bytes) -> None:
        for i, byte in enumerate(data):
            if not self.in_prefix:
                take = min(self.body_left, len(data) - i)
                self.body_left -= take
                if take < len(data) - i:  # bytes past one answer: not ours to pool
                    self.body_left = -1
                return
            self.started = True
            self.varint |= (byte & 0x7F) << self.shift
            self.shift += 7
            if not byte & 0x80:
                self.in_prefix, self.body_left = False, self.varint
        return


def _type_and_key(data: bytes, *, prefixed: bool = True) -> tuple[int, bytes] | None:
    """A Kademlia message's (type, key), from a frame with or without its length prefix;
    None if it does not parse (upstream deals with it as before)."""
    from libp2p.kad_dht.pb.kademlia_pb2 import Message
    from libp2p.utils.varint import decode_varint_with_size

    try:
        start = 0
        if prefixed:
            length, start = decode_varint_with_size(data)
            if length != len(data) - start:
                return None  # not one whole frame: nothing to match answers against
        message = Message()
        message.ParseFromString(bytes(data[start:]))
    except Exception:  # noqa: BLE001 - not ours to judge: upstream parses it again
        return None
    return message.type, bytes(message.key)


class _PooledStream:
    """A DHT stream whose close() hands it back to the pool when it is between requests."""

    def __init__(self, stream: Any, pool: "DhtStreamPool", peer: Any):
        self._stream, self._pool, self._peer = stream, pool, peer
        self._frames = _FrameTracker()
        self._pending_prefix = b""
        self._writes = 0
        self.idle_since = 0.0
        self._request: tuple[int, bytes] | None = None  # (type, key) of the request sent
        self._answer = b""  # the rest of the answer frame being read
        self._stale = False  # a frame that answered an earlier request came: not pooled

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    async def write(self, data: bytes) -> None:
        if self._frames.started:  # a new request on this stream: its answer starts afresh
            self._frames.reset()
        self._writes += 1
        if not self._pending_prefix and len(data) <= 10 and data and not data[-1] & 0x80:
            self._pending_prefix = bytes(data)  # a length prefix: send it with the message
            return
        data, self._pending_prefix = self._pending_prefix + bytes(data), b""
        self._request = _type_and_key(data)
        await self._stream.write(data)

    async def _flush(self) -> None:
        if self._pending_prefix:
            data, self._pending_prefix = self._pending_prefix, b""
            await self._stream.write(data)

    async def read(self, n: int | None = None) -> bytes:
        await self._flush()
        while not self._answer:
            self._answer = await self._next_answer()
        take = len(self._answer) if n is None or n < 0 else n
        data, self._answer = self._answer[:take], self._answer[take:]
        self._frames.feed(data)
        return data

    async def _next_answer(self) -> bytes:
        """The next whole frame (with its length prefix) answering the request sent. A frame
        of another type, or for another key, answers an earlier request (a peer that
        answered twice, its copy arriving after the stream was reused): it is dropped and
        the stream is not pooled again. Upstream then reads the frame from memory, not a
        byte at a time through the muxer."""
        from libp2p.kad_dht.common import MAX_DHT_MESSAGE_SIZE
        from libp2p.utils.varint import encode_uvarint, read_varint_prefixed_bytes_limited

        body = await read_varint_prefixed_bytes_limited(self._stream, MAX_DHT_MESSAGE_SIZE)
        answered = _type_and_key(body, prefixed=False)
        if (self._request is not None and answered is not None
                and (answered[0] != self._request[0]
                     or (answered[1] and answered[1] != self._request[1]))):
            self._stale = True
            return b""
        return encode_uvarint(len(body)) + body

    async def close(self) -> None:
        try:
            await self._flush()  # nothing written is ever dropped
            reusable = (self._writes and self._frames.complete and not self._pending_prefix
                        and not self._stale and _alive(self._stream))
            self._writes = 0
            self._frames.reset()
            if reusable and self._pool.give_back(self):
                return
            await close_quietly(self._stream)
        except trio.Cancelled:
            # A request cancelled half-way (its query's deadline, or a get that reached its
            # quorum) closes here under that cancellation, and every await raises at once:
            # the stream stayed open on both ends, and the server counted a stall against us
            # when its idle timeout ran out. A reset, shielded from the cancellation, ends both.
            await reset_quietly(self._stream)
            raise

    async def reset(self) -> None:
        await self._stream.reset()


class DhtStreamPool:
    """Idle DHT streams per peer, each reused within `idle_s` of its last answer."""

    def __init__(self, idle_s: float):
        if idle_s <= 0:
            raise ValueError(f"DHT stream reuse window must be positive, got {idle_s}")
        self.idle_s = idle_s
        self.idle: dict[Any, list[_PooledStream]] = defaultdict(list)
        self.opened = self.reused = 0

    def take(self, peer: Any) -> _PooledStream | None:
        now = trio.current_time()
        streams = self.idle.get(peer)
        while streams:
            stream = streams.pop()
            if now - stream.idle_since < self.idle_s and _alive(stream._stream):
                self.reused += 1
                return stream
            self._close_later(stream._stream)
        self.idle.pop(peer, None)
        return None

    def give_back(self, stream: _PooledStream) -> bool:
        streams = self.idle[stream._peer]
        if len(streams) >= MAX_POOLED_PER_PEER:
            return False
        stream.idle_since = trio.current_time()
        streams.append(stream)
        return True

    def expire(self) -> None:
        """Close every stream idle for `idle_s` or longer."""
        now = trio.current_time()
        for peer in list(self.idle):
            keep = []
            for stream in self.idle[peer]:
                if now - stream.idle_since < self.idle_s and _alive(stream._stream):
                    keep.append(stream)
                else:
                    self._close_later(stream._stream)
            if keep:
                self.idle[peer] = keep
            else:
                del self.idle[peer]

    def _close_later(self, stream: Any) -> None:
        nursery = getattr(self, "nursery", None)
        if nursery is not None:
            nursery.start_soon(close_quietly, stream)

    async def run(self) -> None:
        """Close expired idle streams, every half reuse window, until cancelled."""
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            while True:
                await trio.sleep(self.idle_s / 2)
                self.expire()


def reuse_dht_streams(host: Any, protocol: str, idle_s: float) -> DhtStreamPool:
    """Fix 19: hand out pooled streams for `protocol` from `host.new_stream`; run the
    returned pool's `run()` in the host's nursery to close idle streams."""
    pool = DhtStreamPool(idle_s)
    upstream = host.new_stream

    async def new_stream(peer_id: Any, protocol_ids: Any, *args: Any, **kwargs: Any) -> Any:
        if [str(p) for p in protocol_ids] != [protocol]:
            return await upstream(peer_id, protocol_ids, *args, **kwargs)
        reused = pool.take(peer_id)
        if reused is not None:
            return reused
        stream = await upstream(peer_id, protocol_ids, *args, **kwargs)
        pool.opened += 1
        return _PooledStream(stream, pool, peer_id)

    host.new_stream = new_stream
    return pool


class _LearningStream:
    """An inbound DHT stream that adds its peer to the routing table as each request after
    the first begins (upstream adds it once, when the stream opens)."""

    def __init__(self, stream: Any, dht: Any):
        self._stream, self._dht = stream, dht
        self._answered = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    async def write(self, data: bytes) -> None:
        self._answered = True
        await self._stream.write(data)

    async def read(self, n: int | None = None) -> bytes:
        if self._answered:
            self._answered = False
            peer = self._stream.muxed_conn.peer_id
            if not self._dht.routing_table.peer_in_table(peer):
                try:
                    await self._dht.add_peer(peer, skip_server_mode_check=True)
                except Exception as exc:  # noqa: BLE001 - as upstream: the request is served
                    log.debug("adding DHT peer %s: %s", peer, exc)
        return await self._stream.read(n)


def learn_peer_per_request(dht: Any) -> None:
    """The server half of fix 19: wrap `dht.handle_stream` (after fix 15, before fix 14)."""
    inner = dht.handle_stream

    async def handle(stream: Any) -> None:
        await inner(_LearningStream(stream, dht))

    dht.handle_stream = handle
