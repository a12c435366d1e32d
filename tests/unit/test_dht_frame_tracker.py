"""Fix 19's answer tracking (net/dht_streams.py, `_FrameTracker`): a pooled DHT stream is
handed back only after exactly one whole answer was read, however the reads split it."""

from __future__ import annotations

import varint

from p2pfleet.net.dht_streams import _FrameTracker


def frame(body: bytes) -> bytes:
    return varint.encode(len(body)) + body


def fed(*reads: bytes) -> _FrameTracker:
    t = _FrameTracker()
    for data in reads:
        t.feed(data)
    return t


def test_an_answer_read_as_upstream_does_is_complete():
    body = b"x" * 300  # a two-byte length prefix
    prefix = varint.encode(len(body))
    assert len(prefix) == 2
    assert fed(prefix[:1], prefix[1:], body).complete
    assert fed(prefix[:1], prefix[1:], body[:100], body[100:]).complete  # body split
    assert not fed(prefix[:1], prefix[1:], body[:299]).complete  # one byte short
    assert not fed(prefix[:1]).complete  # prefix half-way


def test_a_zero_length_answer_is_complete():
    assert fed(b"\x00").complete
    assert not fed().complete  # nothing read: no answer


def test_bytes_past_one_answer_are_never_complete():
    assert not fed(frame(b"abc") + frame(b"de")).complete  # two answers in one read
    assert not fed(b"\x00" + b"!").complete
    t = fed(frame(b"abc") + b"!")
    t.feed(b"more")  # and stay so, whatever is read next
    assert not t.complete
