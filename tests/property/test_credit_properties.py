"""Properties of credit: unpaid work is never negative, receipts are idempotent in any order."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfleet.core import credit as C
from p2pfleet.identity import Identity
from p2pfleet.store.ledger import Ledger
from p2pfleet.wire.envelope import open_envelope, seal
from p2pfleet.wire.kinds import LeaseBatch, Receipt
from p2pfleet.wire.samples import sample_body

NET = "testnet"
NOW = 1_700_000_000_000
DAY = 24 * 3_600_000
PUB = Identity.from_seed(b"prop publisher")
ME = Identity.from_seed(b"prop worker")
JOB = b"J" * 16
LIDS = [bytes([i]) * 16 for i in range(4)]

lease_ids = st.sampled_from([b"a", b"b", b"c", b"d"])
deliveries = st.lists(st.builds(C.Delivery, lease_ids, st.integers(0, 10**6),
                                st.integers(-10 * DAY, 10 * DAY), st.integers(0, 10**7)))
payments = st.lists(st.builds(C.Payment, lease_ids, st.integers(0, 2 * 10**6)))


@given(deliveries, payments, st.integers(-10 * DAY, 20 * DAY))
def test_unpaid_is_never_negative_and_receipts_only_lower_it(ds, ps, now):
    owed = C.unpaid(ds, ps, now)
    assert owed.credit >= 0 and owed.elapsed_ms >= 0
    nothing_paid = C.unpaid(ds, [], now)
    assert owed.credit <= nothing_paid.credit and owed.elapsed_ms <= nothing_paid.elapsed_ms
    # order and repetition of receipts do not matter
    assert C.unpaid(ds, list(reversed(ps)) + ps, now) == owed


@given(deliveries, payments, st.integers(0, 10 * DAY), st.integers(0, 10 * DAY))
def test_unpaid_only_shrinks_as_time_passes(ds, ps, now, later):
    before, after = C.unpaid(ds, ps, now), C.unpaid(ds, ps, now + later)
    assert after.credit <= before.credit and after.elapsed_ms <= before.elapsed_ms


def _batch() -> bytes:
    base = sample_body("lease_batch").leases[0]
    leases = tuple(dataclasses.replace(base, lease_id=lid, job_id=JOB, shard=i, credit=100)
                   for i, lid in enumerate(LIDS))
    body = LeaseBatch(req_id=b"r" * 16, exp=NOW + 60_000, worker=ME.public_key, leases=leases)
    return seal(body, PUB, NET)


BATCH = _batch()
# Receipts: per lease, several different credits (conflicts) and a forgery (wrong digest).
RECEIPTS = [
    seal(Receipt(lease_id=lid, job_id=JOB, shard=i, worker=ME.public_key,
                 output_digest=bytes([i]) * 32 if credit >= 0 else b"\xff" * 32,
                 credit=abs(credit), at=NOW), PUB, NET)
    for i, lid in enumerate(LIDS) for credit in (40, 100, 150, -1)
]


def _fill(path) -> Ledger:
    led = Ledger(path)
    led.add_leases(PUB.public_key, open_envelope(BATCH, NET), NOW)
    for i, lid in enumerate(LIDS[:3]):  # no result sent for the last lease
        item = led.enqueue(PUB.public_key, lid, "result", b"result %d" % i, NOW + DAY, NOW,
                           output_digest=bytes([i]) * 32, elapsed_ms=1000)
        led.delivered(item, NOW)
    return led


def _state(led: Ledger) -> tuple:
    return (sorted(led.receipts()), led.unpaid(PUB.public_key, NOW + 1),
            led.summary(NOW + 1))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(range(len(RECEIPTS))), max_size=24), st.randoms())
def test_receipts_are_idempotent_in_any_order(tmp_path_factory, picks, rnd):
    order = [RECEIPTS[i] for i in picks]
    shuffled = order + order
    rnd.shuffle(shuffled)
    states, outcomes = [], []
    for seq in (order, shuffled):
        led = _fill(tmp_path_factory.mktemp("ledger") / "ledger.sqlite")
        got = []
        for env in seq:
            try:
                got.append(led.add_receipt(open_envelope(env, NET), NOW))
            except Exception as exc:  # forged digests and leases without a result
                got.append(type(exc).__name__)
        states.append(_state(led))
        outcomes.append(got)
        owed = led.unpaid(PUB.public_key, NOW + 1)
        assert owed.credit >= 0 and owed.elapsed_ms >= 0
        assert len(led.receipts()) == len(set(led.receipts()))
        led.close()
    assert states[0] == states[1]
    # a receipt accepted once is a duplicate every later time
    seen = set()
    for env, outcome in zip(shuffled, outcomes[1]):
        if env in seen and outcome != "ReceiptRejected":
            assert outcome == "duplicate"
        seen.add(env)
