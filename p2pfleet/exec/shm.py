"""Shared memory between the node and its sandbox children (Linux memfds).

A shard's inputs go to the child once, in a memfd the node fills and then seals
(`share_arrays`: no write, no grow, no shrink, no further seals), so neither side can change
them afterwards; the child maps it read-only and runs every micro-batch on views of it. The
outputs come back in an `OutputArena`: a memfd of exactly the size the validated output
shapes allow, sealed against growing and shrinking (the child cannot make the node's mapping
fault by truncating it, nor make it larger), which the child maps writable and the node
read-only. Only small control messages then pass over the pipe per micro-batch. The fds go
to the child over a Unix socket (SCM_RIGHTS, `send_fds`).
"""

from __future__ import annotations

import fcntl
import math
import mmap
import os
import socket
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

ALIGN = 64  # every array starts on a cache line
INPUT_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
ARENA_SEALS = fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
_CHUNK = 64 << 20  # largest single pwrite


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _memfd(name: str, size: int) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


class SharedArrays(Mapping):
    """Named arrays in one sealed memfd: a read-only Mapping name -> array (views of the
    node's read-only mapping). `layout` gives each array's [name, dtype, shape, offset] in
    the memfd. Close it when no child needs it any more (the arrays stay valid until then)."""

    def __init__(self, fd: int, size: int, layout: list[list]):
        self.fd, self.size, self.layout = fd, size, layout
        self._map = mmap.mmap(fd, max(size, 1), mmap.MAP_SHARED, mmap.PROT_READ) if size else None
        self._arrays: dict[str, np.ndarray] = {}
        for name, dtype, shape, offset in layout:
            count = math.prod(shape)
            buf = self._map if self._map is not None else b""
            arr = np.frombuffer(buf, dtype=np.dtype(dtype).newbyteorder("<"), count=count,
                                offset=offset if count else 0).reshape(shape)
            self._arrays[name] = arr

    @property
    def nbytes(self) -> int:
        return self.size

    def __getitem__(self, name: str) -> np.ndarray:
        return self._arrays[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close(self) -> None:
        """Close the memfd and, once no array of it is referenced, the mapping."""
        self._arrays = {}
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # a caller still holds a view: the mapping goes with it
            self._map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:  # a dropped lease's prepared inputs: no fd left behind
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "SharedArrays":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def share_blob(blob: bytes) -> SharedArrays | bytes:
    """A canonical tensor encoding (an input blob) decoded into a sealed memfd, or the
    blob itself when it does not decode (the runner then reports why). Blocking: call from
    a thread, e.g. while the previous shard computes."""
    from .outputs import EncodingError, decode_tensors

    try:
        arrays = decode_tensors(blob)
    except EncodingError:
        return blob
    return share_arrays(arrays)


def share_arrays(arrays: Mapping[str, np.ndarray], name: str = "p2pfleet-inputs") -> SharedArrays:
    """Copy `arrays` (C order, little-endian) into a new memfd and seal it (INPUT_SEALS).
    One pass over the data; blocking: call from a thread for large shards."""
    layout, offset = [], 0
    prepared = []
    for key, arr in arrays.items():
        a = np.asarray(arr)
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        layout.append([key, a.dtype.newbyteorder("=").name, list(a.shape), offset])
        prepared.append((offset, a))
        offset = _aligned(offset + a.nbytes)
    fd = _memfd(name, offset)
    try:
        for off, a in prepared:
            view = memoryview(a).cast("B") if a.nbytes else memoryview(b"")
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:done + _CHUNK], off + done)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, INPUT_SEALS)
        return SharedArrays(fd, offset, layout)
    except BaseException:
        os.close(fd)
        raise


class OutputArena:
    """A memfd for one shard's outputs, `size` bytes, sealed against resizing; the node
    maps it read-only. `layout`: [name, dtype, tail shape, offset] per output; rows of an
    output follow each other from its offset (row r of the shard's run part at
    offset + r x row bytes)."""

    def __init__(self, outputs: Sequence[tuple[str, np.dtype, tuple[int, ...]]], rows: int):
        self.rows = rows
        self.layout: list[list] = []
        self.row_bytes: dict[str, int] = {}
        offset = 0
        for name, dtype, tail in outputs:
            dt = np.dtype(dtype)
            rb = math.prod(tail) * dt.itemsize
            self.layout.append([name, dt.name, list(tail), offset])
            self.row_bytes[name] = rb
            offset = _aligned(offset + rows * rb)
        self.size = offset
        self.fd = _memfd("p2pfleet-outputs", self.size)
        try:
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, ARENA_SEALS)
            self._map = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ) \
                if self.size else None
        except BaseException:
            os.close(self.fd)
            raise
        self._views: dict[str, np.ndarray] = {}
        for name, dt, tail, off in self.layout:
            count = rows * math.prod(tail)
            buf = self._map if self._map is not None else b""
            self._views[name] = np.frombuffer(buf, dtype=np.dtype(dt).newbyteorder("<"),
                                              count=count, offset=off if count else 0
                                              ).reshape((rows, *tail))

    def rows_of(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of an output, a view of the shared mapping (the child can
        still write there: copy before trusting it to stay put)."""
        return self._views[name][start:stop]

    def close(self) -> None:
        self._views = {}
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass
            self._map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def send_fds(sock: socket.socket, fds: Sequence[int]) -> None:
    """Pass `fds` to the child (one SEQPACKET message of one byte)."""
    socket.send_fds(sock, [b"F"], list(fds))


__all__ = ["SharedArrays", "share_arrays", "share_blob", "OutputArena", "send_fds", "INPUT_SEALS",
           "ARENA_SEALS", "ALIGN"]
