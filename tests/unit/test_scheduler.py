"""The publisher's scheduler, driven in memory: replica rules, leases, quorum, receipts, cheats."""

from __future__ import annotations

import random

import pytest

from p2pfleet.core import scheduler as S
from p2pfleet.core import trust as T

JOB = b"j" * 16
SECRET = b"s" * 32
MIN = 60_000
HOUR = 60 * MIN
CLASS = b"c" * 32


def key(name: str) -> bytes:
    return name.encode().ljust(32, b".")


def job(n: int = 4, *, quorum: int = 2, ka: bool = True, budget=None, recheck=0.0, **kw) -> S.JobParams:
    return S.JobParams(JOB, SECRET, (10,) * n, (5,) * n, (ka,) * n, (100,) * n, quorum=quorum,
                       recheck_rate=recheck, budget=budget, **kw)


def machine(trusted=(), **kw) -> S.Scheduler:
    settings = S.SchedulerSettings(
        cross_class_rate=0.0, recheck_cross_rate=0.0, request_interval_ms=0,
        trust=T.TrustSettings(trusted=frozenset(key(t) for t in trusted)), **kw)
    return S.Scheduler(settings, rng=random.Random(7))


def ask(m: S.Scheduler, who: str, at: int = 0, *, prefix: str | None = None, slots: int = 1,
        jobs=(JOB,)) -> list:
    return m.handle(S.WorkRequested(at, key(who), prefix or f"10.0.{ord(who[0])}.0/24", CLASS,
                                    1000.0, slots, tuple(jobs)))


def grants(effects) -> list[S.LeaseGrant]:
    return [g for e in effects if isinstance(e, S.Grant) for g in e.leases]


def refused(effects) -> str:
    [r] = [e for e in effects if isinstance(e, S.Refuse)]
    return r.reason


def result(m, g: S.LeaseGrant, who: str, digest: bytes = b"good", at: int = 1, **kw) -> list:
    return m.handle(S.ResultArrived(at, g.lease_id, key(who), digest.ljust(32, b"."), **kw))


def test_quorum_two_accepts_pays_both_and_finishes_the_job():
    m = machine(trusted=["a"])
    m.handle(S.JobAdded(0, job(1)))
    [ga] = grants(ask(m, "a"))
    [gb] = grants(ask(m, "b"))
    assert ga.shard == gb.shard == 0 and ga.lease_id != gb.lease_id
    assert ga.deadline_ms >= 10 * MIN
    assert refused(ask(m, "c")) == "no_work"  # both replicas are out
    assert result(m, ga, "a", b"good", known_answer_ok=True) == []
    eff = result(m, gb, "b", known_answer_ok=True)
    pays = [e for e in eff if isinstance(e, S.Pay)]
    assert {p.worker for p in pays} == {key("a"), key("b")}
    assert any(isinstance(e, S.ShardAccepted) for e in eff)
    assert any(isinstance(e, S.JobDone) for e in eff)
    assert m.job_counts(JOB)["paid"] == 10


def test_one_replica_per_peer_per_prefix_and_one_fresh_identity_per_shard():
    m = machine()  # nobody established
    m.handle(S.JobAdded(0, job(1)))
    assert len(grants(ask(m, "a"))) == 1
    assert refused(ask(m, "b")) == "no_work"  # b is fresh too: never two fresh replicas
    m2 = machine(trusted=["a", "b"])
    m2.handle(S.JobAdded(0, job(1)))
    assert grants(ask(m2, "a", prefix="10.0.0.0/24"))
    assert refused(ask(m2, "b", prefix="10.0.0.0/24")) == "no_work"  # same prefix
    assert grants(ask(m2, "b", prefix="10.0.1.0/24"))


def test_a_peer_never_gets_a_second_replica_even_after_expiry():
    m = machine(trusted=["a", "b"])
    m.handle(S.JobAdded(0, job(1)))
    [ga] = grants(ask(m, "a"))
    eff = m.handle(S.Tick(ga.deadline_ms + 10 * MIN))
    assert not any(isinstance(e, S.WakeAt) for e in eff)
    assert m.leases[ga.lease_id].state == "expired"
    assert refused(ask(m, "a", ga.deadline_ms + 10 * MIN)) == "backoff"  # it failed once
    later = ga.deadline_ms + 10 * MIN + 5 * MIN
    assert refused(ask(m, "a", later)) == "no_work"  # not back-off: never the same shard again
    assert len(grants(ask(m, "b", later))) == 1


def test_expired_lease_is_reissued_and_a_late_valid_result_is_still_used_and_paid():
    m = machine(trusted=["a", "b", "c"])
    m.handle(S.JobAdded(0, job(1)))
    [ga] = grants(ask(m, "a"))
    [gb] = grants(ask(m, "b"))
    t = ga.deadline_ms + 10 * MIN
    m.handle(S.Tick(t))
    [gc] = grants(ask(m, "c", t, slots=2))  # both expired; one lease per shard per peer
    assert result(m, gb, "b", at=t + 2) == []
    eff = result(m, ga, "a", at=t + 3)  # late, but the shard was undecided
    assert {p.worker for p in eff if isinstance(p, S.Pay)} == {key("a"), key("b")}
    assert [c for c in eff if isinstance(c, S.CancelLeases)][0].worker == key("c")


def test_lease_expiry_games_in_one_prefix_never_form_a_quorum():
    """Issue 12, class 1: A1 takes the fresh replica and lets it expire; A2, a fresh key in
    the same /24, asks next; both then report the same wrong output (A1's late)."""
    m = machine(trusted=["t", "u", "e"])  # e: an established identity in the cheaters' /24
    m.handle(S.JobAdded(0, job(1)))
    P = "10.66.6.0/24"
    [g1] = grants(ask(m, "A1", prefix=P))
    [gt] = grants(ask(m, "t"))
    t = g1.deadline_ms + 10 * MIN
    m.handle(S.Tick(t))                             # A1's lease expired (t's is live: later)
    assert m.leases[g1.lease_id].state == "expired"
    # Another fresh key of A1's prefix never gets the shard again (nor any fresh key of that
    # prefix while it backs off).
    assert refused(ask(m, "A2", t, prefix=P)) == "backoff"
    assert refused(ask(m, "A3", t + 5 * HOUR, prefix=P)) == "no_work"
    # An established identity in A1's prefix may take the reissued replica (A1's lease is no
    # longer held); it and A1's late result agree on a wrong output: no quorum, one prefix.
    t2 = t + 5 * HOUR
    [ge] = grants(ask(m, "e", t2, prefix=P))
    eff = result(m, ge, "e", b"bad", at=t2 + 1, known_answer_ok=True)
    eff += result(m, g1, "A1", b"bad", at=t2 + 2, known_answer_ok=True)
    assert not any(isinstance(e, S.ShardAccepted) for e in eff)
    eff = result(m, gt, "t", b"good", at=t2 + 3, known_answer_ok=True)
    assert not any(isinstance(e, S.ShardAccepted) for e in eff)  # t alone is no quorum
    [gu] = grants(ask(m, "u", t2 + 4))
    eff = result(m, gu, "u", b"good", at=t2 + 5, known_answer_ok=True)
    [acc] = [e for e in eff if isinstance(e, S.ShardAccepted)]
    assert acc.digest == b"good".ljust(32, b".")
    assert {p.worker for p in eff if isinstance(p, S.Pay)} == {key("t"), key("u")}
    assert m.trust_of(key("t")).streak == 1  # the honest worker's trust was not reset


def test_throwaway_identities_of_one_prefix_cannot_fail_a_job():
    """Issue 12, class 2: ten fresh keys behind one address take leases and report failed."""
    m = machine(trusted=["t", "u"])
    m.handle(S.JobAdded(0, job(5)))
    P = "10.66.6.0/24"
    now = 0
    for round_ in range(40):
        for i in range(10):
            for g in grants(ask(m, f"x{i}", now, prefix=P, slots=2)):
                m.handle(S.LeaseFailed(now + 1, g.lease_id, key(f"x{i}"), "internal"))
        now += 10 * MIN
    shards = [m.shards[(JOB, i)] for i in range(5)]
    assert all(sh.status == "open" for sh in shards), [sh.reason for sh in shards]
    assert max(m.errors(sh) for sh in shards) <= 1  # once per prefix
    # Honest established workers still finish the job.
    for who in ("t", "u"):
        for g in grants(ask(m, who, now, slots=5)):
            m.handle(S.ResultArrived(now + 1, g.lease_id, key(who), b"good".ljust(32, b"."),
                                     known_answer_ok=True))
    assert m.job_counts(JOB)["accepted"] == 5


def test_errors_of_an_excluded_identity_never_fail_a_shard():
    m = machine(trusted=["t", "u"])
    m.handle(S.JobAdded(0, job(2, max_error=1)))
    [h1, h2] = grants(ask(m, "x", slots=2))
    m.handle(S.LeaseFailed(1, h1.lease_id, key("x"), "internal"))
    assert m.errors(m.shards[(JOB, h1.shard)]) == 1
    eff = result(m, h2, "x", b"bad", at=2, known_answer_ok=False)
    assert any(isinstance(e, S.Excluded) for e in eff)
    assert m.errors(m.shards[(JOB, h1.shard)]) == 0  # x's failure no longer counts
    [gt] = [g for g in grants(ask(m, "t", 3, slots=2)) if g.shard == h1.shard]
    m.handle(S.LeaseFailed(4, gt.lease_id, key("t"), "internal"))
    assert m.shards[(JOB, h1.shard)].status == "open"  # 1 error: not more than max_error 1


def test_an_audit_reserves_a_replica_for_trusted_machines_and_excludes_colluders():
    """Issue 12, class 4: two established colluders in two /24s report the same wrong
    output. Without an audit they are a quorum; an audited shard needs the publisher's own
    machine, whose result proves them wrong: both are excluded with evidence."""
    quick = T.TrustSettings(established_accepted=0, established_age_ms=0,
                            trusted=frozenset({key("T")}))
    m = S.Scheduler(S.SchedulerSettings(cross_class_rate=0.0, recheck_cross_rate=0.0,
                                        request_interval_ms=0, trust=quick), rng=random.Random(7))
    m.handle(S.JobAdded(0, job(1, audit_rate=1.0)))
    [g1] = grants(ask(m, "p"))
    [g2] = grants(ask(m, "q"))
    assert refused(ask(m, "h")) == "no_work"       # the third replica is the audit's
    [gt] = grants(ask(m, "T"))
    eff = result(m, g1, "p", b"bad") + result(m, g2, "q", b"bad", at=2)
    assert not any(isinstance(e, S.ShardAccepted) for e in eff)
    eff = result(m, gt, "T", b"good", at=3)
    [g] = grants(ask(m, "h", 4))
    eff += result(m, g, "h", b"good", at=5)
    [acc] = [e for e in eff if isinstance(e, S.ShardAccepted)]
    assert acc.digest == b"good".ljust(32, b".")
    excluded = {e.worker: e.claim for e in eff if isinstance(e, S.Excluded)}
    assert excluded == {key("p"): "wrong_result", key("q"): "wrong_result"}
    # The same colluders on an unaudited shard: a quorum of two established identities in
    # two prefixes, which only re-checks and audits can catch (verification.md, section 5).
    m2 = S.Scheduler(S.SchedulerSettings(cross_class_rate=0.0, recheck_cross_rate=0.0,
                                         request_interval_ms=0, trust=quick), rng=random.Random(7))
    m2.handle(S.JobAdded(0, job(1, audit_rate=0.0)))
    [g1] = grants(ask(m2, "p"))
    [g2] = grants(ask(m2, "q"))
    eff = result(m2, g1, "p", b"bad") + result(m2, g2, "q", b"bad", at=2)
    assert [e.digest for e in eff if isinstance(e, S.ShardAccepted)] == [b"bad".ljust(32, b".")]


def test_an_exclusion_reopens_what_the_excluded_worker_helped_accept_and_catches_its_partner():
    """Sustained collusion: p and q, established, agree on wrong outputs and get shard 0
    accepted. When p is caught (here by a known answer in shard 1), shard 0 is reopened,
    audited by the publisher's machine, and q, who agreed with p there, is excluded too."""
    quick = T.TrustSettings(established_accepted=0, established_age_ms=0,
                            trusted=frozenset({key("T")}))
    m = S.Scheduler(S.SchedulerSettings(cross_class_rate=0.0, recheck_cross_rate=0.0,
                                        request_interval_ms=0, trust=quick), rng=random.Random(7))
    m.handle(S.JobAdded(0, job(2, audit_rate=0.0)))
    gp = {g.shard: g for g in grants(ask(m, "p", slots=2))}
    [gq] = [g for g in grants(ask(m, "q", slots=2)) if g.shard == 0]
    eff = result(m, gp[0], "p", b"bad") + result(m, gq, "q", b"bad", at=2)
    assert [e.shard for e in eff if isinstance(e, S.ShardAccepted)] == [0]  # wrong, for now
    eff = result(m, gp[1], "p", b"bad", at=3, known_answer_ok=False)
    [reopened] = [e for e in eff if isinstance(e, S.ShardReopened)]
    assert (reopened.shard, reopened.lease_id) == (0, gp[0].lease_id)
    sh = m.shards[(JOB, 0)]
    assert sh.status == "open" and sh.audit and sh.accepted_lease is None
    assert m.job_counts(JOB)["accepted"] == 0 and m.jobs[JOB].status == "live"
    [gt] = [g for g in grants(ask(m, "T", 4, slots=2)) if g.shard == 0]
    eff = result(m, gt, "T", b"good", at=5)
    [gh] = [g for g in grants(ask(m, "h", 6)) if g.shard == 0]
    eff += result(m, gh, "h", b"good", at=7)
    [acc] = [e for e in eff if isinstance(e, S.ShardAccepted)]
    assert (acc.shard, acc.digest) == (0, b"good".ljust(32, b"."))
    assert {e.worker: e.claim for e in eff if isinstance(e, S.Excluded)} == {key("q"): "wrong_result"}
    assert not [e for e in eff if isinstance(e, S.Pay) and e.worker in (key("p"), key("q"))]


def test_the_publisher_audits_itself_when_it_has_no_other_trusted_machine():
    own = key("P")
    trust = T.TrustSettings(established_accepted=0, established_age_ms=0,
                            trusted=frozenset({own}))
    m = S.Scheduler(S.SchedulerSettings(cross_class_rate=0.0, recheck_cross_rate=0.0,
                                        request_interval_ms=0, own_key=own, trust=trust),
                    rng=random.Random(7))
    m.handle(S.JobAdded(0, job(2, audit_rate=1.0)))
    assert not m.audits_waiting()          # nothing issued yet: no shard drawn for an audit
    audit = S.WorkRequested(0, own, "self", CLASS, 1000.0, 4, (JOB,), audit_only=True)
    assert refused(m.handle(audit)) == "no_work"   # audits only: and none is drawn yet
    [ga] = grants(ask(m, "a"))
    assert m.audits_waiting()
    [gown] = grants(m.handle(S.WorkRequested(1, own, "self", CLASS, 1000.0, 4, (JOB,),
                                             audit_only=True)))
    assert gown.shard == ga.shard and not m.audits_waiting()
    [gb] = [g for g in grants(ask(m, "b", 2, slots=2)) if g.shard == ga.shard]
    eff = result(m, ga, "a", known_answer_ok=True) + result(m, gb, "b", at=3, known_answer_ok=True)
    eff += m.handle(S.ResultArrived(4, gown.lease_id, own, b"good".ljust(32, b"."),
                                    known_answer_ok=True))
    assert any(isinstance(e, S.ShardAccepted) for e in eff)
    assert {p.worker for p in eff if isinstance(p, S.Pay)} == {key("a"), key("b")}  # not own
    assert m.jobs[JOB].paid == 10


def test_failed_known_answer_excludes_with_evidence_and_refuses_further_requests():
    m = machine(trusted=["a", "b"])
    m.handle(S.JobAdded(0, job(2)))
    [g1, g2] = grants(ask(m, "x", slots=2)) or [None, None]
    eff = result(m, g1, "x", b"bad", known_answer_ok=False)
    [ex] = [e for e in eff if isinstance(e, S.Excluded)]
    assert ex.claim == "failed_known_answer" and ex.lease_ids == (g1.lease_id,)
    [cancel] = [e for e in eff if isinstance(e, S.CancelLeases)]
    assert cancel.lease_ids == (g2.lease_id,)
    assert refused(ask(m, "x", 20_000)) == "excluded"
    assert not any(isinstance(e, S.Pay) for e in eff)


def test_two_different_results_for_one_lease_exclude_the_signer():
    m = machine(trusted=["a"])
    m.handle(S.JobAdded(0, job(1)))
    [g] = grants(ask(m, "a"))
    assert result(m, g, "a", b"one") == []
    assert result(m, g, "a", b"one") == []  # the same result again: a retry
    eff = result(m, g, "a", b"two")
    assert [e.claim for e in eff if isinstance(e, S.Excluded)] == ["conflicting_results"]


def test_results_for_unknown_or_foreign_leases_are_peer_violations_and_change_nothing():
    m = machine(trusted=["a"])
    m.handle(S.JobAdded(0, job(1)))
    [g] = grants(ask(m, "a"))
    with pytest.raises(S.PeerViolation, match="never issued"):
        m.handle(S.ResultArrived(1, b"?" * 16, key("a"), b"d" * 32))
    with pytest.raises(S.PeerViolation, match="another worker"):
        m.handle(S.ResultArrived(1, g.lease_id, key("b"), b"d" * 32))
    assert m.leases[g.lease_id].state == "live"


def test_disagreement_brings_an_extra_replica_and_the_outvoted_result_resets_trust():
    m = machine(trusted=["a", "b", "c"])
    m.handle(S.JobAdded(0, job(1)))
    [ga], [gb] = grants(ask(m, "a")), grants(ask(m, "b"))
    result(m, ga, "a", b"good")
    result(m, gb, "b", b"cheap")
    [gc] = grants(ask(m, "c"))
    eff = result(m, gc, "c", b"good")
    assert {p.worker for p in eff if isinstance(p, S.Pay)} == {key("a"), key("c")}
    assert m.leases[gb.lease_id].verdict == "invalid"
    assert m.trust_of(key("b")).reset_ms is not None


def test_bounds_fail_the_shard_without_receipts():
    m = machine(trusted=list("abcdefghij"))
    m.handle(S.JobAdded(0, job(1, max_error=1)))
    [ga] = grants(ask(m, "a"))
    m.handle(S.LeaseFailed(1, ga.lease_id, key("a"), "crash"))
    [gb] = grants(ask(m, "b", 2))
    eff = m.handle(S.LeaseFailed(3, gb.lease_id, key("b"), "crash"))
    assert [e.shard for e in eff if isinstance(e, S.ShardFailed)] == [0]
    assert any(isinstance(e, S.JobDone) for e in eff)
    m2 = machine(trusted=list("abcdefghij"))
    m2.handle(S.JobAdded(0, job(1, max_total=3)))
    digests = iter([b"1", b"2", b"3"])
    out = []
    for who in "abc":
        [g] = grants(ask(m2, who, 5))
        out += result(m2, g, who, next(digests), at=6)
    assert any(isinstance(e, S.ShardFailed) for e in out)
    assert not any(isinstance(e, S.Pay) for e in out)


def test_hand_back_reissues_without_counting_an_error():
    m = machine(trusted=["a", "b"])
    m.handle(S.JobAdded(0, job(1)))
    [ga] = grants(ask(m, "a"))
    m.handle(S.HandedBack(1, ga.lease_id, key("a")))
    sh = m.shards[(JOB, 0)]
    assert sh.errors == 0 and sh.issued == 0
    assert grants(ask(m, "b", 2)) and m.trust_of(key("a")).fails == 0


def test_caps_per_identity_and_budget():
    m = machine()
    m.handle(S.JobAdded(0, job(8)))
    assert len(grants(ask(m, "a", slots=8))) == 2  # a fresh identity holds at most 2
    assert refused(ask(m, "a", 1)) == "quota"
    m2 = machine(trusted=["a"])
    m2.handle(S.JobAdded(0, job(8, budget=15)))
    assert len(grants(ask(m2, "a", slots=8))) == 3  # 3 x 5 credit


def test_cancel_reaches_every_holder():
    m = machine(trusted=["a", "b"])
    m.handle(S.JobAdded(0, job(2)))
    ask(m, "a", slots=2)
    ask(m, "b", slots=2)
    eff = m.handle(S.JobCancelled(5, JOB))
    assert {c.worker for c in eff if isinstance(c, S.CancelLeases)} == {key("a"), key("b")}
    assert refused(ask(m, "c", 6)) == "no_work"


def test_requests_are_rate_limited_per_identity():
    """One request per 10 s on average, in bursts of 3: a worker that asked about one job
    may ask about a new one at once, but a flood is refused until its tokens come back."""
    m = S.Scheduler(S.SchedulerSettings(), rng=random.Random(0))
    m.handle(S.JobAdded(0, job(1)))

    def backoff(effects) -> int | None:
        waits = [e.retry_after_ms for e in effects if isinstance(e, S.Refuse)
                 and e.reason == "backoff"]
        return waits[0] if waits else None

    assert [backoff(ask(m, "a", 100 * i)) for i in range(3)] == [None] * 3
    assert 9_000 <= backoff(ask(m, "a", 300)) <= 10_000
    assert backoff(ask(m, "a", 5_000)) is not None
    assert backoff(ask(m, "b", 5_000)) is None  # per identity
    assert backoff(ask(m, "a", 10_300)) is None  # a token came back


def test_requirements_not_met_is_not_eligible():
    m = machine()
    m.handle(S.JobAdded(0, job(1)))
    assert refused(ask(m, "a", jobs=())) == "not_eligible"


def test_ranking_is_keyed_and_stable():
    r1 = S.rank(SECRET, JOB, 3, key("a"))
    assert r1 == S.rank(SECRET, JOB, 3, key("a")) != S.rank(b"t" * 32, JOB, 3, key("a"))
    # one HMAC block holds 8 shards' ranks: neighbours in it, and the next block, differ
    ranks = [S.rank(SECRET, JOB, i, key("a")) for i in range(24)]
    assert len(set(ranks)) == 24 and all(len(r) == 4 for r in ranks)
    assert ranks != [S.rank(SECRET, JOB, i, key("b")) for i in range(24)]
    assert S.prefix_of("192.168.7.9") == "192.168.7.0/24"
    assert S.prefix_of("2001:db8:1:2::5") == "2001:db8:1::/48"
    assert S.prefix_of(None) == S.prefix_of("not an ip") == S.UNKNOWN_PREFIX
    assert S.prefix_of("10.1.2.3", v4_bits=16) == "10.1.0.0/16"


def test_restore_rebuilds_the_same_machine():
    m = machine(trusted=["a"])
    m.handle(S.JobAdded(0, job(1)))  # one shard: a and b hold replicas of it
    [ga] = grants(ask(m, "a"))
    [gb] = grants(ask(m, "b"))
    result(m, ga, "a")
    jobs, shards, leases, workers = m.take_changes()
    m2 = machine(trusted=["a"])
    m2.restore(jobs, shards, leases, workers)
    eff = result(m2, gb, "b")
    assert {p.worker for p in eff if isinstance(p, S.Pay)} == {key("a"), key("b")}
    with pytest.raises(S.CoreUsageError, match="fresh"):
        m2.restore(jobs, shards, leases, workers)


def test_events_round_trip_through_the_json_log():
    events = [S.JobAdded(0, job(2)), S.WorkRequested(1, key("a"), "p", CLASS, 2.5, 3, (JOB,)),
              S.ResultArrived(2, b"l" * 16, key("a"), b"d" * 32, True, None, (b"m" * 16,)),
              S.Tick(3), S.JobCancelled(4, JOB)]
    for ev in events:
        assert S.event_from_json(S.event_json(ev)) == ev
    logged = []
    m = S.Scheduler(S.SchedulerSettings(), rng=random.Random(0), sink=logged.append)
    m.handle(events[0])
    assert logged == [events[0]]


def test_an_event_log_replays_to_the_same_decisions():
    lines: list[str] = []

    def run(events, sink=None):
        m = S.Scheduler(S.SchedulerSettings(request_interval_ms=0), rng=S.KeyedRandom(b"k" * 32),
                        sink=sink)
        return [m.handle(e) for e in events]

    live = S.Scheduler(S.SchedulerSettings(request_interval_ms=0), rng=S.KeyedRandom(b"k" * 32),
                       sink=lambda e: lines.append(S.event_json(e)))
    effects = [live.handle(S.JobAdded(0, job(3)))]
    for i, who in enumerate("abcab"):
        effects.append(live.handle(S.WorkRequested(i + 1, key(who), who, CLASS, 1.0, 2, (JOB,))))
    g = [x for e in effects for x in grants(e)]
    effects.append(live.handle(S.ResultArrived(10, g[0].lease_id, key("a"), b"d" * 32)))
    effects.append(live.handle(S.Tick(10**9)))
    assert run([S.event_from_json(line) for line in lines]) == effects


def test_keyed_random_is_replayable_and_key_bound():
    a, b, c = S.KeyedRandom(b"k" * 32), S.KeyedRandom(b"k" * 32), S.KeyedRandom(b"x" * 32)
    assert [a.random() for _ in range(5)] == [b.random() for _ in range(5)]
    assert a.randbytes(16) != c.randbytes(16)
    assert 0 <= a.randrange(10) < 10


def test_time_going_back_is_our_bug():
    m = machine()
    m.handle(S.Tick(100_000))
    with pytest.raises(S.CoreUsageError, match="goes back"):
        m.handle(S.Tick(1))


# --- the publisher store: records survive, and a SIGKILL loses nothing committed ---------
def test_store_round_trips_the_machine(tmp_path):
    from p2pfleet.store.jobs import JobStore

    store = JobStore(tmp_path / "jobs.sqlite")
    m = machine(trusted=["a"])
    with store.transaction():
        m.handle(S.JobAdded(0, job(1)))  # one shard: a and b hold replicas of it
        store.add_job(job(1), {"note": "x"}, 0, [(b"d" * 32, [(3, 0)])])
        store.save_records(*m.take_changes())
    with store.transaction():
        [ga] = grants(ask(m, "a"))
        [gb] = grants(ask(m, "b"))
        result(m, ga, "a")
        store.save_records(*m.take_changes())
    store.close()
    store = JobStore(tmp_path / "jobs.sqlite")
    m2 = machine(trusted=["a"])
    m2.restore(*store.load_records())
    assert m2.leases[ga.lease_id].state == "returned" and m2.leases[gb.lease_id].state == "live"
    assert store.shard_inputs(JOB)[0] == (b"d" * 32, [(3, 0)])
    eff = result(m2, gb, "b")
    assert any(isinstance(e, S.ShardAccepted) for e in eff)
    assert store.secret("publisher") == store.secret("publisher")


def test_store_after_sigkill_keeps_every_committed_transaction(tmp_path):
    import signal
    import subprocess
    import sys

    from p2pfleet.store.jobs import JobStore

    path = tmp_path / "jobs.sqlite"
    code = (
        "import sys\n"
        "from p2pfleet.store.jobs import JobStore\n"
        "s = JobStore(sys.argv[1])\n"
        "i = 0\n"
        "while True:\n"
        "    with s.transaction():\n"
        "        s.save_result(i.to_bytes(16, 'big'), b'env', b'out', i)\n"
        "        s.add_receipt(i.to_bytes(16, 'big'), b'w' * 32, b'rcpt')\n"
        "    i += 1\n"
        "    if i == 200: print('ready', flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"ready"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = JobStore(path)
    n_results = store.conn.execute("SELECT count(*) FROM results").fetchone()[0]
    n_receipts = store.conn.execute("SELECT count(*) FROM receipts").fetchone()[0]
    assert n_results >= 200 and n_results == n_receipts  # whole transactions only


def test_a_one_class_fleet_does_not_wait_for_another_class():
    """A shard drawn for a cross-class replica waits (cross_class_wait_ms) only while a
    machine of another class asks for work; in a one-class fleet it would wait for nobody."""
    other = b"g" * 32

    def scheduler() -> S.Scheduler:
        trust = T.TrustSettings(trusted=frozenset(key(w) for w in "abz"))
        return S.Scheduler(S.SchedulerSettings(cross_class_rate=1.0, recheck_cross_rate=1.0,
                                               request_interval_ms=0, trust=trust),
                           rng=random.Random(7))

    def ask_as(m, who: str, hw_class: bytes, at: int) -> list:
        return m.handle(S.WorkRequested(at, key(who), f"10.0.{ord(who[0])}.0/24", hw_class,
                                        1000.0, 1, (JOB,)))

    one = scheduler()
    one.handle(S.JobAdded(0, job(1)))
    assert grants(ask_as(one, "a", CLASS, 0))
    assert grants(ask_as(one, "b", CLASS, 100))  # nobody of another class asks: no wait
    two = scheduler()
    assert refused(ask_as(two, "z", other, 0)) == "no_work"  # another class is in the fleet
    two.handle(S.JobAdded(0, job(1)))
    assert grants(ask_as(two, "a", CLASS, 5))
    assert not grants(ask_as(two, "b", CLASS, 100))  # the replica waits for z's class
    assert grants(ask_as(two, "z", other, 200))
