"""Download buffers (`store.bigbuf.zeroed`): zeroed, writable, handed out without a copy,
whether or not the kernel gives them huge pages."""

from __future__ import annotations

from p2pfleet.store import bigbuf


def test_zeroed_buffers_small_and_huge():
    for size in (0, 2, 4096, 4 * bigbuf.HUGE - 1, 5 * bigbuf.HUGE + 123):
        bio = bigbuf.zeroed(size)
        view = bio.getbuffer()
        assert len(view) == size and bytes(view[:64]) == bytes(min(64, size))
        if size:
            view[-1:] = b"\x07"
            view[:1] = b"\x05"
        view.release()
        out = bio.getvalue()
        assert len(out) == size and out.count(0) == max(0, size - 2)
        if size:
            assert out[0] == 5 and out[-1] == 7
