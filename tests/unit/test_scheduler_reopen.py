"""A reopened shard the publisher was to compute itself (a stall resolved by "publisher") is
not lost: when a late quorum of workers accepted it first (cancelling the publisher's own
lease) and an exclusion then withdraws that acceptance, the stall check still sees the shard
and resolves it, as a scheduler restored from the store does (work-and-leases.md, section 4)."""

from __future__ import annotations

from p2pfleet.core import scheduler as S
from p2pfleet.core import trust as T

OWN = b"P".ljust(32, b".")
JOB = b"j".ljust(16, b".")
GOOD, BAD = b"good".ljust(32, b"."), b"bad".ljust(32, b".")


def key(name: str) -> bytes:
    return name.encode().ljust(32, b".")


def machine() -> S.Scheduler:
    trust = T.TrustSettings(trusted=frozenset({OWN}), established_accepted=2,
                            established_age_ms=120_000)
    s = S.SchedulerSettings(request_interval_ms=0, stall_wait_ms=5_000, own_key=OWN,
                            cross_class_rate=0.0, recheck_cross_rate=0.0, trust=trust)
    m = S.Scheduler(s, rng=S.KeyedRandom(b"k" * 32))
    for w in ("a", "e"):  # established before the job
        m.workers[key(w)] = T.WorkerTrust(key(w), accepted=10, first_valid_ms=-10**9)
    m.handle(S.JobAdded(0, S.JobParams(JOB, b"s" * 32, (8, 8), (3, 3), (True, True),
                                       (100, 100), quorum=2, recheck_rate=0.0,
                                       audit_rate=0.0)))
    return m


def ask(m: S.Scheduler, who: str, at: int, audit_only: bool = False) -> list[S.LeaseGrant]:
    worker, prefix = (OWN, "self") if who == "own" else (key(who), f"10.0.{ord(who)}.0/24")
    eff = m.handle(S.WorkRequested(at, worker, prefix, b"A" * 32, 1.0, 2 if audit_only else 1,
                                   (JOB,), audit_only=audit_only))
    return [g for e in eff if isinstance(e, S.Grant) for g in e.leases]


def result(m: S.Scheduler, g: S.LeaseGrant, who: str, at: int, digest: bytes = GOOD) -> list:
    agrees = tuple(l.lease_id for l in m.returned(JOB, g.shard) if l.digest == digest)
    return m.handle(S.ResultArrived(at, g.lease_id, key(who), digest, True, True, agrees))


def test_a_reopened_shard_the_publisher_was_to_compute_is_resolved():
    m = machine()
    [ga], [gb] = ask(m, "a", 0), ask(m, "e", 0)
    assert ga.shard == gb.shard == 1  # both rank shard 1 first: shard 0 stays open, the job live
    result(m, ga, "a", 1_000)
    m.handle(S.Tick(700_000))  # e's lease expires; a and e may not take shard 1 again
    ask(m, "a", 700_000), ask(m, "e", 700_000)
    m.handle(S.Tick(701_000))
    stalled = m.handle(S.Tick(707_000))
    assert S.ShardStalled(JOB, 1, "publisher", "no eligible worker for 6 s: the publisher "
                                               "computes it") in stalled
    [own] = ask(m, "own", 708_000, audit_only=True)
    assert own.shard == 1
    # e's late result makes a quorum before the publisher's: accepted, its own lease cancelled
    assert any(isinstance(e, S.ShardAccepted) for e in result(m, gb, "e", 709_000))
    m.handle(S.Tick(710_000))
    # a sends a second, different result for its lease: excluded, the acceptance withdrawn
    effects = result(m, ga, "a", 711_000, BAD)
    assert any(isinstance(e, S.ShardReopened) and e.shard == 1 for e in effects)
    sh = m.shards[(JOB, 1)]
    assert (sh.status, sh.fallback) == ("open", "publisher")
    # nobody may take it (the publisher's lease of it ended): the stall check resolves it
    # rather than leaving it open for good, and a restored machine decides the same
    restored = S.Scheduler(m.s, rng=S.KeyedRandom(b"k" * 32))
    restored.restore(*m.take_changes()[:3], m.workers.values())
    decided = []
    for at in (720_000, 726_000):
        got = m.handle(S.Tick(at))
        assert got == restored.handle(S.Tick(at))
        decided += [e for e in got if isinstance(e, (S.ShardStalled, S.ShardFailed))]
    assert [e.shard for e in decided] == [1, 1] and sh.status == "failed"
