"""Framing of p2pfleet stream protocols: one varint-length-prefixed envelope per message.

specs/identity-and-wire.md, section 15: a reader checks the length prefix against the
stream's cap before reading the payload, and every read has a timeout. The exchanges on
each protocol are in specs/work-and-leases.md, section 9. These helpers move bytes only;
callers open the envelopes (`wire.open_envelope`) and decide what a violation costs.
"""

from __future__ import annotations

from typing import Any

import trio
from libp2p.utils.varint import encode_uvarint

MAX_STREAM_FRAME = 1024 * 1024
FRAME_OVERHEAD = 256  # envelope fields around a body: cap = largest max_body + this
DEFAULT_READ_TIMEOUT_S = 30.0
_MAX_PREFIX = 9


class StreamError(Exception):
    """The peer broke the framing (`offence` says how), or the stream failed."""

    def __init__(self, message: str, offence: str | None = None):
        super().__init__(message)
        self.offence = offence  # reputation offence for the peer, None: not its fault


class StreamClosed(StreamError):
    """The peer closed its write side cleanly before a new message began."""


def frame(envelope: bytes) -> bytes:
    return encode_uvarint(len(envelope)) + envelope


async def write_envelope(stream: Any, envelope: bytes, timeout: float = DEFAULT_READ_TIMEOUT_S) -> None:
    with trio.fail_after(timeout):
        await stream.write(frame(envelope))


async def _read_exactly(stream: Any, n: int, buffered: bytearray) -> bytes:
    while len(buffered) < n:
        chunk = await stream.read(n - len(buffered))
        if not chunk:
            raise StreamError(f"stream ended {n - len(buffered)} bytes short of a frame",
                              "protocol-error")
        buffered.extend(chunk)
    out = bytes(buffered[:n])
    del buffered[:n]
    return out


async def read_envelope(stream: Any, cap: int, timeout: float = DEFAULT_READ_TIMEOUT_S) -> bytes:
    """Read one framed envelope of at most `cap` bytes; StreamClosed at a clean end."""
    cap = min(cap, MAX_STREAM_FRAME)
    try:
        with trio.fail_after(timeout):
            prefix = bytearray()
            while True:
                try:
                    byte = await stream.read(1)
                except Exception as exc:  # noqa: BLE001 - libp2p raises EOF/reset in many types
                    if not prefix and _is_eof(exc):
                        raise _closed(stream) from None
                    raise StreamError(f"read failed: {type(exc).__name__}: {exc}") from None
                if not byte:
                    if prefix:
                        raise StreamError("stream ended inside a length prefix", "protocol-error")
                    raise _closed(stream)
                prefix.append(byte[0])
                if byte[0] < 0x80:
                    break
                if len(prefix) >= _MAX_PREFIX:
                    raise StreamError("length prefix longer than 9 bytes", "protocol-error")
            length = 0
            for shift, b in enumerate(prefix):
                length |= (b & 0x7F) << (7 * shift)
            if length > cap:
                raise StreamError(f"{length}-byte frame over the {cap}-byte cap", "oversized")
            if length == 0:
                raise StreamError("empty frame", "protocol-error")
            try:
                return await _read_exactly(stream, length, bytearray())
            except StreamError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise StreamError(f"read failed: {type(exc).__name__}: {exc}") from None
    except trio.TooSlowError:
        raise StreamError(f"no complete frame within {timeout:.0f} s", "stalled-stream") from None


async def read_exactly(stream: Any, n: int, timeout: float = DEFAULT_READ_TIMEOUT_S) -> bytes:
    """Read exactly `n` unframed bytes (blob v2 chunks, whose lengths the manifest gave):
    StreamClosed at a clean end before the first byte, StreamError ("protocol-error") at an
    end inside them, ("stalled-stream") when they are not all there within `timeout`."""
    buf = bytearray()
    try:
        with trio.fail_after(timeout):
            while len(buf) < n:
                try:
                    piece = await stream.read(n - len(buf))
                except Exception as exc:  # noqa: BLE001 - libp2p raises EOF/reset in many types
                    if not _is_eof(exc):
                        raise StreamError(f"read failed: {type(exc).__name__}: {exc}") from None
                    piece = b""
                if not piece:
                    if not buf:
                        raise _closed(stream)
                    if was_reset(stream):
                        raise StreamError("stream reset by the peer")
                    raise StreamError(f"stream ended {n - len(buf)} bytes short of a "
                                      f"{n}-byte chunk", "protocol-error")
                buf += piece
    except trio.TooSlowError:
        raise StreamError(f"{len(buf)} of a {n}-byte chunk within {timeout:.0f} s",
                          "stalled-stream") from None
    return bytes(buf)


class ChunkReader:
    """Unframed bytes of known lengths (blob v2 chunks) read from `stream` in large pieces,
    never more than `limit` bytes in all, handed out `n` at a time by `read_parts` as views
    of the pieces read, not copied (py-libp2p's yamux returns a frame, <= 64 KiB, per read,
    so a chunk usually spans several)."""

    PIECE = 1 << 20

    def __init__(self, stream: Any, limit: int):
        self.stream = stream
        self.left = limit  # bytes still to read from the stream
        self._piece: memoryview = memoryview(b"")
        self._at = 0

    async def _read_piece(self) -> memoryview:
        try:
            piece = await self.stream.read(min(self.PIECE, self.left))
        except Exception as exc:  # noqa: BLE001 - libp2p raises EOF/reset in many types
            if not _is_eof(exc):
                raise StreamError(f"read failed: {type(exc).__name__}: {exc}") from None
            piece = b""
        if len(piece) > self.left:  # a stream must not hand out more than was asked
            raise StreamError(f"read {len(piece)} bytes, asked for at most {self.left}")
        self.left -= len(piece)
        return memoryview(piece)

    async def read_parts(self, n: int, timeout: float = DEFAULT_READ_TIMEOUT_S
                         ) -> list[memoryview]:
        """The next `n` bytes (n >= 1) as read-only views, in order, with `read_exactly`'s
        errors: StreamClosed at a clean end before the first byte, StreamError
        ("protocol-error") at an end inside them, ("stalled-stream") when they are not all
        there within `timeout`."""
        if not 0 < n <= self.left + len(self._piece) - self._at:
            raise ValueError(f"{n} bytes asked, {self.left + len(self._piece) - self._at} "
                             "left to read")
        parts: list[memoryview] = []
        got = 0
        try:
            with trio.fail_after(timeout):
                while got < n:
                    if self._at == len(self._piece):
                        self._piece, self._at = await self._read_piece(), 0
                        if not self._piece:
                            if not got:
                                raise _closed(self.stream)
                            if was_reset(self.stream):
                                raise StreamError("stream reset by the peer")
                            raise StreamError(f"stream ended {n - got} bytes short of a "
                                              f"{n}-byte chunk", "protocol-error")
                    take = min(n - got, len(self._piece) - self._at)
                    parts.append(self._piece[self._at:self._at + take])
                    self._at += take
                    got += take
        except trio.TooSlowError:
            raise StreamError(f"{got} of a {n}-byte chunk within {timeout:.0f} s",
                              "stalled-stream") from None
        return parts


def _is_eof(exc: Exception) -> bool:
    return isinstance(exc, EOFError)  # libp2p's StreamEOF is one


def was_reset(stream: Any) -> bool:
    """py-libp2p 0.8.1's yamux shows a reset to the reading side as a clean end of stream;
    the muxed stream remembers the reset. A reset is never an acknowledgement."""
    muxed = getattr(stream, "muxed_stream", None)
    return bool(getattr(muxed, "reset_received", False))


def _closed(stream: Any) -> StreamError:
    if was_reset(stream):
        return StreamError("stream reset by the peer")
    return StreamClosed("stream closed")


async def read_all_envelopes(stream: Any, cap: int, limit: int,
                             timeout: float = DEFAULT_READ_TIMEOUT_S) -> list[bytes]:
    """Read envelopes until the peer closes cleanly; more than `limit` is a violation."""
    out: list[bytes] = []
    while True:
        try:
            env = await read_envelope(stream, cap, timeout)
        except StreamClosed:
            return out
        out.append(env)
        if len(out) > limit:
            raise StreamError(f"more than {limit} messages on one stream", "protocol-error")


async def close_quietly(stream: Any) -> None:
    with trio.move_on_after(2.0, shield=True):
        try:
            await stream.close()
        except Exception:  # noqa: BLE001 - the stream may already be gone
            pass


async def reset_quietly(stream: Any) -> None:
    with trio.move_on_after(2.0, shield=True):
        try:
            await stream.reset()
        except Exception:  # noqa: BLE001
            pass


def remote_peer(stream: Any) -> Any:
    return stream.muxed_conn.peer_id


def remote_ip(stream: Any) -> str | None:
    """The IP address the stream's connection comes from (None when unknown or relayed)."""
    try:
        addr = stream.get_remote_address()
    except Exception:  # noqa: BLE001
        return None
    if not addr:
        return None
    return str(addr[0])
