"""The blob cache on real files: hash checks, LRU eviction under a size limit, pins,
corrupt files refused, crash leftovers cleaned, resumable partial downloads."""

from __future__ import annotations

import hashlib

import pytest

from p2pfleet.store.blobcache import BlobCache, BlobCorrupt, CacheFull


def blob(tag: str, size: int) -> tuple[bytes, bytes]:
    data = (tag.encode() * (size // len(tag) + 1))[:size]
    return hashlib.sha256(data).digest(), data


def test_put_get_and_wrong_digest_is_refused(tmp_path):
    cache = BlobCache(tmp_path, 1000)
    d, data = blob("a", 100)
    with pytest.raises(BlobCorrupt, match="hashes to"):
        cache.put(d, data + b"x", public=True)
    assert not cache.has(d)
    cache.put(d, data, public=True)
    assert cache.get(d) == data and cache.is_public(d) and cache.size_of(d) == 100
    d2, data2 = blob("b", 10)
    cache.put(d2, data2, public=False)
    assert not cache.is_public(d2)
    cache.put(d2, data2, public=True)  # public only widens
    assert cache.is_public(d2)
    with pytest.raises(ValueError, match="32 bytes"):
        cache.get(b"short")


def test_lru_eviction_respects_limit_and_pins(tmp_path):
    cache = BlobCache(tmp_path, 300)
    (da, a), (db, b), (dc, c), (dd, d) = (blob(t, 100) for t in "abcd")
    cache.put(da, a, public=True)
    cache.put(db, b, public=True, pinned=True)
    cache.put(dc, c, public=True)
    assert cache.get(da) == a  # a is now more recent than c
    cache.put(dd, d, public=True)  # over the limit: c, the least recently used unpinned, goes
    assert cache.digests() == [db, da, dd]
    assert cache.used_bytes() == 300
    assert cache.evict_to(0) == 200  # only the pinned blob stays
    assert cache.digests() == [db]
    big_d, big = blob("e", 250)
    with pytest.raises(CacheFull, match="pinned"):
        cache.put(big_d, big, public=False)
    with pytest.raises(CacheFull, match="at most 300"):
        cache.put(*blob("f", 301), public=False)
    cache.unpin(db)
    cache.put(big_d, big, public=False)
    assert cache.digests() == [big_d] and not cache.has(db)


def test_corrupt_file_is_refused_and_dropped(tmp_path):
    cache = BlobCache(tmp_path, 1000)
    d, data = blob("m", 200)
    cache.put(d, data, public=True)
    assert cache.read_range(d, 0, 10) == data[:10]
    path = tmp_path / "blobs" / d.hex()
    path.write_bytes(b"X" + data[1:])  # a bit flip on disk
    assert cache.read_range(d, 0, 10) is None  # changed on disk: re-checked, refused
    assert not cache.has(d) and not path.exists()
    cache.put(d, data, public=True)
    path.write_bytes(data[:-1] + b"Y")
    assert cache.get(d) is None and not cache.has(d)


def test_blobs_a_power_loss_damaged_are_never_used_after_a_restart(tmp_path):
    """Nothing is fsynced, so a power loss may leave an indexed blob zeroed or short (the
    rename and the index row reached the disk, its data did not). The reopened cache must
    refuse and drop it on every path: get, read_range (serving) and its stored encoding."""
    cache = BlobCache(tmp_path, 10_000)
    (da, a), (db, b), (dc, c) = (blob(t, 600) for t in ("put", "fetched", "short"))
    cache.put(da, a, public=True, pinned=True)
    part = cache.partial(db, 600, public=True)
    part.append(b)
    part.finish()
    cache.put(dc, c, public=True)
    assert cache.encoding(da) is not None and cache.encoding(db) is not None
    cache.close()
    (tmp_path / "blobs" / da.hex()).write_bytes(bytes(600))  # data pages lost: zeroes
    (tmp_path / "blobs" / db.hex()).write_bytes(bytes(600))
    (tmp_path / "blobs" / dc.hex()).write_bytes(c[:100] + bytes(500))
    cache = BlobCache(tmp_path, 10_000)
    assert cache.encoding_ready(da) is None  # not checked by this process
    assert cache.encoding(da) is None and not cache.has(da)
    assert cache.read_range(db, 0, 10) is None and not cache.has(db)
    assert cache.get(dc) is None and not cache.has(dc)
    assert sorted(p.name for p in (tmp_path / "enc").iterdir()) == []
    assert list((tmp_path / "blobs").iterdir()) == []


def test_storing_a_blob_again_replaces_a_file_a_power_loss_damaged(tmp_path):
    """A publisher stores its model again when it restarts. If a power loss zeroed the
    file (nothing is fsynced), the bytes stored now must replace it: keeping the damaged
    file would leave the model refused to every worker; pins and flags are kept."""
    cache = BlobCache(tmp_path, 10_000)
    d, data = blob("model", 700)
    cache.put(d, data, public=True, pinned=True)
    cache.close()
    path = tmp_path / "blobs" / d.hex()
    path.write_bytes(bytes(700))
    cache = BlobCache(tmp_path, 10_000)
    cache.put(d, data, public=True, pinned=True)
    assert cache.read_range(d, 0, 700) == data and cache.encoding(d) is not None
    assert cache.get(d) == data and cache.info(d).pins == 2 and cache.is_public(d)
    cache.put(d, data, public=False)  # checked by this process: kept as it is
    assert cache.info(d).pins == 2 and cache.is_public(d) and cache.get(d) == data


def test_reopen_cleans_crash_leftovers_and_keeps_index(tmp_path):
    cache = BlobCache(tmp_path, 1000)
    d, data = blob("k", 50)
    cache.put(d, data, public=True, pinned=True)
    cache.close()
    (tmp_path / "tmp" / "half-written").write_bytes(b"junk")
    orphan_d, orphan = blob("o", 20)
    (tmp_path / "blobs" / orphan_d.hex()).write_bytes(orphan)  # renamed, never indexed
    cache = BlobCache(tmp_path, 1000)
    assert cache.digests() == [d] and cache.info(d).pins == 1 and cache.is_public(d)
    assert list((tmp_path / "tmp").iterdir()) == []
    assert not (tmp_path / "blobs" / orphan_d.hex()).exists()


def test_partial_download_resumes_and_is_hash_checked(tmp_path):
    cache = BlobCache(tmp_path, 10_000)
    d, data = blob("p", 1000)
    part = cache.partial(d, 1000, public=True)
    part.append(data[:300])
    with pytest.raises(RuntimeError, match="already being downloaded"):
        cache.partial(d, 1000)
    part.close()
    cache.close()
    cache = BlobCache(tmp_path, 10_000)  # a restart keeps the bytes
    assert cache.partial_offset(d, 1000) == 300
    part = cache.partial(d, 1000, public=True)
    assert part.offset == 300
    with pytest.raises(ValueError, match="overrun"):
        part.append(b"z" * 701)
    with pytest.raises(ValueError, match="300 of 1000"):
        part.finish()
    part.append(data[300:])
    assert part.finish() == data
    assert cache.get(d) == data and cache.is_public(d)
    assert list((tmp_path / "partial").iterdir()) == []

    d2, data2 = blob("q", 100)
    part = cache.partial(d2, 100)
    part.append(b"w" * 100)
    with pytest.raises(BlobCorrupt, match="hash to"):
        part.finish()
    assert cache.partial_offset(d2, 100) == 0 and not cache.has(d2)


def test_partial_download_is_hashed_and_written_in_batches(tmp_path):
    """`append` keeps bytes in memory; `write_pending` hashes and writes them (the fetcher
    calls it from a worker thread while more arrive); `close` writes the rest for a resume,
    and `finish` returns the blob as bytes."""
    cache = BlobCache(tmp_path, 10_000)
    d, data = blob("batch", 1000)
    part = cache.partial(d, 1000)
    view = memoryview(data)
    part.append(view[:100])
    part.append(bytearray(data[100:250]))
    assert part.offset == 250 and part.unwritten == 250
    assert cache.partial_offset(d, 1000) == 0  # nothing on disk yet
    part.write_pending()
    assert part.unwritten == 0 and cache.partial_offset(d, 1000) == 250
    part.append(view[250:600])
    assert part.data == data[:600] and part.unwritten == 350
    part.close()  # an abandoned source: what was kept is written for the next one
    assert cache.partial_offset(d, 1000) == 600
    part = cache.partial(d, 1000)
    assert part.offset == 600 and part.unwritten == 0
    part.append(view[600:])
    out = part.finish()
    assert type(out) is bytes and out == data and part.data is out
    assert cache.get(d) == data

    d2, data2 = blob("lie", 300)
    part = cache.partial(d2, 300)
    part.append(data2[:200])
    part.write_pending()
    part.append(b"x" * 100)
    with pytest.raises(BlobCorrupt, match="hash to"):
        part.finish()
    assert cache.partial_offset(d2, 300) == 0 and not cache.has(d2)


def test_an_empty_blob_downloads(tmp_path):
    cache = BlobCache(tmp_path, 10_000)
    d, data = blob("e", 0)
    part = cache.partial(d, 0)
    assert part.finish() == b"" and cache.get(d) == b""
