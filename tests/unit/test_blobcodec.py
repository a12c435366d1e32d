"""Blob v2 chunks (p2pfleet/wire/blobcodec.py): encoding, the manifest checks, the per-chunk
checks, compression bombs; and the cache's stored encoding (p2pfleet/store/blobcache.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import struct

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfleet.store.blobcache import BlobCache
from p2pfleet.wire import blobcodec as bc

KiB = 1024
REQ = b"r" * 16


def manifest_for(data: bytes, offset: int = 0, **kw) -> tuple[bc.Encoding, bytes, object]:
    enc, wire = bc.encode_blob(data, **kw)
    m = bc.manifest(enc, req_id=REQ, exp=1, digest=hashlib.sha256(data).digest(), offset=offset)
    return enc, wire, m


def receive(data: bytes, m, wire: bytes, offset: int = 0) -> bytes:
    """What a fetcher holding `offset` bytes assembles from a manifest and its chunks."""
    p = bc.plan(m, req_id=REQ, digest=m.digest, offset=offset, length=2**32 - 1,
                expected_size=len(data))
    out, at = b"", p.enc.wire_offset(p.first)
    for i in p.chunks():
        out += p.decode(i, wire[at:at + p.wire_len(i)])
        at += p.wire_len(i)
    return out


def bomb(declared: int, inflates_to: int = 64 << 20) -> bytes:
    """A zstd frame of `inflates_to` zero bytes whose header says `declared`."""
    frame = bytearray(zstandard.ZstdCompressor(level=1).compress(b"\0" * inflates_to))
    assert frame[4] >> 6 == 2 and not frame[4] & 0x20
    struct.pack_into("<I", frame, 6, declared)
    return bytes(frame)


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=9 * KiB), st.sampled_from([1 * KiB, 4 * KiB]),
       st.sampled_from(["none", "zstd", "zstd-shuffle4"]), st.integers(0, 9 * KiB))
def test_any_blob_round_trips_from_any_offset(data, chunk, codec, offset):
    offset = min(offset, max(0, len(data) - 1))
    enc, wire, m = manifest_for(data, offset, chunk_size=chunk, codecs=(codec,))
    assert enc.wire_size == len(wire) <= len(data)  # never larger than raw
    assert all(w <= enc.raw_len(i) for i, w in enumerate(enc.sizes))
    assert receive(data, m, wire, offset) == data[offset:]


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=9 * KiB), st.sampled_from(["none", "zstd", "zstd-shuffle4"]),
       st.integers(0, 9 * KiB), st.lists(st.integers(1, 3 * KiB), min_size=1, max_size=8))
def test_chunks_received_in_parts_decode_as_whole_ones(data, codec, offset, cuts):
    """The fetcher hashes and keeps a chunk as the pieces it arrived in (decode_parts)."""
    offset = min(offset, max(0, len(data) - 1))
    _enc, wire, m = manifest_for(data, offset, chunk_size=1 * KiB, codecs=(codec,))
    p = bc.plan(m, req_id=REQ, digest=m.digest, offset=offset, length=2**32 - 1,
                expected_size=len(data))
    out, at = [], p.enc.wire_offset(p.first)
    for i in p.chunks():
        chunk = memoryview(wire[at:at + p.wire_len(i)])
        parts, j, k = [], 0, 0
        while j < len(chunk):
            parts.append(chunk[j:j + cuts[k % len(cuts)]])
            j, k = j + cuts[k % len(cuts)], k + 1
        got = p.decode_parts(i, parts)
        assert b"".join(got) == bytes(p.decode(i, chunk))
        out += got
        at += p.wire_len(i)
    assert b"".join(out) == data[offset:]


def test_a_chunk_in_parts_that_does_not_match_its_hash_is_refused():
    data = np.arange(3000, dtype=np.float32).tobytes()
    _, wire, m = manifest_for(data, chunk_size=4 * KiB)
    p = plan(m, len(data))
    good = wire[:p.wire_len(0)]
    flipped = good[:100] + bytes([good[100] ^ 1]) + good[101:]
    for bad in ([flipped[:100], flipped[100:]], [good[:100], good[100:-1]],
                [good[:100], good[100:], b"x"]):
        with pytest.raises(bc.ChunkViolation, match="does not hash to the manifest") as e:
            p.decode_parts(0, bad)
        assert e.value.offence == "invalid-message"


def test_codec_is_chosen_per_blob_and_kept_only_when_it_shrinks():
    rng = np.random.default_rng(0)
    digits = rng.integers(0, 17, 200_000).astype(np.float32).tobytes()
    noise = rng.bytes(600 * KiB)
    enc, wire, _ = manifest_for(digits)
    assert enc.codec == "zstd-shuffle4" and len(wire) < len(digits) / 4
    enc, wire, _ = manifest_for(noise)
    assert enc.codec == "none" and wire == noise and enc.sizes == (256 * KiB, 256 * KiB, 88 * KiB)


def test_a_compressed_blob_may_send_some_chunks_raw():
    data = bytes(256 * KiB) + np.random.default_rng(1).bytes(256 * KiB)
    enc, wire, m = manifest_for(data, codecs=("zstd",))
    assert enc.codec == "zstd" and enc.sizes[0] < 1000 and enc.sizes[1] == 256 * KiB
    assert receive(data, m, wire) == data


def test_a_misaligned_offset_starts_at_its_chunk_and_skips_what_is_held():
    data = bytes(range(256)) * 40  # 10,240 bytes
    _, wire, m = manifest_for(data, 3000, chunk_size=1 * KiB)
    assert m.first == 2
    assert receive(data, m, wire, 3000) == data[3000:]


def test_the_chunk_size_grows_so_a_manifest_stays_within_its_cap():
    assert bc.chunk_size_for(0) == bc.chunk_size_for(4 << 30) == 256 * KiB
    assert bc.chunk_size_for((4 << 30) + 1) == 512 * KiB
    with pytest.raises(ValueError, match="more than 16384 chunks"):
        bc.chunk_size_for((16 << 30) + 1)


# --- a lying manifest -------------------------------------------------------------------------
def plan(m, size: int, offset: int = 0, digest: bytes | None = None):
    return bc.plan(m, req_id=REQ, digest=digest or m.digest, offset=offset, length=2**32 - 1,
                   expected_size=size)


def test_a_manifest_for_another_request_or_at_another_chunk_is_a_protocol_error():
    data = bytes(5000)
    _, _, m = manifest_for(data, chunk_size=1 * KiB)
    for bad in (dataclasses.replace(m, req_id=b"x" * 16), dataclasses.replace(m, digest=b"d" * 32),
                dataclasses.replace(m, first=1)):
        with pytest.raises(bc.ChunkViolation) as e:
            plan(bad, len(data), digest=m.digest)
        assert e.value.offence == "protocol-error"


def test_a_manifest_of_another_size_fails_the_source_without_a_penalty():
    _, _, m = manifest_for(bytes(5000), chunk_size=1 * KiB)
    with pytest.raises(bc.SizeMismatch, match="5000 bytes, we expect 4000"):
        plan(m, 4000)


@pytest.mark.parametrize("change, why", [
    (dict(sizes=struct.pack(">4I", 1024, 1024, 1024, 1024)), "16 size bytes and 160 hash bytes for 5"),
    (dict(hashes=b"h" * 32), "for 5 chunks"),
    (dict(sizes=struct.pack(">5I", 1024, 1024, 1024, 1024, 905)), "chunk 4 is 905 bytes on the wire, its raw size is 904"),
    (dict(sizes=struct.pack(">5I", 1024, 1000, 1024, 1024, 904)), r"chunk 1 is 1000 bytes .*\(codec none\)"),
    (dict(codec="zstd", sizes=struct.pack(">5I", 1024, 0, 1024, 1024, 904)), "chunk 1 is 0 bytes"),
    (dict(chunk_size=1024, total_size=1024 * 16385), "16385 chunks"),
])
def test_a_lying_manifest_costs_invalid_message(change, why):
    data = bytes(5000)
    _, _, m = manifest_for(data, chunk_size=1 * KiB, codecs=())
    m = dataclasses.replace(m, **change)
    with pytest.raises(bc.ChunkViolation, match=why) as e:
        plan(m, m.total_size)
    assert e.value.offence == "invalid-message"


def test_a_chunk_that_does_not_match_its_hash_is_refused_before_decoding():
    data = np.arange(3000, dtype=np.float32).tobytes()
    _, wire, m = manifest_for(data, chunk_size=4 * KiB)
    p = plan(m, len(data))
    good = wire[:p.wire_len(0)]
    for bad in (good[:-1] + bytes([good[-1] ^ 1]), good[:-1], good + b"x"):
        with pytest.raises(bc.ChunkViolation, match="does not hash to the manifest") as e:
            p.decode(0, bad)
        assert e.value.offence == "invalid-message"
    assert p.decode(0, good) == data[:4 * KiB]


# --- compression bombs ------------------------------------------------------------------------
def signed_plan_for_chunks(chunks: list[bytes], raw_lens: list[int], codec: str = "zstd"):
    """A manifest that truly hashes `chunks`: only the decoding can catch them."""
    size = sum(raw_lens)
    enc = bc.Encoding(size, 64 * KiB, codec, b"".join(bc.chunk_hash(c) for c in chunks),
                      tuple(len(c) for c in chunks))
    m = bc.manifest(enc, req_id=REQ, exp=1, digest=b"d" * 32, offset=0)
    return plan(m, size)


def test_a_bomb_declaring_its_real_size_is_refused_before_decompressing():
    frame = zstandard.ZstdCompressor(level=1).compress(b"\0" * (64 << 20))
    p = signed_plan_for_chunks([frame], [64 * KiB])
    with pytest.raises(bc.ChunkViolation, match="declares a content size of 67108864 bytes.*"
                                                "refused before decompressing"):
        p.decode(0, frame)


def test_a_bomb_lying_about_its_size_stops_at_the_declared_size():
    frame = bomb(declared=64 * KiB)
    p = signed_plan_for_chunks([frame], [64 * KiB])
    with pytest.raises(bc.ChunkViolation, match="does not decode within its declared 65536"):
        p.decode(0, frame)


def test_frames_without_a_content_size_or_with_bytes_after_them_are_refused():
    raw = bytes(range(256)) * 256  # 64 KiB
    bare = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(raw)
    with pytest.raises(bc.ChunkViolation, match="declares no content size"):
        signed_plan_for_chunks([bare], [len(raw)]).decode(0, bare)
    framed = zstandard.ZstdCompressor(level=1).compress(raw) + b"tail"
    with pytest.raises(bc.ChunkViolation, match="with bytes after it"):
        signed_plan_for_chunks([framed], [len(raw)]).decode(0, framed)
    with pytest.raises(bc.ChunkViolation, match="not a zstd frame"):
        signed_plan_for_chunks([b"junk"], [len(raw)]).decode(0, b"junk")


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=1, max_size=2000))
def test_no_wire_bytes_decode_to_more_than_the_raw_length(wire):
    raw_len = 4 * KiB
    p = signed_plan_for_chunks([wire], [raw_len], codec="zstd-shuffle4")
    try:
        out = p.decode(0, wire)
    except bc.ChunkViolation:
        return
    assert len(out) == raw_len


# --- the holder's stored encoding -------------------------------------------------------------
def test_the_cache_encodes_once_keeps_it_and_rebuilds_a_damaged_one(tmp_path):
    data = np.random.default_rng(2).integers(0, 17, 300_000).astype(np.float32).tobytes()
    digest = hashlib.sha256(data).digest()
    cache = BlobCache(tmp_path, 10**8)
    cache.put(digest, data, public=True)
    enc = cache.encoding(digest)
    assert enc.codec == "zstd-shuffle4" and enc.total_size == len(data)
    wire_file = tmp_path / "enc" / f"{digest.hex()}.wire"
    stamp = wire_file.stat().st_mtime_ns
    again = BlobCache(tmp_path, 10**8)  # another process: loaded and checked, not rebuilt
    assert again.encoding(digest) == enc and wire_file.stat().st_mtime_ns == stamp
    wire = again.read_wire(digest, again.encoding(digest), 0, enc.wire_size)
    m = bc.manifest(enc, req_id=REQ, exp=1, digest=digest, offset=0)
    assert receive(data, m, wire) == data
    wire_file.write_bytes(b"x" + wire_file.read_bytes()[1:])  # damaged on disk
    third = BlobCache(tmp_path, 10**8)
    assert third.encoding(digest) == enc  # rebuilt from the blob
    assert wire_file.read_bytes() == wire
    third.remove(digest)
    assert not list((tmp_path / "enc").iterdir()) and third.encoding(digest) is None


def test_the_holder_reads_chunks_from_an_open_file_into_its_own_buffers(tmp_path):
    data = np.random.default_rng(3).bytes(40 * KiB)  # incompressible: codec none
    digest = hashlib.sha256(data).digest()
    cache = BlobCache(tmp_path, 10**8)
    cache.put(digest, data, public=True)
    enc = cache.encoding(digest)
    assert enc.codec == "none"
    buf = memoryview(bytearray(16 * KiB))
    with cache.open_wire(digest, enc) as f:
        try:  # from the page cache, without waiting for the disk, or BlockingIOError
            got = cache.read_wire(digest, enc, 8 * KiB, 16 * KiB, f, into=buf,
                                  cached_only=True)
        except BlockingIOError:
            got = cache.read_wire(digest, enc, 8 * KiB, 16 * KiB, f, into=buf)
        assert got.obj is buf.obj and got == data[8 * KiB:24 * KiB]
        assert cache.read_wire(digest, enc, 30 * KiB, 16 * KiB, f) is None  # past the end
        cache.remove(digest)  # dropped meanwhile: the serve stops
        assert cache.read_wire(digest, enc, 0, 1 * KiB, f) is None
    assert cache.open_wire(digest, enc) is None


def test_a_ready_encoding_is_handed_out_without_io_only_while_the_blob_is_unchanged(tmp_path):
    data = np.random.default_rng(4).bytes(8 * KiB)
    digest = hashlib.sha256(data).digest()
    cache = BlobCache(tmp_path, 10**8)
    cache.put(digest, data, public=True)
    assert cache.encoding_ready(digest) is None  # not built yet: `encoding` in a thread
    enc = cache.encoding(digest)
    assert cache.encoding_ready(digest) == enc
    path = tmp_path / "blobs" / digest.hex()
    path.write_bytes(data + b"x")  # changed on disk: re-checked by `encoding`
    assert cache.encoding_ready(digest) is None
    assert cache.encoding(digest) is None and not cache.has(digest)  # corrupt: dropped
    assert cache.encoding_ready(digest) is None


def test_the_codec_picked_on_a_sample_must_also_shrink_the_whole_blob():
    # the sampled chunks (of 256: 32, 96, 160, 224) compress, the rest is noise: zstd wins on
    # the sample but saves too little (4/256 < 1/32) on the whole blob, so it goes out raw
    rng = np.random.default_rng(2)
    sample = bc._sample(256)
    assert sample == [32, 96, 160, 224]
    data = b"".join(bytes(4 * KiB) if i in sample else rng.bytes(4 * KiB) for i in range(256))
    enc, wire, m = manifest_for(data, chunk_size=4 * KiB, codecs=("zstd",))
    assert enc.codec == "none" and wire == data
    # a blob that compresses throughout keeps the codec its sample chose, and round-trips
    data = np.repeat(rng.integers(0, 9, 16 * KiB).astype(np.float32), 1).tobytes()
    enc, wire, m = manifest_for(data, chunk_size=4 * KiB)
    assert enc.codec == "zstd-shuffle4" and len(wire) < len(data) / 2
    assert receive(data, m, wire) == data
