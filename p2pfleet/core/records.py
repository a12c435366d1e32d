"""Pure rules for sequence-ordered records: which copy wins, and what is equivocation.

A record's sequence number orders it (newest wins), never the wall clock. A publisher picks
the next sequence as max(last persisted + 1, now in Unix ms): a node that lost its data dir
or restored its key from backup still publishes records newer than any it sent before.
Two different records of one signer with the same sequence number are equivocation: proof
of misbehaviour (or of a key used on two machines).
"""

from __future__ import annotations

import enum


def next_sequence(last_persisted: int | None, now_ms: int) -> int:
    if last_persisted is None:
        return now_ms
    return max(last_persisted + 1, now_ms)


class Order(enum.Enum):
    NEWER = "newer"            # incoming replaces held
    SAME = "same"              # the very same record again
    STALE = "stale"            # older sequence: refuse
    EQUIVOCATION = "equivocation"  # same sequence, different content: keep held, report


def compare(held_seq: int | None, held_body: bytes | None, seq: int, body: bytes) -> Order:
    """Order an incoming record (seq, exact body bytes) against the held one, if any."""
    if held_seq is None:
        return Order.NEWER
    if seq > held_seq:
        return Order.NEWER
    if seq < held_seq:
        return Order.STALE
    return Order.SAME if body == held_body else Order.EQUIVOCATION
