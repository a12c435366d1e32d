"""Fix 15's fair slots, without sockets: turns go round-robin across waiting peers."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from p2pfleet.net.dht_slots import DhtSlotLimits, FairSlots


async def test_a_flooding_peer_waits_behind_its_own_requests():
    slots = FairSlots(total=1, per_peer=1)
    served: list[str] = []

    async def request(peer: str) -> None:
        await slots.acquire(peer)
        served.append(peer)
        await trio.sleep(0)  # served, then the slot goes to the next turn
        slots.release(peer)

    await slots.acquire("flooder")  # the slot is busy: everyone below waits
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(request, "flooder")
            await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(request, "honest")
        await trio.testing.wait_all_tasks_blocked()
        assert slots.waiting() == 6
        slots.release("flooder")
    # the honest request came after five of the flooder's, and is served second
    assert served[:2] == ["flooder", "honest"] and served.count("flooder") == 5
    assert slots.busy == 0 and not slots.serving


async def test_one_peer_holds_at_most_its_share_and_a_cancelled_wait_gives_back():
    slots = FairSlots(total=3, per_peer=2)
    await slots.acquire("a")
    await slots.acquire("a")
    with trio.move_on_after(0.01):  # a third one for "a" waits
        await slots.acquire("a")
    assert slots.serving["a"] == 2 and slots.waiting() == 0
    await slots.acquire("b")  # the free slot is b's at once
    assert slots.busy == 3


def test_bad_limits_are_named():
    with pytest.raises(ValueError, match="max_streams_per_peer must be at least 1"):
        DhtSlotLimits(max_streams_per_peer=0)
    with pytest.raises(ValueError, match="first_request_s and reply_s must be positive"):
        DhtSlotLimits(first_request_s=0)


def test_bad_inbound_reserve_is_named():  # fix 16's settings, checked as fix 15's are
    from p2pfleet.net.libp2p_fixes import InboundReserve

    with pytest.raises(ValueError, match="0 <= fraction < 1.*fraction=1"):
        InboundReserve(fraction=1)
