"""The node's blob cache: content-addressed files, size-limited, LRU eviction, crash-safe.

Layout under `root` (normally `DataDir.cache_dir`)::

    index.sqlite        one row per complete blob: digest, size, public, pins, last use
    blobs/<hex>         complete blobs, named by the SHA-256 of their bytes
    partial/<hex>-<n>   resumable downloads of an n-byte blob (bytes from offset 0 on)
    enc/<hex>.manifest  how the blob is served (blob v2: chunk size, codec, chunk hashes)
    enc/<hex>.wire      its chunks' wire bytes, when the codec compresses
    tmp/                files being written; emptied on open

A blob is written to tmp/, renamed into blobs/ and only then indexed, so after a crash of
the process a blob is either complete and indexed or gone: on open, files without a row and
rows without a file are dropped. Nothing is fsynced: the cache never holds the only copy of
a blob (a model or an input's durable copy is the publisher's job store; a worker fetches or
computes its blobs again), and fsync cost a fifth of a node's CPU on ResNet-50 inputs
(py-spy, tools/bench_e2e.py --profile) and a tenth of a 64 MiB model download's
(tools/bench_blob.py). A blob that a power loss left short or zeroed is never used: a
process hashes every blob file before it first uses it (below), so it is refused, dropped
and fetched again, and `put` of a blob held (a publisher restoring its jobs) replaces a
file this process has not checked. Every `get` re-hashes the file
(SHA-256 runs at ~1-2 GB/s; models are read once per run): a corrupt file is refused and
dropped, never handed to the runner. Serving peers reads ranges (`read_range`), hash-checked
once per file per process. The wire encoding of a blob (`encoding`, `read_wire`) is built
once, the first time the blob is served, and kept beside it; it is checked against its chunk
hashes once per process (the blob itself as `read_range` checks it) and dropped with the blob.

Least-recently used blobs go first when the cache is over its limit; LRU order is a counter
kept in the index, not the wall clock. Pinned blobs (outputs awaiting receipts, inputs of
live leases) are never evicted; pins are counted, so two leases may pin one blob. Public
blobs (models) may be served to anyone; private ones (inputs, outputs) only on a
caller's decision (net/blobs.py). Partial downloads are kept for resume and not counted
against the limit; at most `max_partials` are kept (the oldest goes).

Thread-safe (one lock): the network side calls it from worker threads for large reads.
"""

from __future__ import annotations

import hashlib
import io
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import msgpack

from ..wire import blobcodec
from . import bigbuf
from .db import open_db

DIGEST_LEN = 32
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)  # Linux: a read that fails rather than wait for I/O

_MIGRATIONS = [
    """
    CREATE TABLE blobs (
        digest BLOB PRIMARY KEY,
        size INTEGER NOT NULL,
        public INTEGER NOT NULL,
        pins INTEGER NOT NULL DEFAULT 0,
        used INTEGER NOT NULL
    );
    CREATE INDEX blobs_used ON blobs(used)
    """,
]


class CacheFull(Exception):
    """A blob cannot fit: larger than the cache, or pinned blobs hold the space."""


class BlobCorrupt(ValueError):
    """Bytes do not hash to the digest they are stored or delivered under."""


@dataclass(frozen=True)
class BlobInfo:
    digest: bytes
    size: int
    public: bool
    pins: int


def _check_digest(digest: bytes) -> bytes:
    if not isinstance(digest, bytes) or len(digest) != DIGEST_LEN:
        raise ValueError(f"a blob digest is {DIGEST_LEN} bytes of SHA-256, got {digest!r:.80}")
    return digest


def _pread(fd: int, start: int, length: int, into: memoryview | None,
           cached_only: bool) -> bytearray | memoryview | None:
    """`length` bytes at `start` of `fd` (in `into[:length]` if given); None if the file is
    shorter. `cached_only`: BlockingIOError unless the page cache holds them all (also
    where the platform cannot tell)."""
    buf = into[:length] if into is not None else bytearray(length)
    if cached_only and not _RWF_NOWAIT:
        raise BlockingIOError("cannot tell what the page cache holds")
    try:
        got = os.preadv(fd, [buf], start, _RWF_NOWAIT if cached_only else 0)
    except OSError as exc:  # EAGAIN: not cached; EOPNOTSUPP: the file system cannot say
        if cached_only:
            raise BlockingIOError(exc.errno, "not in the page cache") from None
        raise
    if got != length:
        if cached_only:
            raise BlockingIOError("not all in the page cache")
        return None
    return buf


class BlobCache:
    """Content-addressed blob files under `root`, at most `max_bytes` of complete blobs."""

    def __init__(self, root: Path, max_bytes: int, *, max_partials: int = 8):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.max_partials = max_partials
        self._blobs = self.root / "blobs"
        self._partial = self.root / "partial"
        self._tmp = self.root / "tmp"
        self._enc = self.root / "enc"
        for d in (self.root, self._blobs, self._partial, self._tmp, self._enc):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = open_db(self.root / "index.sqlite", _MIGRATIONS, name="blob cache index")
        self._db.close()  # reopen for use across threads (guarded by our lock)
        self._db = sqlite3.connect(str(self.root / "index.sqlite"), timeout=10.0,
                                   isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._verified: dict[bytes, tuple[int, int, int]] = {}  # digest -> (ino, mtime, size)
        self._encodings: dict[bytes, blobcodec.Encoding] = {}  # checked in this process
        self._open_partials: set[bytes] = set()
        self._recover()

    # --- recovery --------------------------------------------------------------------------
    def _recover(self) -> None:
        for f in self._tmp.iterdir():
            f.unlink(missing_ok=True)
        rows = {bytes(d): s for d, s in self._db.execute("SELECT digest, size FROM blobs")}
        on_disk = {}
        for f in self._blobs.iterdir():
            try:
                on_disk[bytes.fromhex(f.name)] = f
            except ValueError:
                f.unlink(missing_ok=True)
        for digest, f in on_disk.items():
            if digest not in rows or f.stat().st_size != rows[digest]:
                f.unlink(missing_ok=True)  # written but never indexed: a crash in put
        for digest in rows:
            if digest not in on_disk or not (self._path(digest)).exists():
                self._db.execute("DELETE FROM blobs WHERE digest = ?", (digest,))
        held = {d.hex() for d in rows if self._path(d).exists()}
        for f in self._enc.iterdir():
            if f.name.split(".", 1)[0] not in held:
                f.unlink(missing_ok=True)
        self._trim_partials()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- queries ---------------------------------------------------------------------------
    def _path(self, digest: bytes) -> Path:
        return self._blobs / digest.hex()

    def _touch(self, digest: bytes) -> None:
        self._db.execute("UPDATE blobs SET used = (SELECT COALESCE(MAX(used), 0) + 1 FROM blobs)"
                         " WHERE digest = ?", (digest,))

    def info(self, digest: bytes) -> BlobInfo | None:
        _check_digest(digest)
        with self._lock:
            row = self._db.execute("SELECT size, public, pins FROM blobs WHERE digest = ?",
                                   (digest,)).fetchone()
        return None if row is None else BlobInfo(digest, row[0], bool(row[1]), row[2])

    def has(self, digest: bytes) -> bool:
        return self.info(digest) is not None

    def is_public(self, digest: bytes) -> bool:
        info = self.info(digest)
        return info is not None and info.public

    def publish(self, digest: bytes) -> bool:
        """Make a held blob public (served to anyone) without reading or hashing it again;
        False if it is not held."""
        _check_digest(digest)
        with self._lock:
            cur = self._db.execute("UPDATE blobs SET public = 1 WHERE digest = ?", (digest,))
        return cur.rowcount > 0

    def size_of(self, digest: bytes) -> int | None:
        info = self.info(digest)
        return None if info is None else info.size

    def used_bytes(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COALESCE(SUM(size), 0) FROM blobs").fetchone()[0]

    def digests(self) -> list[bytes]:
        """Every complete blob, least recently used first."""
        with self._lock:
            return [bytes(d) for (d,) in self._db.execute("SELECT digest FROM blobs ORDER BY used")]

    # --- reading ---------------------------------------------------------------------------
    def get(self, digest: bytes) -> bytes | None:
        """The blob's bytes, hash-checked; None if absent or corrupt (a corrupt file is
        dropped). Marks the blob as recently used."""
        _check_digest(digest)
        with self._lock:
            if not self.has(digest):
                return None
            try:
                data = self._path(digest).read_bytes()
            except FileNotFoundError:
                data = None
            if data is None or hashlib.sha256(data).digest() != digest:
                self._drop(digest)
                return None
            self._touch(digest)
            return data

    def read_range(self, digest: bytes, offset: int, length: int) -> bytes | None:
        """Bytes [offset, offset+length) of a complete blob, for serving peers; None if
        absent or corrupt. The whole file is hash-checked the first time it is read in
        this process (and again if it changed on disk)."""
        _check_digest(digest)
        if offset < 0 or length < 0:
            raise ValueError(f"bad range: offset {offset}, length {length}")
        with self._lock:
            if not self.has(digest):
                return None
            path = self._path(digest)
            try:
                st = path.stat()
            except FileNotFoundError:
                self._drop(digest)
                return None
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if self._verified.get(digest) != stamp:
                if hashlib.sha256(path.read_bytes()).digest() != digest:
                    self._drop(digest)
                    return None
                self._verified[digest] = stamp
            if offset == 0:
                self._touch(digest)
            with path.open("rb") as f:
                f.seek(offset)
                return f.read(length)

    # --- writing ---------------------------------------------------------------------------
    def put(self, digest: bytes, data: bytes, *, public: bool, pinned: bool = False) -> None:
        """Store `data` under `digest` (ValueError if it does not hash to it). Storing a
        blob already held keeps it (its file is replaced by `data` unless this process
        hash-checked it: a power loss may have damaged it); `public` only ever widens,
        `pinned` adds a pin."""
        _check_digest(digest)
        if hashlib.sha256(data).digest() != digest:
            raise BlobCorrupt(f"blob {digest.hex()[:16]}: data hashes to "
                              f"{hashlib.sha256(data).hexdigest()[:16]}, not to its digest")
        with self._lock:
            if self._merge_existing(digest, public, pinned):
                if not self._checked(digest):  # replaced, keeping its index row
                    self._move_in(self._write_tmp(digest, data), digest)
                return
            self._make_room(len(data), digest)
            self._install(self._write_tmp(digest, data), digest, len(data), public, pinned)

    def _write_tmp(self, digest: bytes, data: bytes) -> Path:
        tmp = self._tmp / f"{digest.hex()}.{os.getpid()}.{threading.get_ident()}"
        tmp.write_bytes(data)
        return tmp

    def _checked(self, digest: bytes) -> bool:
        """This process hash-checked the blob's file, unchanged since."""
        try:
            st = self._path(digest).stat()
        except FileNotFoundError:
            return False
        return self._verified.get(digest) == (st.st_ino, st.st_mtime_ns, st.st_size)

    def _move_in(self, src: Path, digest: bytes) -> None:
        os.replace(src, self._path(digest))
        # checked as written: serving it needs no second hash until the file changes
        st = self._path(digest).stat()
        self._verified[digest] = (st.st_ino, st.st_mtime_ns, st.st_size)

    def _merge_existing(self, digest: bytes, public: bool, pinned: bool) -> bool:
        info = self.info(digest)
        if info is None:
            return False
        if not self._path(digest).exists():
            self._drop(digest)
            return False
        self._db.execute("UPDATE blobs SET public = MAX(public, ?), pins = pins + ? "
                         "WHERE digest = ?", (int(public), int(pinned), digest))
        self._touch(digest)
        return True

    def _install(self, src: Path, digest: bytes, size: int, public: bool, pinned: bool) -> None:
        """Move a file whose bytes were hash-checked on their way in into the cache."""
        self._move_in(src, digest)
        self._db.execute(
            "INSERT OR REPLACE INTO blobs(digest, size, public, pins, used) VALUES "
            "(?, ?, ?, ?, (SELECT COALESCE(MAX(used), 0) + 1 FROM blobs))",
            (digest, size, int(public), int(pinned)))

    def _make_room(self, size: int, digest: bytes) -> None:
        if size > self.max_bytes:
            raise CacheFull(f"blob {digest.hex()[:16]} is {size} bytes, the cache holds "
                            f"at most {self.max_bytes}")
        self._evict(self.max_bytes - size)
        if self.used_bytes() + size > self.max_bytes:
            pinned = self._db.execute(
                "SELECT COALESCE(SUM(size), 0) FROM blobs WHERE pins > 0").fetchone()[0]
            raise CacheFull(f"blob {digest.hex()[:16]} ({size} bytes) does not fit: "
                            f"{pinned} of {self.max_bytes} bytes are pinned")

    def pin(self, digest: bytes) -> None:
        _check_digest(digest)
        with self._lock:
            if self._db.execute("UPDATE blobs SET pins = pins + 1 WHERE digest = ?",
                                (digest,)).rowcount == 0:
                raise KeyError(f"blob {digest.hex()[:16]} is not in the cache")

    def unpin(self, digest: bytes) -> None:
        _check_digest(digest)
        with self._lock:
            self._db.execute("UPDATE blobs SET pins = MAX(pins - 1, 0) WHERE digest = ?",
                             (digest,))

    def remove(self, digest: bytes) -> None:
        _check_digest(digest)
        with self._lock:
            self._drop(digest)

    def _drop(self, digest: bytes) -> None:
        self._db.execute("DELETE FROM blobs WHERE digest = ?", (digest,))
        self._path(digest).unlink(missing_ok=True)
        self._verified.pop(digest, None)
        self._drop_encoding(digest)

    def _drop_encoding(self, digest: bytes) -> None:
        self._encodings.pop(digest, None)
        for suffix in (".manifest", ".wire"):
            (self._enc / (digest.hex() + suffix)).unlink(missing_ok=True)

    # --- wire encoding (blob v2) ---------------------------------------------------------
    def encoding(self, digest: bytes) -> blobcodec.Encoding | None:
        """How the blob is sent (chunk size, codec, chunk hashes): built and stored beside
        the blob the first time (compression tried once per blob, not per request), checked
        once per process. None if the blob is absent or corrupt. CPU- and disk-heavy the
        first time: call it from a worker thread."""
        _check_digest(digest)
        with self._lock:
            if not self.has(digest):
                return None
            enc = self._encodings.get(digest)
            # the blob is hash-checked once per process and again when its file changed
            # (read_range's rule); a corrupt one is dropped with its encoding
            if self.read_range(digest, 0, 0) is None:
                return None
            if enc is not None:
                return enc
            enc = self._load_encoding(digest)
            if enc is not None:
                self._encodings[digest] = enc
                return enc
        data = self._read_for_serving(digest)  # drops a corrupt blob
        if data is None:
            return None
        enc, wire = blobcodec.encode_blob(data)  # outside the lock: it may take a while
        with self._lock:
            if not self.has(digest):
                return None
            self._store_encoding(digest, enc, wire)
            self._encodings[digest] = enc
            return enc

    def _read_for_serving(self, digest: bytes) -> bytes | None:
        """The blob's bytes to serve, under read_range's rule: hash-checked unless this
        process checked this very file unchanged (for a 19 MB input blob the publisher
        just stored, a second SHA-256 of ~40 ms). None if absent or corrupt."""
        with self._lock:
            if not self.has(digest):
                return None
            try:
                with self._path(digest).open("rb") as f:
                    st = os.fstat(f.fileno())
                    data = f.read()
            except FileNotFoundError:
                self._drop(digest)
                return None
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if self._verified.get(digest) != stamp:
                if hashlib.sha256(data).digest() != digest:
                    self._drop(digest)
                    return None
                self._verified[digest] = stamp
            self._touch(digest)
            return data

    def encoding_ready(self, digest: bytes) -> blobcodec.Encoding | None:
        """`encoding` at the cost of a stat and the index (no thread needed): the encoding
        if this process built or checked it and the blob's file is unchanged since it was
        hash-checked; else None (then call `encoding`, from a worker thread)."""
        _check_digest(digest)
        with self._lock:
            enc = self._encodings.get(digest)
            if enc is None or not self.has(digest):
                return None
            try:
                st = self._path(digest).stat()
            except FileNotFoundError:
                return None
            if self._verified.get(digest) != (st.st_ino, st.st_mtime_ns, st.st_size):
                return None
            self._touch(digest)
            return enc

    def _load_encoding(self, digest: bytes) -> blobcodec.Encoding | None:
        """The stored encoding if it matches the blob and its wire bytes hash as it says."""
        mpath = self._enc / f"{digest.hex()}.manifest"
        try:
            size, chunk, codec, hashes, sizes = msgpack.unpackb(mpath.read_bytes())
            enc = blobcodec.Encoding(size, chunk, codec, hashes, tuple(sizes))
            if (size != self.size_of(digest) or len(sizes) != blobcodec.chunk_count(size, chunk)
                    or len(hashes) != 32 * len(sizes)):
                raise ValueError("does not fit the blob")
            if codec == "none":  # the wire bytes are the blob's (checked by the caller)
                wire = self._path(digest).read_bytes()
            else:
                wire = (self._enc / f"{digest.hex()}.wire").read_bytes()
            if len(wire) != sum(sizes):
                raise ValueError("wire bytes of another length")
            view, at = memoryview(wire), 0
            for i, n in enumerate(sizes):
                if blobcodec.chunk_hash(view[at:at + n]) != hashes[32 * i:32 * i + 32]:
                    raise ValueError(f"chunk {i} does not hash as stored")
                at += n
            return enc
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, msgpack.UnpackException):
            self._drop_encoding(digest)  # rebuilt from the blob
            return None

    def _store_encoding(self, digest: bytes, enc: blobcodec.Encoding, wire: bytes) -> None:
        stem = f"{digest.hex()}.{os.getpid()}.{threading.get_ident()}"
        if enc.codec != "none":
            tmp = self._tmp / f"{stem}.wire"
            tmp.write_bytes(wire)
            os.replace(tmp, self._enc / f"{digest.hex()}.wire")
        tmp = self._tmp / f"{stem}.manifest"
        tmp.write_bytes(msgpack.packb([enc.total_size, enc.chunk_size, enc.codec, enc.hashes,
                                       list(enc.sizes)]))
        os.replace(tmp, self._enc / f"{digest.hex()}.manifest")  # last: marks it complete

    def open_wire(self, digest: bytes, enc: blobcodec.Encoding) -> BinaryIO | None:
        """The file of the blob's wire bytes under `enc` (from `encoding`), open for
        `read_wire`; None if the blob or its encoding went away meanwhile."""
        _check_digest(digest)
        with self._lock:
            if self._encodings.get(digest) != enc:
                return None
            path = (self._path(digest) if enc.codec == "none"
                    else self._enc / f"{digest.hex()}.wire")
        try:
            return path.open("rb", buffering=0)
        except FileNotFoundError:
            return None

    def read_wire(self, digest: bytes, enc: blobcodec.Encoding, start: int, length: int,
                  file: BinaryIO | None = None, *, into: memoryview | None = None,
                  cached_only: bool = False) -> bytes | bytearray | memoryview | None:
        """Wire bytes [start, start+length) of the blob's chunks under `enc` (from
        `encoding`); None if the blob or its encoding went away meanwhile. With `file`
        (`open_wire`): read from it, into `into` if given (the view of it is returned), and
        with `cached_only` BlockingIOError unless the page cache holds them all, so an
        event loop may read them without waiting for the disk (and a worker thread reads
        them otherwise)."""
        _check_digest(digest)
        if start < 0 or length < 0:
            raise ValueError(f"bad range: start {start}, length {length}")
        with self._lock:
            if self._encodings.get(digest) != enc:  # equal when built again meanwhile
                return None
            path = (self._path(digest) if enc.codec == "none"
                    else self._enc / f"{digest.hex()}.wire")
            if start == 0:
                self._touch(digest)
        if file is not None:
            return _pread(file.fileno(), start, length, into, cached_only)
        if cached_only or into is not None:
            raise ValueError("cached_only and into need an open file")
        try:
            with path.open("rb") as f:
                f.seek(start)
                data = f.read(length)
        except FileNotFoundError:
            return None
        return data if len(data) == length else None

    def evict_to(self, max_bytes: int) -> int:
        """Evict unpinned blobs, least recently used first, until at most `max_bytes` are
        held (or only pinned ones remain). Returns the bytes freed."""
        with self._lock:
            return self._evict(max_bytes)

    def _evict(self, max_bytes: int) -> int:
        used = self.used_bytes()
        freed = 0
        if used <= max_bytes:
            return 0
        for d, size in self._db.execute(
                "SELECT digest, size FROM blobs WHERE pins = 0 ORDER BY used").fetchall():
            if used - freed <= max_bytes:
                break
            self._drop(bytes(d))
            freed += size
        return freed

    # --- resumable downloads ---------------------------------------------------------------
    def partial(self, digest: bytes, total_size: int, *, public: bool = False,
                pinned: bool = False) -> "PartialBlob":
        """A resumable download of the `total_size`-byte blob `digest`; its `offset` is
        where the bytes kept from earlier attempts end. One open download per digest."""
        _check_digest(digest)
        if total_size < 0:
            raise ValueError(f"total_size must be >= 0, got {total_size}")
        with self._lock:
            if digest in self._open_partials:
                raise RuntimeError(f"blob {digest.hex()[:16]} is already being downloaded")
            self._open_partials.add(digest)
            for other in self._partial.glob(f"{digest.hex()}-*"):
                if other.name != f"{digest.hex()}-{total_size}":
                    other.unlink(missing_ok=True)  # a download of another claimed size
            try:
                blob = PartialBlob(self, digest, total_size, public, pinned)
            except BaseException:
                self._open_partials.discard(digest)
                raise
            self._trim_partials(keep=blob.path)
            return blob

    def _trim_partials(self, keep: Path | None = None) -> None:
        files = sorted((f for f in self._partial.iterdir() if f != keep),
                       key=lambda f: f.stat().st_mtime_ns)
        room = self.max_partials - (1 if keep else 0)
        for f in files[:max(0, len(files) - room)]:
            if not any(f.name.startswith(d.hex()) for d in self._open_partials):
                f.unlink(missing_ok=True)

    def partial_offset(self, digest: bytes, total_size: int) -> int:
        """Bytes kept from an earlier download of this blob (0 if none)."""
        path = self._partial / f"{_check_digest(digest).hex()}-{total_size}"
        try:
            return min(path.stat().st_size, total_size)
        except FileNotFoundError:
            return 0


class PartialBlob:
    """A download in progress: bytes [0, offset) are kept in memory, in one buffer of the
    blob's size, and on disk up to `offset - unwritten`.

    `append` copies bytes into the buffer and does no I/O; `write_pending` (from a worker
    thread, while more is appended) computes the SHA-256 of what was appended since and
    writes it to the partial file, on large contiguous spans, so the worker releases the GIL
    a few times per batch instead of handing it back and forth per piece. `close` and
    `finish` write what is left; `finish` checks the whole blob's hash (nothing is fsynced:
    see the module docstring) and returns the buffer as `bytes` without copying it (a
    `BytesIO` over a `bytes` it alone holds hands that object out)."""

    def __init__(self, cache: BlobCache, digest: bytes, total_size: int, public: bool,
                 pinned: bool):
        self.cache = cache
        self.digest = digest
        self.total_size = total_size
        self.public = public
        self.pinned = pinned
        self.path = cache._partial / f"{digest.hex()}-{total_size}"
        self._hash = hashlib.sha256()
        self._bio = bigbuf.zeroed(total_size)  # pages mapped when first written
        self._view = self._bio.getbuffer()
        self._offset = 0  # bytes appended
        self._written = 0  # bytes hashed and written to the file
        self._result: bytes | None = None
        if self.path.exists():
            kept = 0
            with self.path.open("rb", buffering=0) as f:
                while kept < total_size:  # a read may return less (Linux: < 2 GiB)
                    got = f.readinto(self._view[kept:total_size])
                    if not got:
                        break
                    kept += got
            self._hash.update(self._view[:kept])
            self._offset = self._written = kept
        self._file = self.path.open("ab", buffering=0)
        self._file.truncate(self._offset)
        self._closed = False

    @property
    def offset(self) -> int:
        return self._offset

    @property
    def unwritten(self) -> int:
        """Bytes appended but not yet hashed and written to the partial file."""
        return self._offset - self._written

    def append(self, data: bytes | bytearray | memoryview) -> None:
        """Copy `data` in as the next bytes (no I/O: see `write_pending`)."""
        if self._closed:
            raise RuntimeError("this download is closed")
        end = self._offset + len(data)
        if end > self.total_size:
            raise ValueError(f"blob {self.digest.hex()[:16]}: {len(data)} bytes at offset "
                             f"{self.offset} overrun its size {self.total_size}")
        self._view[self._offset:end] = data
        self._offset = end

    def write_pending(self) -> None:
        """Hash and write the bytes appended since the last call. May run in a worker thread
        while `append` adds bytes after them; one call at a time."""
        if self._closed:
            raise RuntimeError("this download is closed")
        start, end = self._written, self._offset
        if start == end:
            return
        with self._view[start:end] as span:
            self._hash.update(span)
            fd = self._file.fileno()
            done = 0
            while done < len(span):
                done += os.write(fd, span[done:])
        self._written = end

    def finish(self) -> bytes:
        """Check the whole blob's hash and move it into the cache; returns its bytes.
        BlobCorrupt (the download is discarded) if it does not hash to its digest;
        CacheFull if it cannot be kept (the bytes are still returned by `data`)."""
        if self.offset != self.total_size:
            raise ValueError(f"blob {self.digest.hex()[:16]}: {self.offset} of "
                             f"{self.total_size} bytes received")
        self.write_pending()
        if self._hash.digest() != self.digest:
            self.discard()
            raise BlobCorrupt(f"blob {self.digest.hex()[:16]}: the {self.total_size} bytes "
                              f"received hash to {self._hash.hexdigest()[:16]}")
        self._close()
        data = self.data
        c = self.cache
        with c._lock:
            try:
                if not c._merge_existing(self.digest, self.public, self.pinned):
                    c._make_room(self.total_size, self.digest)
                    c._install(self.path, self.digest, self.total_size, self.public, self.pinned)
            finally:
                self.path.unlink(missing_ok=True)
        return data

    @property
    def data(self) -> bytes:
        """The bytes kept so far (a copy, unless the download is complete and closed)."""
        if self._result is not None:
            return self._result
        if not self._closed or self._offset < self.total_size:
            return bytes(self._view[:self._offset])
        self._view.release()
        self._result = self._bio.getvalue()
        self._bio = io.BytesIO()
        return self._result

    def discard(self) -> None:
        """Drop the bytes kept so far."""
        self._close()
        self.path.unlink(missing_ok=True)
        self._view.release()
        self._bio = io.BytesIO()
        self._view = self._bio.getbuffer()
        self._offset = self._written = 0
        self._result = None

    def close(self) -> None:
        """Stop for now; the bytes kept so far are written and stay for a later resume."""
        if not self._closed:
            self.write_pending()
        self._close()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._file.close()
            with self.cache._lock:
                self.cache._open_partials.discard(self.digest)

    def __enter__(self) -> "PartialBlob":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
