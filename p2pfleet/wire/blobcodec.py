"""Blob v2 chunks: cutting a blob into chunks, encoding them for the wire, and checking what a
holder sends against its manifest (specs/work-and-leases.md, sections 5 and 9).

Pure CPU work, no I/O: the holder's cache builds an `Encoding` once per blob
(`encode_blob`), the fetcher turns a received `blob_manifest` into a `Plan` (`plan`, which
checks the manifest against the request) and passes every chunk's wire bytes through
`Plan.decode`, which checks the chunk's BLAKE3 hash and decodes it with its raw size bounded
before any decompression. Every refusal is a `ChunkViolation` naming the reputation offence
and what was wrong.

Codecs (per blob, declared in the manifest): `none` (wire bytes = raw bytes), `zstd` (one
zstd frame per chunk), `zstd-shuffle4` (the chunk's bytes byte-shuffled with element size 4,
then one zstd frame: float32 and int32 tensors compress far better so). Under a compressing
codec a chunk whose encoding would not be smaller than its raw bytes is sent raw; its wire
length then equals its raw length, which is how a receiver tells. The holder keeps a codec
only when it shrinks the whole blob by at least `MIN_SAVING`, so the wire is never larger
than raw and nobody pays decompression for nothing; it picks the codec on a sample of
chunks and encodes the blob once, with that codec only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import struct

import blake3
import numpy as np
import zstandard

from .kinds import BLOB_CODECS, BLOB_MAX_CHUNK, BLOB_MAX_CHUNKS, BLOB_MIN_CHUNK, BlobManifest

CHUNK_SIZE = 256 * 1024
HASH_LEN = 32
ZSTD_LEVEL = 1  # level 3 and up gain < 2% on tensors here and cost 2x the time
MIN_SAVING = 1 / 32  # keep a codec only if it saves at least this share of the raw bytes
SHUFFLE_WIDTH = 4

Buffer = bytes | bytearray | memoryview  # bytes-like; chunks are read through views, not copied


class ChunkViolation(Exception):
    """A manifest or chunk breaks the rules: `offence` is what it costs the holder."""

    def __init__(self, offence: str, reason: str):
        super().__init__(reason)
        self.offence = offence


class SizeMismatch(Exception):
    """The manifest's total size is not the one the fetcher expects. The digest fixes the
    size, so either side may be wrong: the source fails, without a penalty."""


def chunk_hash(wire: Buffer | Sequence[Buffer]) -> bytes:
    """BLAKE3 of a chunk's wire bytes, given whole or as consecutive parts."""
    if isinstance(wire, (bytes, bytearray, memoryview)):
        return blake3.blake3(wire).digest()
    h = blake3.blake3()
    for part in wire:
        h.update(part)
    return h.digest()


def chunk_size_for(total_size: int) -> int:
    """The reference holder's chunk size: 256 KiB, doubled while the blob would need more
    than `BLOB_MAX_CHUNKS` chunks (ValueError past 16 GiB)."""
    size = CHUNK_SIZE
    while -(-total_size // size) > BLOB_MAX_CHUNKS:
        size *= 2
    if size > BLOB_MAX_CHUNK:
        raise ValueError(f"a {total_size}-byte blob needs more than {BLOB_MAX_CHUNKS} chunks "
                         f"of {BLOB_MAX_CHUNK} bytes")
    return size


def chunk_count(total_size: int, chunk_size: int) -> int:
    return -(-total_size // chunk_size)


def shuffle(data: bytes | memoryview, width: int = SHUFFLE_WIDTH) -> bytes:
    """Byte j of element i goes to j * n + i (n = len // width elements); the len % width
    trailing bytes stay at the end as they are."""
    n = len(data) // width
    body = np.frombuffer(data, dtype=np.uint8, count=n * width).reshape(n, width).T.tobytes()
    return body + bytes(data[n * width:])


def unshuffle(data: bytes | memoryview, width: int = SHUFFLE_WIDTH) -> bytes:
    n = len(data) // width
    body = np.frombuffer(data, dtype=np.uint8, count=n * width).reshape(width, n).T.tobytes()
    return body + bytes(data[n * width:])


def encode_chunk(raw: bytes | memoryview, codec: str) -> bytes:
    """The wire bytes of one chunk under `codec`: its encoding if that is smaller, else raw."""
    if codec == "none":
        return bytes(raw)
    if codec not in BLOB_CODECS:
        raise ValueError(f"unknown blob codec {codec!r}; known: {', '.join(BLOB_CODECS)}")
    src = shuffle(raw) if codec == "zstd-shuffle4" else raw
    out = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(src)
    return out if len(out) < len(raw) else bytes(raw)


def decode_chunk(wire: Buffer, codec: str, raw_len: int) -> Buffer:
    """The raw bytes of one chunk, exactly `raw_len` of them, or ChunkViolation. A raw chunk
    is `wire` itself, not a copy. A zstd frame must declare its content size, equal to
    `raw_len`, and is decoded into at most that many bytes (libzstd refuses to write past a
    declared size): a bomb is refused before it inflates."""
    if len(wire) == raw_len or codec == "none":
        if len(wire) != raw_len:
            raise ChunkViolation("invalid-message",
                                 f"a raw chunk of {len(wire)} bytes, expected {raw_len}")
        return wire
    if len(wire) > raw_len:
        raise ChunkViolation("invalid-message", f"a {len(wire)}-byte encoding of a "
                             f"{raw_len}-byte chunk (an encoding is never larger)")
    try:
        declared = zstandard.frame_content_size(wire)
    except zstandard.ZstdError as exc:
        raise ChunkViolation("invalid-message", f"not a zstd frame: {exc}") from None
    if declared != raw_len:
        what = "no content size" if declared < 0 else f"a content size of {declared} bytes"
        raise ChunkViolation("invalid-message", f"zstd frame declares {what}, the chunk is "
                             f"{raw_len} bytes (refused before decompressing)")
    dec = zstandard.ZstdDecompressor().decompressobj()
    try:
        out = dec.decompress(wire)
    except zstandard.ZstdError as exc:
        raise ChunkViolation("invalid-message", f"zstd frame does not decode within its "
                             f"declared {raw_len} bytes: {exc}") from None
    if not dec.eof or dec.unused_data or len(out) != raw_len:
        raise ChunkViolation("invalid-message", f"zstd frame decodes to {len(out)} bytes"
                             f"{'' if dec.eof else ', unfinished'}"
                             f"{', with bytes after it' if dec.unused_data else ''}; "
                             f"expected one frame of {raw_len}")
    return unshuffle(out) if codec == "zstd-shuffle4" else out


@dataclass(frozen=True)
class Encoding:
    """How a holder sends one blob: the manifest's fields that do not depend on a request."""

    total_size: int
    chunk_size: int
    codec: str
    hashes: bytes
    sizes: tuple[int, ...]

    @property
    def wire_size(self) -> int:
        return sum(self.sizes)

    def wire_offset(self, index: int) -> int:
        """Where chunk `index` starts in the concatenated wire bytes."""
        return sum(self.sizes[:index])

    def raw_len(self, index: int) -> int:
        return min(self.chunk_size, self.total_size - index * self.chunk_size)


#: Chunks a codec is tried on before it encodes a whole blob (spread over the blob). Trying
#: every codec on every chunk cost the publisher ~2x the encoding it kept: 0.23 s of CPU per
#: 19 MB ResNet-50 input shard, 0.6 s for its 102 MB model (tools/bench_e2e.py profile).
SAMPLE_CHUNKS = 4


def _sample(n: int) -> list[int]:
    """Indices of up to SAMPLE_CHUNKS chunks spread evenly over `n` (all when few)."""
    if n <= 2 * SAMPLE_CHUNKS:
        return list(range(n))
    return [(2 * k + 1) * n // (2 * SAMPLE_CHUNKS) for k in range(SAMPLE_CHUNKS)]


def encode_blob(data: bytes, chunk_size: int | None = None,
                codecs: tuple[str, ...] = ("zstd-shuffle4", "zstd")) -> tuple[Encoding, bytes]:
    """The encoding of `data` and its wire bytes (all chunks, concatenated): of `codecs`, the
    one that saves most on a sample of chunks (the first on a tie), if it saves at least
    `MIN_SAVING` there and then on the whole blob; else `none`."""
    size = len(data)
    chunk_size = chunk_size or chunk_size_for(size)
    if not BLOB_MIN_CHUNK <= chunk_size <= BLOB_MAX_CHUNK:
        raise ValueError(f"chunk_size must be {BLOB_MIN_CHUNK}..{BLOB_MAX_CHUNK}, got {chunk_size}")
    if chunk_count(size, chunk_size) > BLOB_MAX_CHUNKS:
        raise ValueError(f"{size} bytes in chunks of {chunk_size} is more than "
                         f"{BLOB_MAX_CHUNKS} chunks")
    view = memoryview(data)
    pieces = [view[o:o + chunk_size] for o in range(0, size, chunk_size)]
    picked = _sample(len(pieces))
    tried: dict[str, list[bytes]] = {}
    best: tuple[int, str] | None = None
    sample_raw = sum(len(pieces[i]) for i in picked)
    for codec in codecs:
        tried[codec] = [encode_chunk(pieces[i], codec) for i in picked]
        total = sum(map(len, tried[codec]))
        if total <= sample_raw * (1 - MIN_SAVING) and (best is None or total < best[0]):
            best = (total, codec)
    codec, wire = "none", [bytes(p) for p in pieces]
    if best is not None:
        done = dict(zip(picked, tried[best[1]]))
        full = [done[i] if i in done else encode_chunk(p, best[1]) for i, p in enumerate(pieces)]
        if sum(map(len, full)) <= size * (1 - MIN_SAVING):
            codec, wire = best[1], full
    enc = Encoding(size, chunk_size, codec, b"".join(chunk_hash(w) for w in wire),
                   tuple(len(w) for w in wire))
    return enc, b"".join(wire)


def manifest(enc: Encoding, *, req_id: bytes, exp: int, digest: bytes,
             offset: int) -> BlobManifest:
    """The manifest answering a request for bytes from `offset` on."""
    return BlobManifest(req_id=req_id, exp=exp, digest=digest, total_size=enc.total_size,
                        chunk_size=enc.chunk_size, codec=enc.codec,
                        first=offset // enc.chunk_size, hashes=enc.hashes,
                        sizes=pack_sizes(enc.sizes))


def pack_sizes(sizes: tuple[int, ...]) -> bytes:
    return struct.pack(f">{len(sizes)}I", *sizes)


@dataclass(frozen=True)
class Plan:
    """A manifest that passed the checks: which chunks follow, how long each is on the wire,
    and how to check and decode them."""

    enc: Encoding
    first: int
    end: int  # one past the last chunk that follows
    skip: int  # raw bytes of the first chunk before the requested offset

    def chunks(self) -> range:
        return range(self.first, self.end)

    def wire_len(self, index: int) -> int:
        return self.enc.sizes[index]

    def decode(self, index: int, wire: Buffer) -> Buffer:
        """The raw bytes of chunk `index` from `wire` (a raw chunk: `wire` itself or a view
        of it), hash-checked and decoded; the first chunk without the bytes before the
        requested offset. ChunkViolation if it lies."""
        want = self.enc.hashes[index * HASH_LEN:(index + 1) * HASH_LEN]
        if len(wire) != self.enc.sizes[index] or chunk_hash(wire) != want:
            raise ChunkViolation("invalid-message", f"chunk {index} does not hash to the "
                                 "manifest's hash for it")
        raw = decode_chunk(wire, self.enc.codec, self.enc.raw_len(index))
        return memoryview(raw)[self.skip:] if index == self.first and self.skip else raw

    def decode_parts(self, index: int, parts: list[Buffer]) -> list[Buffer]:
        """`decode` of chunk `index` received as consecutive `parts`: the raw bytes as parts
        too (a raw chunk's are the parts themselves: nothing is copied)."""
        want = self.enc.hashes[index * HASH_LEN:(index + 1) * HASH_LEN]
        if sum(map(len, parts)) != self.enc.sizes[index] or chunk_hash(parts) != want:
            raise ChunkViolation("invalid-message", f"chunk {index} does not hash to the "
                                 "manifest's hash for it")
        raw_len = self.enc.raw_len(index)
        if self.enc.sizes[index] == raw_len:  # raw (any codec), checked by decode_chunk's rule
            raw = parts
        else:
            raw = [decode_chunk(b"".join(parts), self.enc.codec, raw_len)]
        return _drop_front(raw, self.skip) if index == self.first and self.skip else raw


def _drop_front(parts: list[Buffer], n: int) -> list[Buffer]:
    """`parts` without their first `n` bytes."""
    out: list[Buffer] = []
    for part in parts:
        if n >= len(part):
            n -= len(part)
            continue
        out.append(memoryview(part)[n:] if n else part)
        n = 0
    return out


def plan(m: BlobManifest, *, req_id: bytes, digest: bytes, offset: int, length: int,
         expected_size: int) -> Plan:
    """Check a manifest against the request it answers (`offset`, `length`) and the size the
    fetcher expects. ChunkViolation (with its offence) if it breaks a rule; SizeMismatch if
    only its size differs."""
    if m.req_id != req_id or m.digest != digest:
        raise ChunkViolation("protocol-error", "manifest answers another request")
    if m.total_size != expected_size:
        raise SizeMismatch(f"it says the blob is {m.total_size} bytes, we expect {expected_size}")
    n = chunk_count(m.total_size, m.chunk_size)
    if n > BLOB_MAX_CHUNKS:
        raise ChunkViolation("invalid-message", f"{n} chunks of {m.chunk_size} bytes, more "
                             f"than {BLOB_MAX_CHUNKS}")
    if len(m.sizes) != 4 * n or len(m.hashes) != n * HASH_LEN:
        raise ChunkViolation("invalid-message", f"{len(m.sizes)} size bytes and "
                             f"{len(m.hashes)} hash bytes for {n} chunks")
    sizes = struct.unpack(f">{n}I", m.sizes)
    enc = Encoding(m.total_size, m.chunk_size, m.codec, m.hashes, sizes)
    for i, w in enumerate(sizes):
        raw = enc.raw_len(i)
        if w < 1 or w > raw or (m.codec == "none" and w != raw):
            raise ChunkViolation("invalid-message", f"chunk {i} is {w} bytes on the wire, "
                                 f"its raw size is {raw} (codec {m.codec})")
    want_first = offset // m.chunk_size
    if m.first != want_first:
        raise ChunkViolation("protocol-error", f"manifest starts at chunk {m.first}, the "
                             f"request's offset {offset} is in chunk {want_first}")
    stop = min(offset + length, m.total_size)
    end = chunk_count(stop, m.chunk_size) if stop > offset else m.first
    return Plan(enc, m.first, end, offset - m.first * m.chunk_size)


__all__ = ["CHUNK_SIZE", "ChunkViolation", "SizeMismatch", "Encoding", "Plan", "chunk_hash",
           "chunk_size_for", "chunk_count", "shuffle", "unshuffle", "encode_chunk",
           "decode_chunk", "encode_blob", "manifest", "plan", "MIN_SAVING"]
