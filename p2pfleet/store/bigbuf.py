"""Large zeroed buffers for downloads, backed by huge pages where Linux allows it.

A download is copied into one buffer of the blob's size (`blobcache.PartialBlob`), fresh
for every blob since the finished buffer is handed out as `bytes`. Its pages are mapped
when first written: with 4 KiB pages a 64 MiB blob takes 16,384 page faults, about half
the CPU of copying the bytes in (tools/bench_blob.py's fetcher); with transparent huge
pages (2 MiB) it takes 32. Kernels whose THP mode is "madvise" (a common default) give
them only to memory that asks, which is what `zeroed` does; elsewhere it is a plain
zeroed buffer.
"""

from __future__ import annotations

import ctypes
import io
import sys

HUGE = 2 * 1024 * 1024
MADV_HUGEPAGE = 14  # linux/mman.h
_libc = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.madvise.restype = ctypes.c_int
    except (OSError, AttributeError):
        _libc = None


def zeroed(size: int) -> io.BytesIO:
    """A BytesIO over `size` zero bytes (write into `getbuffer()`; `getvalue()` then hands
    out the bytes without a copy once the view is released). Buffers of a few huge pages
    or more are advised to use huge pages (best effort: nothing changes if refused)."""
    bio = io.BytesIO(bytes(size))  # calloc: untouched pages until written
    if _libc is not None and size >= 4 * HUGE:
        with bio.getbuffer() as view:
            _advise(view, size)
    return bio


def _advise(view: memoryview, size: int) -> None:
    start = ctypes.addressof(ctypes.c_char.from_buffer(view))  # the export ends on return
    lo = -(-start // HUGE) * HUGE  # only whole huge pages inside the buffer
    hi = (start + size) // HUGE * HUGE
    if hi > lo:
        _libc.madvise(lo, hi - lo, MADV_HUGEPAGE)  # an error (EINVAL, no THP) changes nothing
