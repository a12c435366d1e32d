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


# --- issue 12: a record outlives what it replaces; high-water marks; equivocation ----------

HOUR_MS = 3_600_000


def test_next_expiry_never_moves_back_and_stays_within_the_kind_limit():
    from p2pfleet.core.records import next_expiry

    assert next_expiry(None, 1_000, 300_000, HOUR_MS) == 301_000
    # a 300 s leaving record after a 900 s one lives as long as that one
    assert next_expiry(900_000, 10_000, 300_000, HOUR_MS) == 900_000
    assert next_expiry(200_000, 10_000, 300_000, HOUR_MS) == 310_000
    # a clock that jumped back: capped, so receivers still accept it
    assert next_expiry(5 * HOUR_MS, 0, 300_000, HOUR_MS) == HOUR_MS


def test_a_mark_is_kept_until_every_older_record_expired_and_no_longer():
    from p2pfleet.core.records import mark_keep_until

    now, skew = 10 * HOUR_MS, 30_000
    # an older record was sealed before seq and lives at most an hour
    assert mark_keep_until(now - 1000, now + 300_000, now, HOUR_MS, skew) == now - 1000 + HOUR_MS + skew
    assert mark_keep_until(now - HOUR_MS, now + 300_000, now, HOUR_MS, skew) == now + 300_000 + skew
    # seq or exp far in the future count as now (+ one lifetime)
    assert mark_keep_until(now * 9, now * 9, now, HOUR_MS, skew) == now + HOUR_MS + skew


def test_next_record_persists_the_latest_expiry_across_restarts(tmp_path):
    with NodeState(tmp_path / "s.sqlite") as st:
        seq1, exp1 = st.next_record("capacity", 1_000, 900_000, HOUR_MS)
        assert (seq1, exp1) == (1_000, 901_000)
    with NodeState(tmp_path / "s.sqlite") as st:  # restarted, then leaving 60 s later
        seq2, exp2 = st.next_record("capacity", 61_000, 300_000, HOUR_MS)
        assert seq2 > seq1 and exp2 == exp1
        seq3, exp3 = st.next_record("capacity", 700_000, 900_000, HOUR_MS)
        assert exp3 == 1_600_000
        assert st.next_sequence("capacity", 0) == seq3 + 1  # one counter for both calls


def test_marks_only_rise_survive_restarts_and_are_forgotten_when_useless(tmp_path):
    from p2pfleet.store.state import MemoryMarks, RecordMark

    path = tmp_path / "s.sqlite"
    with NodeState(path) as st:
        for marks in (st, MemoryMarks()):
            marks.raise_mark("k", RecordMark(5, b"d5", b"e5", 100))
            marks.raise_mark("k", RecordMark(4, b"d4", b"e4", 900))  # lower: ignored
            assert marks.record_mark("k") == RecordMark(5, b"d5", b"e5", 100)
            marks.raise_mark("k", RecordMark(5, b"d5", b"e5", 200))  # same: keep longer
            assert marks.record_mark("k").keep_until_ms == 200
            assert marks.forget_marks(150) == 0 and marks.forget_marks(201) == 1
            assert marks.record_mark("k") is None
        st.raise_mark("kept", RecordMark(9, b"d9", b"e9", 10**15))
    with NodeState(path) as st:
        assert st.record_mark("kept").seq == 9


def _capacity(identity, seq: int, exp: int, **over) -> bytes:
    from p2pfleet.wire.envelope import seal
    from p2pfleet.wire.kinds import Capacity

    fields = dict(seq=seq, exp=exp, sw_version="0.1.0", state="available", hw_class=b"",
                  cores=2, memory_mb=1024, bench=50.0, providers=("CPUExecutionProvider",),
                  ort_version="1.20.0", slots=1, addrs=())
    fields.update(over)
    return seal(Capacity(**fields), identity, "utest")


def test_validator_refuses_below_the_mark_and_reports_the_equivocating_signer(tmp_path):
    from p2pfleet.identity import Identity
    from p2pfleet.net.dht_records import (
        FleetRecordValidator, RecordEquivocation, RecordRejected, RecordStale)

    now = 1_800_000_000.0
    now_ms = int(now * 1000)
    car = Identity.from_seed(b"car")
    key = Names("utest").node_key(car.peer_id)
    reported: list[tuple[str, str]] = []
    path = tmp_path / "s.sqlite"
    available = _capacity(car, now_ms - 1000, now_ms + 900_000)
    leaving = _capacity(car, now_ms, now_ms + 300_000, state="leaving")
    with NodeState(path) as st:
        v = FleetRecordValidator(Names("utest"), lambda: now, marks=st,
                                 on_equivocation=lambda signer, k, a, b: reported.append((signer, k)))
        v.validate(key, available)
        v.validate(key, leaving)
        with pytest.raises(RecordStale):
            v.validate(key, available)
        v.validate(key, leaving)  # the same record again is fine
        assert reported == []
        double = _capacity(car, now_ms, now_ms + 300_000, state="busy")
        with pytest.raises(RecordEquivocation):
            v.validate(key, double)
        assert reported == [(car.peer_id, key)]
        # a forgery under the car's key changes nothing
        with pytest.raises(RecordRejected, match="not the peer the key names"):
            v.validate(key, _capacity(Identity.from_seed(b"other"), now_ms + 9, now_ms + 1000))
        assert st.record_mark(key).seq == now_ms
        assert v.newest(key, [available])[1].body.state == "leaving"  # held at the mark
    # after a restart the mark still stands, with nothing else held
    with NodeState(path) as st:
        later = now + 400  # the leaving record (300 s + 30 s skew) has expired
        v = FleetRecordValidator(Names("utest"), lambda: later, marks=st)
        with pytest.raises(RecordStale):
            v.validate(key, available)
        assert v.newest(key, [available]) is None  # newest seen is expired: no record
        assert v.below_mark(key, available) and not v.below_mark(key, leaving)


def test_an_expired_newer_record_still_outranks_a_current_older_one():
    """A fresh reader that sees the expired record of a car and an older copy that still
    lives (published by software that did not yet make leaving records outlive it)."""
    from p2pfleet.identity import Identity
    from p2pfleet.net.dht_records import FleetRecordValidator, RecordRejected, RecordStale

    now = 1_800_000_000.0
    now_ms = int(now * 1000)
    car = Identity.from_seed(b"car")
    key = Names("utest").node_key(car.peer_id)
    v = FleetRecordValidator(Names("utest"), lambda: now)
    # seq is the Unix ms of sealing: the old one 400 s ago, the leaving one 390 s ago
    old = _capacity(car, now_ms - 400_000, now_ms + 500_000)
    gone = _capacity(car, now_ms - 390_000, now_ms - 60_000, state="leaving")
    assert v.newest(key, [old, gone]) is None
    with pytest.raises(RecordRejected, match="expired"):
        v.validate(key, gone)
    with pytest.raises(RecordStale):
        v.validate(key, old)
