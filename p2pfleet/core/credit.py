"""The worker's side of credit, as pure rules (specs/credit.md, sections 2-3).

- `check_receipt`: checks 2-5 of a receipt against the lease it names and the result the
  worker sent (check 1, opening the envelope, is the wire layer's).
- `unpaid`: a publisher's unpaid work, in its credit units and in compute time, from the
  results it acknowledged in the last 7 days and the receipts it sent (a receipt paying less
  than the lease promised leaves the shortfall unpaid; of two receipts for one lease the
  higher credit counts).
- `cap_reason` / `may_request`: whether the worker may ask the publisher for more work.
- `retry_delay_s`: the back-off between delivery attempts of a result, failure or
  hand-back, 60 s doubling to 4 h, with jitter drawn from the caller's rng.
- `local_day`: the owner's calendar day of an instant, for per-day ledger rows.
- `worker_keys`: the keys a worker was paid under (its own and those it rotated from), which
  every receipt of its exported ledger must name (credit.md, section 4).

No clock, no randomness of its own, no I/O: times and the rng come from the caller, so the
simulator replays the same decisions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # the caller hands in its seeded rng: core only names the type
    import random

WINDOW_MS = 7 * 24 * 3600 * 1000   # the `result` lifetime: unpaid work older than this is forgotten
DEFAULT_CAP_ELAPSED_MS = 4 * 3600 * 1000
RETRY_BASE_S = 60.0
RETRY_MAX_S = 4 * 3600.0
MAX_CLOCK_SKEW_MS = 30_000           # as on the wire (identity-and-wire.md)

# The names of the receipt checks, as `ReceiptRefused.check` gives them.
CHECK_KIND = "kind"                  # not a receipt at all
CHECK_AT = "at"                      # 1: dated more than the allowed skew ahead
CHECK_LEASE = "lease"                # 4: no such lease held
CHECK_SIGNER = "signer"              # 2: not signed by the lease's publisher
CHECK_WORKER = "worker"              # 3: pays someone else
CHECK_LEASE_FIELDS = "lease-fields"  # 4: job_id or shard differ from the lease's
CHECK_NO_RESULT = "no-result"        # 5: no result was sent for the lease
CHECK_OUTPUT = "output-digest"       # 5: pays another output than the one sent


class ReceiptRefused(Exception):
    """A receipt failed one of the checks; `check` names which (CHECK_* above)."""

    def __init__(self, check: str, detail: str):
        self.check = check
        self.detail = detail
        super().__init__(f"receipt refused ({check}): {detail}")


class ReceiptLike(Protocol):
    """The fields of a wire `Receipt` body that the checks read."""

    lease_id: bytes
    job_id: bytes
    shard: int
    worker: bytes
    output_digest: bytes
    credit: int


@dataclass(frozen=True)
class HeldLease:
    """What the worker knows of a lease it holds: who signed it, for whom, for what."""

    lease_id: bytes
    publisher: bytes   # the lease_batch signer
    worker: bytes      # the key the lease_batch was addressed to
    job_id: bytes
    shard: int
    credit: int


def check_receipt(receipt: ReceiptLike, signer: bytes, lease: HeldLease | None,
                  sent_digest: bytes | None, *,
                  worker_keys: Iterable[bytes] = (), now_ms: int | None = None) -> None:
    """Raise `ReceiptRefused` unless the receipt passes checks 2-5 of credit.md section 2
    (and, given `now_ms`, the dating part of check 1 again: `at` at most 30 s ahead).

    `lease` is the lease named by `receipt.lease_id` (None: not held), `sent_digest` the
    `output_digest` of the result the worker sent for it (None: none sent). `worker_keys`
    are further keys of this worker (keys it rotated from or to) besides the one the lease
    was addressed to.
    """
    lid = receipt.lease_id.hex()
    at = getattr(receipt, "at", None)
    if now_ms is not None and at is not None and at > now_ms + MAX_CLOCK_SKEW_MS:
        raise ReceiptRefused(CHECK_AT, f"dated {at}, more than {MAX_CLOCK_SKEW_MS} ms after "
                                       f"now ({now_ms})")
    if lease is None:
        raise ReceiptRefused(CHECK_LEASE, f"lease {lid} is not a lease this node holds")
    if signer != lease.publisher:
        raise ReceiptRefused(CHECK_SIGNER, f"signed by {signer.hex()[:16]}, but lease {lid} "
                                           f"was signed by {lease.publisher.hex()[:16]}")
    if receipt.worker != lease.worker and receipt.worker not in set(worker_keys):
        raise ReceiptRefused(CHECK_WORKER, f"pays worker {receipt.worker.hex()[:16]}, not this "
                                           f"node ({lease.worker.hex()[:16]})")
    if receipt.job_id != lease.job_id or receipt.shard != lease.shard:
        raise ReceiptRefused(CHECK_LEASE_FIELDS,
                             f"names job {receipt.job_id.hex()} shard {receipt.shard}, lease "
                             f"{lid} is job {lease.job_id.hex()} shard {lease.shard}")
    if sent_digest is None:
        raise ReceiptRefused(CHECK_NO_RESULT, f"this node sent no result for lease {lid}")
    if receipt.output_digest != sent_digest:
        raise ReceiptRefused(CHECK_OUTPUT, f"pays output {receipt.output_digest.hex()[:16]}, "
                                           f"the result sent was {sent_digest.hex()[:16]}")


@dataclass(frozen=True)
class ReceiptSeen:
    """A receipt the worker's ledger was given, as the node's credit log records it
    (specs/event-log.md): the receipt's fields, its signer, and what the ledger held of its
    lease when it checked it. `duplicate`: this very receipt (message id) was stored
    already; `earlier`: receipts of this lease by this signer already stored."""

    at_ms: int                    # when it was checked
    lease_id: bytes
    job_id: bytes
    shard: int
    worker: bytes
    output_digest: bytes
    credit: int
    at: int                       # the receipt's own date
    signer: bytes
    lease: HeldLease | None = None
    sent_digest: bytes | None = None
    worker_keys: tuple[bytes, ...] = ()
    duplicate: bool = False
    earlier: int = 0


@dataclass(frozen=True)
class Credited:
    """A receipt stored: "new" for the lease, or a "conflict" kept beside an earlier one
    (the higher credit counts)."""

    lease_id: bytes
    publisher: bytes
    credit: int
    outcome: str


def take_receipt(ev: ReceiptSeen) -> list:
    """The ledger's decision on a receipt, as a pure rule: nothing for a duplicate,
    `ReceiptRefused` if a check fails, else what is stored."""
    if ev.duplicate:
        return []
    check_receipt(ev, ev.signer, ev.lease, ev.sent_digest, worker_keys=ev.worker_keys,
                  now_ms=ev.at_ms)
    return [Credited(ev.lease_id, ev.signer, ev.credit, "conflict" if ev.earlier else "new")]


@dataclass(frozen=True)
class Delivery:
    """A result the publisher acknowledged: the lease's promised credit and its compute time."""

    lease_id: bytes
    credit: int
    delivered_ms: int
    elapsed_ms: int


@dataclass(frozen=True)
class Payment:
    """A receipt held for a lease (several per lease when a publisher sent conflicting ones)."""

    lease_id: bytes
    credit: int


@dataclass(frozen=True)
class Unpaid:
    """Unpaid work at one publisher: credit units (its own) and compute time."""

    credit: int
    elapsed_ms: int


def paid_per_lease(payments: Iterable[Payment]) -> dict[bytes, int]:
    """The credit that counts per lease: the highest of its receipts."""
    best: dict[bytes, int] = {}
    for p in payments:
        best[p.lease_id] = max(best.get(p.lease_id, 0), p.credit)
    return best


def in_window(delivered_ms: int, now_ms: int, window_ms: int = WINDOW_MS) -> bool:
    """Is a delivery at `delivered_ms` within the window ending at `now_ms`?"""
    return now_ms - delivered_ms < window_ms


def unpaid(deliveries: Iterable[Delivery], payments: Iterable[Payment], now_ms: int, *,
           window_ms: int = WINDOW_MS) -> Unpaid:
    """Unpaid work at one publisher (credit.md, section 3).

    Counts every delivery in the window: without a receipt, its whole credit and compute
    time; with receipts paying less than promised, the shortfall (its compute time counts
    as paid). Receipts for leases without a delivery in the window change nothing. Never
    negative. One delivery per lease counts (the first).
    """
    paid = paid_per_lease(payments)
    seen: set[bytes] = set()
    credit = elapsed = 0
    for d in deliveries:
        if d.lease_id in seen or not in_window(d.delivered_ms, now_ms, window_ms):
            continue
        seen.add(d.lease_id)
        got = paid.get(d.lease_id)
        if got is None:
            credit += max(0, d.credit)
            elapsed += max(0, d.elapsed_ms)
        else:
            credit += max(0, d.credit - got)
    return Unpaid(credit, elapsed)


def cap_reason(owed: Unpaid, *, cap_credit: int,
               cap_elapsed_ms: int = DEFAULT_CAP_ELAPSED_MS) -> str | None:
    """Why the worker must not ask this publisher for work (None: it may).

    Blocked while unpaid credit is above `cap_credit` or unpaid compute time above
    `cap_elapsed_ms` (credit.md, section 3); a cap of 0 allows no unpaid work at all.
    """
    if cap_credit < 0 or cap_elapsed_ms < 0:
        raise ValueError("caps must be >= 0")
    if owed.credit > cap_credit:
        return f"unpaid credit {owed.credit} is above the cap of {cap_credit}"
    if owed.elapsed_ms > cap_elapsed_ms:
        return (f"unpaid compute time {owed.elapsed_ms / 3_600_000:.2f} h is above the cap of "
                f"{cap_elapsed_ms / 3_600_000:.2f} h")
    return None


def may_request(owed: Unpaid, *, cap_credit: int,
                cap_elapsed_ms: int = DEFAULT_CAP_ELAPSED_MS) -> bool:
    """May the worker send this publisher a work request? (see `cap_reason`)"""
    return cap_reason(owed, cap_credit=cap_credit, cap_elapsed_ms=cap_elapsed_ms) is None


def worker_keys(worker: bytes, rotations: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The keys `worker` was paid under: itself and every key that rotated to it, directly
    or through a chain. `rotations` are verified (old key, new key) statements."""
    edges = list(rotations)
    keys = {worker}
    grown = True
    while grown:
        grown = False
        for old, new in edges:
            if new in keys and old not in keys:
                keys.add(old)
                grown = True
    return frozenset(keys)


def retry_delay_s(attempts: int, rng: random.Random, *, base_s: float = RETRY_BASE_S,
                  max_s: float = RETRY_MAX_S) -> float:
    """Seconds to wait before the next delivery attempt, after `attempts` failed ones.

    Exponential with jitter, always within [base_s, max_s]: after the n-th failure (n >= 1)
    the delay is uniform in [max(base_s, hi / 2), hi] with hi = min(max_s, base_s * 2**n).
    So 60-120 s after the first failure, 120-240 s after the second, ... and 2-4 h once
    the cap is reached (work-and-leases.md, section 10).
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    if not (math.isfinite(base_s) and math.isfinite(max_s)) or not 0 < base_s <= max_s:
        raise ValueError(f"need 0 < base_s <= max_s, got base_s={base_s}, max_s={max_s}")
    # min() before the power would overflow: 2**attempts is exact for ints, cap the exponent.
    hi = min(max_s, base_s * 2.0 ** min(attempts, 64))
    lo = max(base_s, hi / 2)
    return lo + (hi - lo) * rng.random()


def local_day(at_ms: int, tz_offset_s: int = 0) -> str:
    """The calendar day (YYYY-MM-DD) of `at_ms` at a UTC offset of `tz_offset_s`."""
    epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)  # arithmetic only: no clock is read
    return (epoch + timedelta(milliseconds=at_ms, seconds=tz_offset_s)).date().isoformat()


__all__ = [
    "CHECK_AT", "CHECK_KIND", "CHECK_LEASE", "CHECK_LEASE_FIELDS", "CHECK_NO_RESULT", "CHECK_OUTPUT",
    "CHECK_SIGNER", "CHECK_WORKER", "Credited", "DEFAULT_CAP_ELAPSED_MS", "Delivery", "HeldLease",
    "Payment", "RETRY_BASE_S", "RETRY_MAX_S", "ReceiptRefused", "ReceiptSeen", "Unpaid",
    "WINDOW_MS", "take_receipt",
    "cap_reason", "check_receipt", "in_window", "local_day", "may_request", "paid_per_lease",
    "retry_delay_s", "unpaid", "worker_keys",
]
