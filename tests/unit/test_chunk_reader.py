"""Reading blob v2 chunks off a stream (p2pfleet/net/streams.py, `ChunkReader`): any split of
the stream's pieces gives the chunks' bytes as views, never reads past the expected bytes,
and an end of stream before or inside a chunk is told apart. (The reader on real libp2p
hosts, with lying and trickling holders: tests/integration/test_blobs.py and
test_hostile_providers.py.)"""

from __future__ import annotations

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfleet.net.streams import ChunkReader, StreamClosed, StreamError


class Pieces:
    """A stream whose reads return these pieces (at most what is asked), then EOF."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = list(pieces)
        self.asked: list[int] = []

    async def read(self, n: int) -> bytes:
        self.asked.append(n)
        await trio.lowlevel.checkpoint()
        if not self.pieces:
            return b""
        piece = self.pieces.pop(0)
        if len(piece) > n:
            piece, rest = piece[:n], piece[n:]
            self.pieces.insert(0, rest)
        return piece


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 5000), min_size=1, max_size=8),
       st.lists(st.integers(1, 3000), min_size=1, max_size=12))
def test_chunks_come_out_whole_from_any_pieces(chunk_lens, piece_lens):
    data = bytes(i % 251 for i in range(sum(chunk_lens)))
    pieces, at, k = [], 0, 0
    while at < len(data):
        pieces.append(data[at:at + piece_lens[k % len(piece_lens)]])
        at, k = at + piece_lens[k % len(piece_lens)], k + 1
    stream = Pieces(pieces + [b"trailing bytes the reader must not take"])

    async def main() -> list[bytes]:
        reader = ChunkReader(stream, len(data))
        out = []
        for n in chunk_lens:
            parts = await reader.read_parts(n, timeout=5)
            assert all(isinstance(p, memoryview) and p.readonly for p in parts)
            out.append(b"".join(parts))
        return out

    got = trio.run(main)
    assert got == [data[a:a + n] for a, n in zip(
        [sum(chunk_lens[:i]) for i in range(len(chunk_lens))], chunk_lens)]
    assert all(n <= len(data) for n in stream.asked)
    assert stream.pieces == [b"trailing bytes the reader must not take"]


async def test_an_end_before_a_chunk_is_clean_and_inside_one_is_a_protocol_error():
    reader = ChunkReader(Pieces([b"abc"]), 10)
    assert b"".join(await reader.read_parts(3)) == b"abc"
    with pytest.raises(StreamClosed):
        await reader.read_parts(4)

    reader = ChunkReader(Pieces([b"abc", b"de"]), 10)
    with pytest.raises(StreamError, match="3 bytes short of a 8-byte chunk") as e:
        await reader.read_parts(8)
    assert e.value.offence == "protocol-error"


async def test_a_chunk_that_does_not_arrive_in_time_stalls(autojump_clock):
    class Silent:
        async def read(self, n: int) -> bytes:
            await trio.sleep_forever()

    reader = ChunkReader(Silent(), 10)
    with pytest.raises(StreamError, match="0 of a 10-byte chunk within 10 s") as e:
        await reader.read_parts(10, timeout=10)
    assert e.value.offence == "stalled-stream"


async def test_no_chunk_is_read_past_the_limit():
    reader = ChunkReader(Pieces([b"abcdef"]), 4)
    with pytest.raises(ValueError, match="left to read"):
        await reader.read_parts(5)
    assert b"".join(await reader.read_parts(4)) == b"abcd"
