"""The node's SQLite ledger with real signed envelopes: leases, outbox, receipts, the cap."""

from __future__ import annotations

import dataclasses
import random
import sqlite3

import pytest

from p2pfleet.core.credit import WINDOW_MS, Unpaid
from p2pfleet.identity import Identity
from p2pfleet.store.ledger import Ledger, LedgerError, ReceiptRejected
from p2pfleet.wire.envelope import open_envelope, seal
from p2pfleet.wire.kinds import LeaseBatch, Receipt, Result
from p2pfleet.wire.samples import sample_body

NET = "testnet"
NOW = 1_700_000_000_000
HOUR = 3_600_000
PUB = Identity.from_seed(b"ledger publisher")
PUB2 = Identity.from_seed(b"ledger publisher 2")
ME = Identity.from_seed(b"ledger worker")
STRANGER = Identity.from_seed(b"somebody else")
JOB = b"J" * 16


def lid(i: int) -> bytes:
    return i.to_bytes(2, "big") * 8


def digest(i: int) -> bytes:
    return bytes([i % 256]) * 32


def batch(pub: Identity, ids: list[int], credit: int = 10, worker: Identity = ME):
    base = sample_body("lease_batch").leases[0]
    leases = tuple(dataclasses.replace(base, lease_id=lid(i), job_id=JOB, shard=i, credit=credit)
                   for i in ids)
    body = LeaseBatch(req_id=b"r" * 16, exp=NOW + 60_000, worker=worker.public_key,
                      leases=leases)
    return open_envelope(seal(body, pub, NET), NET)


def result_env(i: int, elapsed: int = 1000) -> bytes:
    body = dataclasses.replace(sample_body("result"), lease_id=lid(i), job_id=JOB, shard=i,
                               output_digest=digest(i), elapsed_ms=elapsed, exp=NOW + 7 * 24 * HOUR)
    return seal(body, ME, NET)


def receipt(pub: Identity, i: int, credit: int = 10, **over):
    fields = dict(lease_id=lid(i), job_id=JOB, shard=i, worker=ME.public_key,
                  output_digest=digest(i), credit=credit, at=NOW)
    fields.update(over)
    return open_envelope(seal(Receipt(**fields), pub, NET), NET)


def deliver(led: Ledger, pub: Identity, i: int, at: int, elapsed: int = 1000,
            output: bytes | None = None) -> int:
    item = led.enqueue(pub.public_key, lid(i), "result", result_env(i, elapsed), NOW + 7 * 24 * HOUR,
                       at, output_digest=digest(i), output=output, elapsed_ms=elapsed)
    led.delivered(item, at)
    return item


@pytest.fixture
def ledger(tmp_path):
    led = Ledger(tmp_path / "ledger.sqlite")
    yield led
    led.close()


def test_leases_are_stored_once_and_survive_reopen(tmp_path):
    path = tmp_path / "ledger.sqlite"
    led = Ledger(path)
    b = batch(PUB, [1, 2])
    assert led.add_leases(PUB.public_key, b, NOW) == [lid(1), lid(2)]
    assert led.add_leases(PUB.public_key, b, NOW + 1) == []
    assert led.add_leases(PUB.public_key, batch(PUB, [2, 3]), NOW + 2) == [lid(3)]
    led.set_status(lid(1), "running", NOW + 3)
    led.set_status(lid(2), "done", NOW + 3)
    deliver(led, PUB, 2, NOW + 4)
    assert led.add_receipt(receipt(PUB, 2), NOW + 5) == "new"
    led.close()

    led = Ledger(path)
    row = led.lease(lid(1))
    assert row.publisher == PUB.public_key and row.status == "running"
    assert row.lease.lease_id == lid(1) and row.lease.credit == 10 and row.received_ms == NOW
    assert [r.lease_id for r in led.open_leases()] == [lid(1), lid(3)]
    assert led.lease(b"\0" * 16) is None
    assert len(led.receipts()) == 1
    # the stored envelope is the complete signed receipt
    again = open_envelope(led.receipts()[0], NET)
    assert again.signer == PUB.public_key and again.body.lease_id == lid(2)
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    led.close()


def test_add_leases_refuses_wrong_kind_or_signer(ledger):
    with pytest.raises(LedgerError, match="signed by"):
        ledger.add_leases(PUB2.public_key, batch(PUB, [1]), NOW)
    with pytest.raises(LedgerError, match="expected a lease_batch"):
        ledger.add_leases(PUB.public_key, receipt(PUB, 1), NOW)
    assert ledger.open_leases() == []
    with pytest.raises(LedgerError, match="unknown lease status"):
        ledger.set_status(lid(1), "paid", NOW)
    with pytest.raises(LedgerError, match="no lease"):
        ledger.set_status(lid(1), "done", NOW)


def test_outbox_due_retry_delivered_and_expiry(ledger):
    ledger.add_leases(PUB.public_key, batch(PUB, [1, 2]), NOW)
    env = result_env(1)
    item = ledger.enqueue(PUB.public_key, lid(1), "result", env, NOW + 1000, NOW,
                          output_digest=digest(1), output=b"outputs")
    assert ledger.enqueue(PUB.public_key, lid(1), "result", env, NOW + 1000, NOW,
                          output_digest=digest(1)) == item  # idempotent
    failed = ledger.enqueue(PUB.public_key, lid(2), "failed", b"failed-envelope", NOW + 10**6, NOW)
    assert [i.id for i in ledger.due(NOW)] == [item, failed]
    due = ledger.due(NOW)[0]
    assert due.envelope == env and due.kind == "result" and due.attempts == 0

    nxt = ledger.retry_later(item, NOW, random.Random(1))
    assert NOW + 60_000 <= nxt <= NOW + 120_000
    assert [i.id for i in ledger.due(NOW)] == [failed]
    nxt2 = ledger.retry_later(item, nxt, random.Random(1), base_s=5)
    assert nxt + 10_000 <= nxt2 <= nxt + 20_000
    assert [i.id for i in ledger.due(nxt2 - 1)] == [failed]  # the result expired meanwhile
    ledger.delivered(failed, NOW)
    assert ledger.due(NOW + 999) == []  # result not due until nxt2, failed delivered
    assert ledger.due(NOW + 1001) == []  # the result expired
    assert ledger.output_for(digest(1)) == b"outputs"
    assert ledger.prune(NOW + 1001) == 1 and ledger.output_for(digest(1)) is None

    with pytest.raises(LedgerError, match="no lease"):
        ledger.enqueue(PUB.public_key, lid(9), "result", b"x", NOW, NOW, output_digest=digest(9))
    with pytest.raises(LedgerError, match="not from publisher"):
        ledger.enqueue(PUB2.public_key, lid(1), "failed", b"y", NOW, NOW)
    with pytest.raises(LedgerError, match="cannot enqueue"):
        ledger.enqueue(PUB.public_key, lid(1), "progress", b"z", NOW, NOW)
    with pytest.raises(LedgerError, match="output_digest"):
        ledger.enqueue(PUB.public_key, lid(1), "result", b"w", NOW, NOW)


def test_retries_survive_restart(tmp_path):
    path = tmp_path / "l.sqlite"
    with Ledger(path) as led:
        led.add_leases(PUB.public_key, batch(PUB, [1]), NOW)
        item = led.enqueue(PUB.public_key, lid(1), "result", result_env(1), NOW + 10 * HOUR, NOW,
                           output_digest=digest(1))
        nxt = led.retry_later(item, NOW, random.Random(3))
    with Ledger(path) as led:
        assert led.due(nxt - 1) == []
        [again] = led.due(nxt)
        assert again.id == item and again.attempts == 1


@pytest.mark.parametrize("make, reason", [
    (lambda: receipt(PUB, 7), "lease"),                                # unknown lease
    (lambda: receipt(PUB, 1, worker=STRANGER.public_key), "worker"),   # wrong worker
    (lambda: receipt(PUB, 1, output_digest=digest(99)), "output-digest"),
    (lambda: receipt(PUB2, 1), "signer"),                              # wrong publisher
    (lambda: receipt(PUB, 1, shard=5), "lease-fields"),
    (lambda: receipt(PUB, 2), "no-result"),                            # nothing sent for it
    (lambda: receipt(PUB, 1, at=NOW + HOUR), "at"),
    (lambda: batch(PUB, [1]), "kind"),
])
def test_bad_receipts_are_rejected_naming_the_check_and_change_nothing(ledger, make, reason):
    ledger.add_leases(PUB.public_key, batch(PUB, [1, 2]), NOW)
    deliver(ledger, PUB, 1, NOW, output=b"blob")
    before = ledger.summary(NOW)
    with pytest.raises(ReceiptRejected) as info:
        ledger.add_receipt(make(), NOW)
    assert info.value.reason == reason and reason in str(info.value)
    assert ledger.receipts() == []
    assert ledger.summary(NOW) == before
    assert ledger.output_for(digest(1)) == b"blob"


def test_duplicate_is_a_noop_and_conflict_is_kept_beside(ledger):
    ledger.add_leases(PUB.public_key, batch(PUB, [1], credit=10), NOW)
    deliver(ledger, PUB, 1, NOW, output=b"blob")
    assert ledger.unpaid(PUB.public_key, NOW) == Unpaid(10, 1000)
    low = receipt(PUB, 1, credit=4)
    assert ledger.add_receipt(low, NOW) == "new"
    assert ledger.output_for(digest(1)) is None  # released once paid
    assert ledger.unpaid(PUB.public_key, NOW) == Unpaid(6, 0)  # shortfall
    assert ledger.add_receipt(low, NOW + 1) == "duplicate"
    assert ledger.receipts() == [low.raw]
    high = receipt(PUB, 1, credit=12, at=NOW + 5)
    assert ledger.add_receipt(high, NOW + 2) == "conflict"
    assert ledger.add_receipt(high, NOW + 3) == "duplicate"
    assert ledger.receipts(PUB.public_key) == [low.raw, high.raw]
    assert ledger.unpaid(PUB.public_key, NOW) == Unpaid(0, 0)
    [s] = ledger.summary(NOW)
    assert (s.receipts, s.conflicting_receipts, s.credit_paid, s.credit_promised) == (2, 1, 12, 10)


def test_a_receipt_before_the_ack_stops_the_retries(ledger):
    ledger.add_leases(PUB.public_key, batch(PUB, [1]), NOW)
    ledger.enqueue(PUB.public_key, lid(1), "result", result_env(1), NOW + HOUR, NOW,
                   output_digest=digest(1))
    assert ledger.add_receipt(receipt(PUB, 1), NOW + 1) == "new"
    assert ledger.due(NOW + 2) == []


def test_unpaid_cap_blocks_and_unblocks_over_time(ledger):
    pub = PUB.public_key
    ledger.add_leases(pub, batch(PUB, list(range(1, 6)), credit=300), NOW)
    for i in (1, 2, 3, 4):
        deliver(ledger, PUB, i, NOW + i * HOUR)
    t = NOW + 5 * HOUR
    assert ledger.unpaid(pub, t) == Unpaid(1200, 4000)
    assert not ledger.may_request(pub, t, cap_credit=1000, cap_elapsed_ms=4 * HOUR)
    assert "unpaid credit 1200 is above the cap of 1000" in ledger.cap_reason(
        pub, t, cap_credit=1000)
    assert ledger.may_request(pub, t, cap_credit=1200, cap_elapsed_ms=4 * HOUR)
    # a receipt brings it under the cap
    ledger.add_receipt(receipt(PUB, 4, credit=300), t)
    assert ledger.may_request(pub, t, cap_credit=1000)
    assert not ledger.may_request(PUB.public_key, t, cap_credit=100)
    # the 7-day window forgets deliveries: lease 1 leaves first, then 2 and 3
    assert ledger.unpaid(pub, NOW + HOUR + WINDOW_MS) == Unpaid(600, 2000)
    assert ledger.may_request(pub, NOW + 3 * HOUR + WINDOW_MS, cap_credit=0)
    # unpaid compute time is capped too (a publisher promising tiny credit)
    assert not ledger.may_request(pub, t, cap_credit=10**9, cap_elapsed_ms=2000)
    # other publishers are not affected
    assert ledger.may_request(PUB2.public_key, t, cap_credit=0, cap_elapsed_ms=0)


def test_summary_is_per_publisher_with_energy_per_day(ledger):
    ledger.add_leases(PUB.public_key, batch(PUB, [1, 2], credit=10), NOW)
    ledger.add_leases(PUB2.public_key, batch(PUB2, [3], credit=7), NOW)
    deliver(ledger, PUB, 1, NOW, elapsed=2000)
    deliver(ledger, PUB2, 3, NOW, elapsed=500)
    ledger.enqueue(PUB.public_key, lid(2), "hand_back", b"hb", NOW + HOUR, NOW)
    ledger.add_receipt(receipt(PUB, 1, credit=10), NOW)
    ledger.add_energy(PUB.public_key, NOW, 1500, metered=False)
    ledger.add_energy(PUB.public_key, NOW, 500, metered=False)
    ledger.add_energy(PUB.public_key, NOW + 24 * HOUR, 700, metered=True)
    ledger.add_energy(PUB2.public_key, NOW, 100, metered=False, tz_offset_s=2 * 3600)
    with pytest.raises(LedgerError):
        ledger.add_energy(PUB.public_key, NOW, -1, metered=False)
    by = {s.publisher: s for s in ledger.summary(NOW)}
    a, b = by[PUB.public_key], by[PUB2.public_key]
    assert (a.leases, a.results_delivered, a.hand_backs, a.receipts) == (2, 1, 1, 1)
    assert (a.credit_promised, a.credit_paid, a.unpaid) == (10, 10, Unpaid(0, 0))
    assert (a.compute_ms, a.estimated_mwh, a.metered_mwh) == (2000, 2000, 700)
    assert [(x.day, x.results, x.credit_paid, x.estimated_mwh, x.metered_mwh) for x in a.days] == [
        ("2023-11-14", 1, 10, 2000, 0), ("2023-11-15", 0, 0, 0, 700)]
    assert (b.credit_promised, b.credit_paid, b.unpaid) == (7, 0, Unpaid(7, 500))
    assert [x.day for x in b.days] == ["2023-11-14", "2023-11-15"]  # energy: local day


def test_a_newer_ledger_is_refused(tmp_path):
    from p2pfleet.store.db import StoreError

    path = tmp_path / "l.sqlite"
    Ledger(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version=99")
    conn.close()
    with pytest.raises(StoreError, match="newer than this software"):
        Ledger(path)


def test_a_result_for_a_rotated_key(tmp_path):
    old = Identity.from_seed(b"old worker key")
    with Ledger(tmp_path / "l.sqlite", worker_keys=(old.public_key,)) as led:
        led.add_leases(PUB.public_key, batch(PUB, [1]), NOW)
        deliver(led, PUB, 1, NOW)
        assert led.add_receipt(receipt(PUB, 1, worker=old.public_key), NOW) == "new"


def test_result_envelope_is_a_real_result():
    opened = open_envelope(result_env(1), NET)
    assert isinstance(opened.body, Result) and opened.signer == ME.public_key


def test_job_leases_are_the_ones_held_from_that_publisher(tmp_path):
    me = Identity.from_seed(b"job leases me")
    pub, other = Identity.from_seed(b"job leases pub"), Identity.from_seed(b"job leases other")
    base = sample_body("lease_batch").leases[0]
    job = b"J" * 16
    with Ledger(tmp_path / "l.sqlite") as led:
        for signer, ids in ((pub, (1, 2)), (other, (3,))):
            leases = tuple(dataclasses.replace(base, lease_id=bytes([i]) * 16, job_id=job)
                           for i in ids)
            body = LeaseBatch(req_id=bytes(16), exp=10**13, worker=me.public_key, leases=leases)
            led.add_leases(signer.public_key, open_envelope(seal(body, signer, "t"), "t"), 0)
        led.set_status(bytes([2]) * 16, "done", 1)
        got = led.job_leases(pub.public_key, job)
        assert [(g.lease_id, g.status) for g in got] == [(bytes([1]) * 16, "queued"),
                                                         (bytes([2]) * 16, "done")]
        assert led.job_leases(pub.public_key, b"K" * 16) == []
        assert led.job_leases(me.public_key, job) == []
