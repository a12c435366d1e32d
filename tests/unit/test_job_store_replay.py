"""The publisher's replay store (store/jobs.py, table `seen`): persisted, bounded by expiry."""

from __future__ import annotations

from p2pfleet.store.jobs import JobStore
from p2pfleet.wire.envelope import DedupStore


def test_an_id_is_remembered_once_across_a_reopen_until_it_expires(tmp_path):
    path = tmp_path / "jobs.sqlite"
    store: DedupStore = JobStore(path)
    assert store.remember(b"a" * 32, 2_000, now_ms=1_000)
    assert not store.remember(b"a" * 32, 9_000, now_ms=1_001)  # a replay changes nothing
    assert store.remember(b"b" * 32, 5_000, now_ms=1_000)
    store.close()
    store = JobStore(path)
    assert store.seen(b"a" * 32) and store.seen(b"b" * 32) and not store.seen(b"c" * 32)
    assert store.forget_seen(3_000) == 1  # kept until 2_000 (not 9_000): now forgettable
    assert not store.seen(b"a" * 32) and store.seen(b"b" * 32)
    store.close()
