"""Pure rules for sequence-ordered records: which copy wins, and what is equivocation.

A record's sequence number orders it (newest wins), never the wall clock. A publisher picks
the next sequence as max(last persisted + 1, now in Unix ms): a node that lost its data dir
or restored its key from backup still publishes records newer than any it sent before.
Two different records of one signer with the same sequence number are equivocation: proof
of misbehaviour (or of a key used on two machines).

A record's expiry never moves back along its stream (`next_expiry`): a replayed older record
(anyone may hold a signed copy) then expires no later than the newest one, so a short
"leaving" record cannot run out while the "available" record it replaced still lives.
A receiver keeps, per key, a high-water mark of the highest sequence it has seen
(`mark_keep_until` says how long it must); anything below it is stale.
"""

from __future__ import annotations

import enum


def next_sequence(last_persisted: int | None, now_ms: int) -> int:
    if last_persisted is None:
        return now_ms
    return max(last_persisted + 1, now_ms)


def next_expiry(latest_exp: int | None, now_ms: int, lifetime_ms: int, max_lifetime_ms: int) -> int:
    """The `exp` of a stream's next record: its own lifetime, but never earlier than the
    latest `exp` the stream published before, so it outlives every record it replaces.
    Capped at `now_ms + max_lifetime_ms` (the kind's limit): after the clock jumped back a
    receiver would refuse a longer life, and a refused record replaces nothing."""
    exp = now_ms + lifetime_ms
    if latest_exp is not None:
        exp = max(exp, latest_exp)
    return min(exp, now_ms + max_lifetime_ms)


def mark_keep_until(seq: int, exp: int, now_ms: int, max_lifetime_ms: int, skew_ms: int) -> int:
    """Until when a receiver must remember that it saw `seq` for a key (then it may forget).

    An honest signer's seq is at least the Unix ms at which it sealed the record (see
    `next_sequence`), so a lower-sequence record was sealed before `seq` ms and expires by
    `seq + max_lifetime_ms`; after that, and after this record's own `exp`, the expiry check
    refuses every older record anyway. A seq or exp in the future (a fast clock or a liar)
    counts as at most `now_ms` (+ one lifetime), so no mark outlives the longest record."""
    horizon = now_ms + max_lifetime_ms
    return max(min(exp, horizon), min(seq, now_ms) + max_lifetime_ms) + skew_ms


class Order(enum.Enum):
    NEWER = "newer"            # incoming replaces held
    SAME = "same"              # the very same record again
    STALE = "stale"            # older sequence: refuse
    EQUIVOCATION = "equivocation"  # same sequence, different content: keep held, report


def compare(held_seq: int | None, held_body: bytes | None, seq: int, body: bytes) -> Order:
    """Order an incoming record (seq, exact body bytes) against the held one, if any.
    Bodies may be given as their SHA-256 digests instead (the same on both sides)."""
    if held_seq is None:
        return Order.NEWER
    if seq > held_seq:
        return Order.NEWER
    if seq < held_seq:
        return Order.STALE
    return Order.SAME if body == held_body else Order.EQUIVOCATION
