"""Records held for others, per peer and per source address (core/held_records.py)."""

from __future__ import annotations

import pytest

from p2pfleet.core.held_records import HeldLimits, HeldRecords


def test_a_peer_stops_at_its_quota_and_a_source_at_its_share():
    held = HeldRecords(HeldLimits(per_peer=3, source_share=2))
    store: set[int] = set()

    def put(entry: int, peer: str, source: str | None) -> str | None:
        why = held.refusal(entry, peer, source, store.__contains__)
        if why is None:
            store.add(entry)
        return why

    assert [put(i, "a", "10.0.0.1") for i in range(3)] == [None] * 3
    assert "its quota of 3" in put(3, "a", "10.0.0.1")
    assert put(2, "a", "10.0.0.1") is None  # a newer record under a key it holds
    assert [put(10 + i, "b", "10.0.0.1") for i in range(3)] == [None] * 3
    assert "source address" in put(20, "c", "10.0.0.1")  # a fresh identity, same address
    assert put(20, "c", "10.0.0.2") is None
    assert put(30, "r", None) is None  # relayed: its own source
    assert held.refused == 2
    store.discard(0)  # expired: the sweep at the limit gives the slot back
    assert put(21, "d", "10.0.0.1") is None


def test_a_full_store_drops_the_oldest_record_of_the_source_holding_most():
    held = HeldRecords(HeldLimits(per_peer=10, source_share=4))
    always = lambda entry: True  # noqa: E731
    held.refusal("honest", "h", "10.0.0.9", always)
    for i in range(3):
        held.refusal(f"spam-{i}", f"s{i}", "10.0.0.1", always)
    assert held.to_evict() == "spam-0"
    held.forget("spam-0")
    held.forget("spam-1")
    held.forget("spam-2")
    assert held.to_evict() == "honest"
    held.forget("honest")
    assert held.to_evict() is None and not held.per_peer and not held.per_source


def test_limits_are_checked():
    with pytest.raises(ValueError, match="per_peer"):
        HeldLimits(per_peer=0)
