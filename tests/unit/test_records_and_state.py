"""Record ordering rules and the persistent node state (dedup, sequences)."""

from __future__ import annotations

import sqlite3

import pytest

from p2pfleet.core.records import Order, compare, next_sequence
from p2pfleet.names import Names, NetworkIdError, check_network
from p2pfleet.store.db import StoreError
from p2pfleet.store.state import NodeState


def test_next_sequence_moves_forward_even_when_the_clock_does_not():
    assert next_sequence(None, 1000) == 1000
    assert next_sequence(1000, 1000) == 1001
    assert next_sequence(5000, 1000) == 5001  # clock went backwards
    assert next_sequence(1000, 9000) == 9000


def test_compare():
    assert compare(None, None, 1, b"a") is Order.NEWER
    assert compare(5, b"a", 6, b"b") is Order.NEWER
    assert compare(5, b"a", 4, b"b") is Order.STALE
    assert compare(5, b"a", 5, b"a") is Order.SAME
    assert compare(5, b"a", 5, b"b") is Order.EQUIVOCATION


def test_sequences_persist_and_restored_state_still_wins(tmp_path):
    with NodeState(tmp_path / "s.sqlite") as st:
        a = st.next_sequence("capacity", 1000)
        b = st.next_sequence("capacity", 1000)
        assert (a, b) == (1000, 1001)
        assert st.next_sequence("node_info", 10) == 10  # streams are independent
    with NodeState(tmp_path / "s.sqlite") as st:
        assert st.next_sequence("capacity", 500) == 1002
    # lost data dir: a fresh state at a later wall-clock time still publishes newer records
    with NodeState(tmp_path / "fresh.sqlite") as st:
        assert compare(1002, b"old", st.next_sequence("capacity", 2000), b"new") is Order.NEWER


def test_forget_expired_keeps_forever_entries(tmp_path):
    with NodeState(tmp_path / "s.sqlite") as st:
        assert st.remember(b"a" * 32, 100, 0)
        assert st.remember(b"b" * 32, None, 0)
        assert not st.remember(b"a" * 32, 100, 0)
        assert st.forget_expired(101) == 1
        assert st.remember(b"a" * 32, 500, 101)
        assert not st.remember(b"b" * 32, None, 101)


def test_state_from_newer_software_is_refused(tmp_path):
    path = tmp_path / "s.sqlite"
    NodeState(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version=99")
    conn.close()
    with pytest.raises(StoreError, match="newer than this software"):
        NodeState(path)


def test_corrupt_state_is_refused_with_its_path(tmp_path):
    path = tmp_path / "s.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="s.sqlite"):
        NodeState(path)


@pytest.mark.parametrize("bad", ["", "Main", "a_b", "-a", "a-", "x" * 33, "é"])
def test_bad_network_ids_are_refused(bad):
    with pytest.raises(NetworkIdError, match="network id"):
        check_network(bad)


def test_every_name_carries_network_and_major_version():
    names = Names("testnet-1")
    assert names.protocol("kad") == "/p2pfleet/testnet-1/kad/1.0.0"
    assert names.topic("jobs") == "/p2pfleet/testnet-1/jobs/1"
    assert names.node_key("12D3KooWabc") == "/p2pfleet/testnet-1/node/1/12D3KooWabc"
    assert names.model_key(b"\xab" * 32) == "/p2pfleet/testnet-1/model/1/" + "ab" * 32
