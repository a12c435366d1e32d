"""Hostile blob holders for tests: answer a `blob` stream with the real v2 wire format
(a manifest sealed by the holder, then raw chunks) and break one rule of it on purpose."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import trio

from p2pfleet.net import streams
from p2pfleet.wire import blobcodec
from p2pfleet.wire.envelope import open_envelope, seal
from p2pfleet.wire.kinds import BlobRequest

from fleetkit import NETWORK

KiB = 1024


async def read_request(stream: Any) -> BlobRequest:
    raw = await streams.read_envelope(stream, 2048, 5)
    return open_envelope(raw, NETWORK).body


def wire_chunks(data: bytes, chunk_size: int, codec: str) -> list[bytes]:
    return [blobcodec.encode_chunk(data[o:o + chunk_size], codec)
            for o in range(0, len(data), chunk_size)]


async def answer(stream: Any, identity: Any, req: BlobRequest, data: bytes, *,
                 chunk_size: int = 256 * KiB, codec: str = "none",
                 chunks: list[bytes] | None = None, pace_s: float = 0.0,
                 tamper: Callable[[int, bytes], bytes] | None = None,
                 sent: list[int] | None = None, **manifest_over: Any) -> None:
    """Send `data` (or the given wire `chunks`) as a v2 holder would, from the chunk holding
    the request's offset; `tamper(i, wire)` changes a chunk after its hash went into the
    manifest; `manifest_over` overrides manifest fields; `pace_s` between chunks. Closes
    the stream at the end; a fetcher that hangs up is no error."""
    wire = chunks if chunks is not None else wire_chunks(data, chunk_size, codec)
    enc = blobcodec.Encoding(len(data), chunk_size, codec,
                             b"".join(blobcodec.chunk_hash(w) for w in wire),
                             tuple(len(w) for w in wire))
    m = blobcodec.manifest(enc, req_id=req.req_id, exp=int(time.time() * 1000) + 60_000,
                           digest=req.digest, offset=req.offset)
    m = dataclasses.replace(m, **manifest_over)
    try:
        await streams.write_envelope(stream, seal(m, identity, NETWORK), 5)
        for i in range(m.first, len(wire)):
            if pace_s and i > m.first:
                await trio.sleep(pace_s)
            piece = tamper(i, wire[i]) if tamper else wire[i]
            await stream.write(piece)
            if sent is not None:
                sent.append(i)
    except Exception:  # noqa: BLE001 - the fetcher hangs up on us
        pass
    await streams.close_quietly(stream)
