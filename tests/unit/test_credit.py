"""The pure credit rules: receipt checks, unpaid work, the cap, retry back-off."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from p2pfleet.core import credit as C

PUB, OTHER, ME, OLD_ME = b"P" * 32, b"O" * 32, b"W" * 32, b"w" * 32
LID, JOB = b"L" * 16, b"J" * 16
DIGEST = b"D" * 32
HOUR = 3_600_000
DAY = 24 * HOUR


@dataclass(frozen=True)
class R:
    lease_id: bytes = LID
    job_id: bytes = JOB
    shard: int = 3
    worker: bytes = ME
    output_digest: bytes = DIGEST
    credit: int = 10
    at: int = 1_000_000


HELD = C.HeldLease(LID, PUB, ME, JOB, 3, 10)


def refused(receipt: R, signer: bytes = PUB, lease: C.HeldLease | None = HELD,
            sent: bytes | None = DIGEST, **kw) -> C.ReceiptRefused:
    with pytest.raises(C.ReceiptRefused) as info:
        C.check_receipt(receipt, signer, lease, sent, **kw)
    return info.value


def test_a_good_receipt_passes():
    C.check_receipt(R(), PUB, HELD, DIGEST)
    C.check_receipt(R(credit=0), PUB, HELD, DIGEST)  # underpaid: recorded, shortfall unpaid


@pytest.mark.parametrize("receipt, kw, check", [
    (R(), {"lease": None}, C.CHECK_LEASE),
    (R(), {"signer": OTHER}, C.CHECK_SIGNER),
    (R(worker=OTHER), {}, C.CHECK_WORKER),
    (R(job_id=b"X" * 16), {}, C.CHECK_LEASE_FIELDS),
    (R(shard=4), {}, C.CHECK_LEASE_FIELDS),
    (R(), {"sent": None}, C.CHECK_NO_RESULT),
    (R(output_digest=b"E" * 32), {}, C.CHECK_OUTPUT),
    (R(at=2_000_000), {"now_ms": 1_000_000}, C.CHECK_AT),
])
def test_each_check_names_itself(receipt, kw, check):
    exc = refused(receipt, **kw)
    assert exc.check == check and check in str(exc)


def test_a_rotated_key_may_be_paid():
    C.check_receipt(R(worker=OLD_ME), PUB, HELD, DIGEST, worker_keys=[OLD_ME])
    assert refused(R(worker=OLD_ME)).check == C.CHECK_WORKER


def test_at_within_skew_passes():
    C.check_receipt(R(at=1_030_000), PUB, HELD, DIGEST, now_ms=1_000_000)


def d(lid: bytes, credit: int, at: int, elapsed: int = 1000) -> C.Delivery:
    return C.Delivery(lid, credit, at, elapsed)


def test_unpaid_counts_unreceipted_and_shortfalls_in_the_window():
    now = 10 * DAY
    deliveries = [d(b"a", 10, now - HOUR), d(b"b", 20, now - 2 * HOUR),
                  d(b"c", 30, now - 3 * HOUR), d(b"old", 99, now - 8 * DAY)]
    payments = [C.Payment(b"b", 20), C.Payment(b"c", 5), C.Payment(b"zzz", 500)]
    owed = C.unpaid(deliveries, payments, now)
    assert owed == C.Unpaid(credit=10 + 25, elapsed_ms=1000)


def test_conflicting_receipts_count_the_higher_credit():
    owed = C.unpaid([d(b"a", 10, 0)], [C.Payment(b"a", 4), C.Payment(b"a", 12)], 1)
    assert owed == C.Unpaid(0, 0)
    assert C.paid_per_lease([C.Payment(b"a", 4), C.Payment(b"a", 12)]) == {b"a": 12}


def test_the_window_is_seven_days():
    ds = [d(b"a", 10, 0)]
    assert C.unpaid(ds, [], C.WINDOW_MS - 1).credit == 10
    assert C.unpaid(ds, [], C.WINDOW_MS).credit == 0


def test_cap_blocks_above_and_allows_at_the_cap():
    assert C.may_request(C.Unpaid(1000, 0), cap_credit=1000)
    assert not C.may_request(C.Unpaid(1001, 0), cap_credit=1000)
    why = C.cap_reason(C.Unpaid(5, 5 * HOUR), cap_credit=1000, cap_elapsed_ms=4 * HOUR)
    assert why is not None and "compute time 5.00 h" in why
    assert C.may_request(C.Unpaid(0, 0), cap_credit=0)
    assert not C.may_request(C.Unpaid(1, 0), cap_credit=0)
    with pytest.raises(ValueError):
        C.cap_reason(C.Unpaid(0, 0), cap_credit=-1)


def test_retry_delays_double_within_bounds_and_are_seeded():
    rng = random.Random(7)
    delays = [C.retry_delay_s(n, rng) for n in range(1, 20)]
    assert 60 <= delays[0] <= 120 and 120 <= delays[1] <= 240
    assert all(60 <= x <= 4 * 3600 for x in delays)
    assert all(2 * 3600 <= x <= 4 * 3600 for x in delays[10:])
    assert delays == [C.retry_delay_s(n, r) for r in [random.Random(7)] for n in range(1, 20)]
    assert len(set(delays)) == len(delays)  # jittered
    assert 5 <= C.retry_delay_s(1, rng, base_s=5) <= 10
    assert C.retry_delay_s(10**6, rng) <= 4 * 3600  # no overflow
    for bad in ({"base_s": 0}, {"base_s": 5 * 3600}):
        with pytest.raises(ValueError):
            C.retry_delay_s(1, rng, **bad)
    with pytest.raises(ValueError):
        C.retry_delay_s(0, rng)


def test_local_day_uses_the_offset():
    at = 1_700_000_000_000  # 2023-11-14T22:13:20Z
    assert C.local_day(at) == "2023-11-14"
    assert C.local_day(at, 2 * 3600) == "2023-11-15"
    assert C.local_day(at, -23 * 3600) == "2023-11-13"


def test_local_day_before_1970_and_far_offsets():
    assert C.local_day(-1) == "1969-12-31"
    assert C.local_day(0, 14 * 3600) == "1970-01-01"


def test_worker_keys_follow_rotation_chains_back_to_the_current_key():
    a, b, c, other = b"a" * 32, b"b" * 32, b"c" * 32, b"o" * 32
    assert C.worker_keys(c, []) == {c}
    assert C.worker_keys(c, [(b, c), (a, b), (other, b"z" * 32)]) == {a, b, c}
    # a rotation away from the current key adds nothing: its successor is someone else now
    assert C.worker_keys(a, [(a, b)]) == {a}
