"""Letting an ended job go (`JobForgotten`): its records leave the scheduler, late messages
about it are refused without penalty, trust and exclusions stay (specs/work-and-leases.md,
section 8, "Forgetting an ended job")."""

from __future__ import annotations

import random

import pytest

from p2pfleet.core import scheduler as S
from p2pfleet.core import trust as T

SECRET = b"s" * 32
MIN = 60_000
CLASS = b"c" * 32


def key(name: str) -> bytes:
    return name.encode().ljust(32, b".")


def job(job_id: bytes, n: int = 1) -> S.JobParams:
    return S.JobParams(job_id, SECRET, (10,) * n, (5,) * n, (True,) * n, (100,) * n,
                       recheck_rate=0.0, audit_rate=0.0)


def machine(keep_changes: bool = False, lazy: bool = False) -> S.Scheduler:
    settings = S.SchedulerSettings(cross_class_rate=0.0, recheck_cross_rate=0.0,
                                   request_interval_ms=0,
                                   trust=T.TrustSettings(trusted=frozenset({key("a")})))
    return S.Scheduler(settings, rng=random.Random(7), keep_changes=keep_changes,
                       lazy_shards=lazy)


def ask(m: S.Scheduler, who: str, at: int, jobs: tuple[bytes, ...]) -> list[S.LeaseGrant]:
    eff = m.handle(S.WorkRequested(at, key(who), f"10.0.{ord(who[0])}.0/24", CLASS, 1000.0, 1,
                                   jobs))
    return [g for e in eff if isinstance(e, S.Grant) for g in e.leases]


def result(m: S.Scheduler, g: S.LeaseGrant, who: str, at: int, digest: bytes = b"good",
           ka: bool = True, **kw) -> list:
    return m.handle(S.ResultArrived(at, g.lease_id, key(who), digest.ljust(32, b"."),
                                    known_answer_ok=ka, **kw))


def held_of(m: S.Scheduler, job_id: bytes) -> int:
    """Records and index entries of `job_id` the machine still holds."""
    return (sum(1 for k in m.shards if k[0] == job_id)
            + sum(1 for l in m.leases.values() if l.job_id == job_id)
            + sum(1 for k in m._by_shard if k[0] == job_id)
            + sum(1 for k in m._room if k[0] == job_id)
            + sum(job_id in d for d in (m.jobs, m._rank_base, m._window_of, m._offered,
                                         m._undecided, m._touched)))


def test_a_done_job_is_forgotten_and_its_late_results_are_refused_without_penalty():
    m = machine()
    j1, j2 = b"1" * 16, b"2" * 16
    m.handle(S.JobAdded(0, job(j1)))
    [gc] = ask(m, "c", 0, (j1,))
    # c's lease expires: its replica goes to a and b, who decide the shard
    m.handle(S.Tick(gc.deadline_ms + 10 * MIN))
    t = gc.deadline_ms + 11 * MIN
    [ga], [gb] = ask(m, "a", t, (j1,)), ask(m, "b", t, (j1,))
    result(m, ga, "a", t)
    assert any(isinstance(e, S.JobDone) for e in result(m, gb, "b", t))
    m.handle(S.JobAdded(t, job(j2)))
    assert m.handle(S.JobForgotten(t + 1, j1)) == []
    assert held_of(m, j1) == 0 and j1 in m.forgotten
    trust_c = m.trust_of(key("c"))
    # c's late (valid) result: refused, not paid, not c's fault
    with pytest.raises(S.Forgotten, match="ended and was forgotten"):
        result(m, gc, "c", t + 2, job_id=j1)
    with pytest.raises(S.Forgotten):
        m.handle(S.LeaseFailed(t + 2, gc.lease_id, key("c"), "error", job_id=j1))
    assert m.trust_of(key("c")) == trust_c
    # a message naming no job (or another one) is what it was: a lease never issued
    with pytest.raises(S.PeerViolation, match="never issued"):
        result(m, gc, "c", t + 2)
    with pytest.raises(S.PeerViolation, match="never issued"):
        result(m, gc, "c", t + 2, job_id=j2)
    with pytest.raises(S.CoreUsageError, match="already exists"):
        m.handle(S.JobAdded(t + 2, job(j1)))
    with pytest.raises(S.CoreUsageError, match="no job"):
        m.handle(S.JobForgotten(t + 2, j1))
    # the next job runs as on a machine that never had the first
    assert ask(m, "c", t + 3, (j1, j2))[0].job_id == j2


def test_a_live_job_or_one_with_changes_not_taken_is_not_forgotten():
    m = machine(keep_changes=True)
    j1 = b"1" * 16
    m.handle(S.JobAdded(0, job(j1)))
    with pytest.raises(S.CoreUsageError, match="is live"):
        m.handle(S.JobForgotten(1, j1))
    [ga] = ask(m, "a", 1, (j1,))
    m.handle(S.JobCancelled(2, j1))
    with pytest.raises(S.CoreUsageError, match="take_changes"):
        m.handle(S.JobForgotten(3, j1))
    assert held_of(m, j1) > 0  # refused: nothing changed
    m.take_changes()
    m.handle(S.JobForgotten(3, j1))
    assert held_of(m, j1) == 0
    assert m.take_changes() == ([], [], [], [])  # nothing to persist: the store keeps them
    with pytest.raises(S.Forgotten):
        m.handle(S.HandedBack(4, ga.lease_id, key("a"), job_id=j1))


def test_exclusions_and_trust_outlive_the_job_that_earned_them():
    m = machine()
    j1, j2 = b"1" * 16, b"2" * 16
    m.handle(S.JobAdded(0, job(j1, n=2)))
    [gx] = ask(m, "x", 0, (j1,))
    eff = result(m, gx, "x", 1, digest=b"bad", ka=False)  # a failed known answer: excluded
    assert any(isinstance(e, S.Excluded) and e.worker == key("x") for e in eff)
    m.handle(S.JobCancelled(3, j1))
    m.handle(S.JobForgotten(4, j1))
    m.handle(S.JobAdded(4, job(j2)))
    assert m.trust_of(key("x")).excluded
    eff = m.handle(S.WorkRequested(5, key("x"), "10.9.9.0/24", CLASS, 1000.0, 1, (j2,)))
    assert [e.reason for e in eff if isinstance(e, S.Refuse)] == ["excluded"]
    assert m.trust_of(key("x")).excluded == "failed_known_answer"


def test_a_stream_of_forgotten_jobs_holds_only_the_jobs_in_flight():
    m = machine(lazy=True)
    at, peak = 0, 0
    for n in range(30):
        jid = n.to_bytes(16, "big")
        m.handle(S.JobAdded(at, job(jid, n=3)))
        while m.jobs[jid].status == "live":
            for who in ("a", "b", "c"):
                for g in ask(m, who, at, (jid,)):
                    result(m, g, who, at + 1)
            at += 2
        peak = max(peak, len(m.leases))
        m.handle(S.JobForgotten(at, jid))
    assert len(m.jobs) == len(m.leases) == len(m.shards) == 0
    assert 0 < peak <= 3 * 3 and len(m.forgotten) == 30


def test_a_restart_restores_live_jobs_and_knows_the_forgotten_ones():
    """A publisher restarts from its store's live jobs only (`restore(forgotten=...)`):
    a late message about an ended job is Forgotten, as before the restart."""
    m = machine(keep_changes=True)
    j1, j2 = b"1" * 16, b"2" * 16
    m.handle(S.JobAdded(0, job(j1)))
    m.handle(S.JobAdded(0, job(j2)))
    [g1] = ask(m, "a", 1, (j1,))
    m.handle(S.JobCancelled(2, j1))
    jobs, shards, leases, workers = m.take_changes()
    live = ([j for j in jobs if j.job.job_id == j2], [s for s in shards if s.job_id == j2],
            [l for l in leases if l.job_id == j2], workers)
    again = machine()
    again.restore(*live, forgotten=[j1])
    assert set(again.jobs) == {j2} and j1 in again.forgotten
    with pytest.raises(S.Forgotten):
        again.handle(S.ResultArrived(3, g1.lease_id, key("a"), b"good".ljust(32, b"."),
                                     job_id=j1))
    with pytest.raises(S.CoreUsageError, match="already exists"):
        again.handle(S.JobAdded(3, job(j1)))
    with pytest.raises(S.CoreUsageError, match="both restored and forgotten"):
        machine().restore(*live, forgotten=[j2])
