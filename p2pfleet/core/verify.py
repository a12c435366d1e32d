"""Quorum rules: when a shard's results are accepted, which output wins, which results are valid.

Pure and data-free (specs/verification.md, sections 2-4): the machine never sees tensors.
The driver compares outputs (exec.outputs.compare_outputs: digest fast path, float
tolerance, integers exact) when a result arrives and states the outcome in the event: which
earlier results of the shard it agrees with, whether its form was valid (digests, encoding)
and whether its known-answer rows matched. So a logged event replays to the same decision.

A `Vote` is one returned result. Votes that are not `ok` (bad form, failed known answer,
discarded because their worker was excluded) never count towards a quorum.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations


@dataclass(frozen=True)
class Vote:
    lease_id: bytes
    worker: bytes
    digest: bytes
    order: int                       # arrival order (ties: earliest wins)
    agrees: frozenset[bytes]         # lease ids of other votes it agrees with
    ok: bool = True


def agree(a: Vote, b: Vote) -> bool:
    return a.digest == b.digest or b.lease_id in a.agrees or a.lease_id in b.agrees


def find_quorum(votes: list[Vote], need: int) -> tuple[Vote, ...] | None:
    """The earliest set of `need` ok votes from distinct workers that pairwise agree.

    Brute force over combinations: a shard holds at most max_total (2q + 4) results."""
    if need < 1:
        raise ValueError("a quorum needs at least one result")
    pool = sorted((v for v in votes if v.ok), key=lambda v: v.order)
    seen: set[bytes] = set()
    distinct = []
    for v in pool:  # one vote per worker (a second would be a conflict, handled elsewhere)
        if v.worker not in seen:
            seen.add(v.worker)
            distinct.append(v)
    if len(distinct) < need:
        return None
    best = None
    for group in combinations(distinct, need):
        if all(agree(a, b) for a, b in combinations(group, 2)):
            key = sorted(v.order for v in group)
            if best is None or key < best[0]:
                best = (key, group)
    return best[1] if best else None


def largest_agreeing(votes: list[Vote]) -> int:
    """Size of the largest group of ok votes (distinct workers) that pairwise agree."""
    distinct = {}
    for v in sorted((v for v in votes if v.ok), key=lambda v: v.order):
        distinct.setdefault(v.worker, v)
    vs = list(distinct.values())
    for size in range(len(vs), 0, -1):
        if find_quorum(vs, size) is not None:
            return size
    return 0


def choose_output(group: tuple[Vote, ...]) -> Vote:
    """Among an agreeing group, the vote whose digest most share (ties: earliest)."""
    counts: dict[bytes, int] = {}
    for v in group:
        counts[v.digest] = counts.get(v.digest, 0) + 1
    return min(group, key=lambda v: (-counts[v.digest], v.order))


def is_valid(vote: Vote, accepted: Vote) -> bool:
    """A result is valid when it agrees with the accepted output."""
    return vote.ok and (vote.lease_id == accepted.lease_id or agree(vote, accepted))


__all__ = ["Vote", "agree", "find_quorum", "largest_agreeing", "choose_output", "is_valid"]
