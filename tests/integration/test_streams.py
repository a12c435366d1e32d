"""Stream framing between two real hosts: envelopes cross intact; oversized frames are refused."""

from __future__ import annotations

import trio

from p2pfleet.net import streams

from fleetkit import fleet


async def test_envelopes_cross_and_oversized_frames_are_refused():
    got: list[bytes] = []
    errors: list[str] = []
    done = trio.Event()

    async def handler(stream):
        try:
            got.extend(await streams.read_all_envelopes(stream, cap=1000, limit=4, timeout=5))
            await streams.write_envelope(stream, b"ack")
            await streams.close_quietly(stream)
        except streams.StreamError as exc:
            errors.append(exc.offence or "")
            await streams.reset_quietly(stream)
        finally:
            done.set()

    async with fleet(2) as (a, b):
        b.set_handler("info", handler)
        stream = await a.open_stream(str(b.host.get_id()), "info")
        await streams.write_envelope(stream, b"one")
        await streams.write_envelope(stream, b"two" * 100)
        await stream.close_write()
        assert await streams.read_envelope(stream, cap=10, timeout=5) == b"ack"
        await done.wait()
        assert got == [b"one", b"two" * 100] and errors == []

        done = trio.Event()
        stream = await a.open_stream(str(b.host.get_id()), "info")
        await streams.write_envelope(stream, b"x" * 1001)
        await done.wait()
        assert errors == ["oversized"]
