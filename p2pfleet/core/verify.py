"""Quorum rules: when a shard's results are accepted, which output wins, which results are valid.

Pure and data-free (specs/verification.md, sections 2-4): the machine never sees tensors.
The driver compares outputs (exec.outputs.compare_outputs: digest fast path, float
tolerance, integers exact) when a result arrives and states the outcome in the event: which
earlier results of the shard it agrees with, whether its form was valid (digests, encoding)
and whether its known-answer rows matched. So a logged event replays to the same decision.

A `Vote` is one returned result. Votes that are not `ok` (bad form, failed known answer,
discarded because their worker was excluded) never count towards a quorum.

The replica rules guard the quorum, so they hold on the votes that form it, whatever the
leases looked like when they were issued (an expired lease's late result is no back door):
a quorum is a set of pairwise agreeing ok votes from distinct workers, in distinct network
prefixes, with at most one from a non-established ("fresh") identity. A shard whose stall
was resolved by relaxing the prefix rule (`shared_prefix`; scheduler.py, RELAX_ORDER) lets
two non-fresh votes share a prefix; a fresh vote never shares one.
"""

from __future__ import annotations

from dataclasses import dataclass

# Standing of a vote's worker at the publisher, best first (choose_output prefers it).
TRUSTED, ESTABLISHED, FRESH = 0, 1, 2


@dataclass(frozen=True)
class Vote:
    lease_id: bytes
    worker: bytes
    digest: bytes
    order: int                       # arrival order (last tie-break)
    agrees: frozenset[bytes]         # lease ids of other votes it agrees with
    ok: bool = True
    prefix: str = ""                 # network prefix the lease was issued to ("": unknown)
    standing: int = ESTABLISHED      # TRUSTED, ESTABLISHED or FRESH

    @property
    def fresh(self) -> bool:
        return self.standing >= FRESH


def agree(a: Vote, b: Vote) -> bool:
    return a.digest == b.digest or b.lease_id in a.agrees or a.lease_id in b.agrees


def may_join(group: tuple[Vote, ...] | list[Vote], v: Vote, shared_prefix: bool = False) -> bool:
    """Can `v` stand in one quorum with `group`: another worker, another prefix (or, with
    `shared_prefix`, the same one when neither vote is fresh), at most one fresh identity in
    all, agreeing with every member?"""
    for g in group:
        if g.worker == v.worker or (g.fresh and v.fresh):
            return False
        if g.prefix == v.prefix and not (shared_prefix and not g.fresh and not v.fresh):
            return False
        if not agree(g, v):
            return False
    return True


def _quorums(votes: list[Vote], need: int, trusted: bool = False, shared_prefix: bool = False):
    """Every set of `need` ok votes that may stand together, each in arrival order; with
    `trusted`, only sets holding a vote of the publisher's trusted machines."""
    pool = sorted((v for v in votes if v.ok), key=lambda v: v.order)
    return _extend(pool, need, trusted, shared_prefix, 0, ())


def _extend(pool: list[Vote], need: int, trusted: bool, shared_prefix: bool, start: int,
            group: tuple[Vote, ...]):
    # A module function, not a closure calling itself: that closure was a reference cycle
    # per search, left for the garbage collector (the simulator makes millions).
    if len(group) == need:
        if not trusted or any(g.standing == TRUSTED for g in group):
            yield group
        return
    for i in range(start, len(pool)):
        if len(pool) - i < need - len(group):
            return
        if may_join(group, pool[i], shared_prefix):
            yield from _extend(pool, need, trusted, shared_prefix, i + 1, group + (pool[i],))


def find_quorum(votes: list[Vote], need: int, *, trusted: bool = False,
                shared_prefix: bool = False) -> tuple[Vote, ...] | None:
    """The earliest quorum of `need` votes (by the sorted arrival orders of its members), or
    None; with `trusted` (an audited shard) it must hold a trusted machine's vote.
    Backtracking over a shard's results: at most max_total (2q + 4) of them."""
    if need < 1:
        raise ValueError("a quorum needs at least one result")
    best = None
    for group in _quorums(votes, need, trusted, shared_prefix):
        key = sorted(v.order for v in group)
        if best is None or key < best[0]:
            best = (key, group)
    return best[1] if best else None


def largest_agreeing(votes: list[Vote], *, trusted: bool = False,
                     shared_prefix: bool = False) -> int:
    """Size of the largest set of ok votes that could stand in one quorum (with `trusted`,
    one holding a trusted machine's vote)."""
    ok = [v for v in votes if v.ok]
    if len(ok) <= 1:  # most shards while a job runs: no search needed
        return int(bool(ok) and (not trusted or ok[0].standing == TRUSTED))
    size = 0
    while next(iter(_quorums(votes, size + 1, trusted, shared_prefix)), None) is not None:
        size += 1
    return size


def choose_output(group: tuple[Vote, ...], votes: list[Vote] | None = None) -> Vote:
    """The output the publisher's user gets from an agreeing group: never simply the first.

    The best-standing worker's (the publisher's trusted machines, then established
    identities, then a fresh one); among equals, the output bit-identical to the most ok
    results of the shard (`votes`, default the group), so an honest class's exact output
    wins over a near miss; then the earliest."""
    pool = [v for v in (votes if votes is not None else group) if v.ok]
    counts: dict[bytes, int] = {}
    for v in pool:
        counts[v.digest] = counts.get(v.digest, 0) + 1
    return min(group, key=lambda v: (v.standing, -counts.get(v.digest, 0), v.order))


def is_valid(vote: Vote, accepted: Vote) -> bool:
    """A result is valid when it agrees with the accepted output."""
    return vote.ok and (vote.lease_id == accepted.lease_id or agree(vote, accepted))


__all__ = ["Vote", "agree", "may_join", "find_quorum", "largest_agreeing", "choose_output",
           "is_valid", "TRUSTED", "ESTABLISHED", "FRESH"]
