"""Stalled shards in the pure scheduler: detected only after `stall_wait_ms`, computed by the
publisher when it can, else the replica rules relaxed in RELAX_ORDER, never silently
(work-and-leases.md, section 4, "Stalled shards")."""

from __future__ import annotations


from p2pfleet.core import scheduler as S
from p2pfleet.core import trust as T
from p2pfleet.store.jobs import JobStore

JOB = b"j" * 16
SECRET = b"s" * 32
CLASS = b"c" * 32
OWN = b"P".ljust(32, b".")
WAIT = 5_000
GOOD = b"good".ljust(32, b".")


def key(name: str) -> bytes:
    return name.encode().ljust(32, b".")


def job(n: int = 1, **kw) -> S.JobParams:
    kw.setdefault("audit_rate", 0.0)
    return S.JobParams(JOB, SECRET, (10,) * n, (5,) * n, (True,) * n, (100,) * n, **kw)


def machine(*, own: bool, trusted=(), established_everyone=False, sink=None) -> S.Scheduler:
    trust = T.TrustSettings(trusted=frozenset(key(t) for t in trusted) | ({OWN} if own else set()),
                            **({"established_accepted": 0, "established_age_ms": 0}
                               if established_everyone else {}))
    settings = S.SchedulerSettings(cross_class_rate=0.0, recheck_cross_rate=0.0,
                                   request_interval_ms=0, stall_wait_ms=WAIT,
                                   own_key=OWN if own else b"", trust=trust)
    return S.Scheduler(settings, rng=S.KeyedRandom(b"k" * 32), sink=sink)


def ask(m, who: str, at: int, prefix: str | None = None) -> list[S.LeaseGrant]:
    eff = m.handle(S.WorkRequested(at, key(who), prefix or f"10.0.{ord(who[0])}.0/24", CLASS,
                                   1000.0, 1, (JOB,)))
    return [g for e in eff if isinstance(e, S.Grant) for g in e.leases]


def own_ask(m, at: int) -> list[S.LeaseGrant]:
    eff = m.handle(S.WorkRequested(at, OWN, "self", b"\0" * 32, 100.0, 1, (JOB,),
                                   audit_only=True))
    return [g for e in eff if isinstance(e, S.Grant) for g in e.leases]


def result(m, g, who: str, at: int, digest: bytes = GOOD, **kw) -> list:
    worker = OWN if who == "P" else key(who)
    return m.handle(S.ResultArrived(at, g.lease_id, worker, digest, known_answer_ok=True, **kw))


def of(effects, cls):
    return [e for e in effects if isinstance(e, cls)]


def two_results_need_three(m) -> None:
    """A re-checked quorum-2 shard (three agreeing results needed) that a and b computed:
    nobody else asks, so no asking worker may take its third replica."""
    m.handle(S.JobAdded(0, job(1, quorum=2, recheck_rate=1.0)))
    [ga] = ask(m, "a", 0)
    [gb] = ask(m, "b", 0)
    assert m.shards[(JOB, 0)].target == 3
    assert not result(m, ga, "a", 1) + result(m, gb, "b", 2)  # no quorum of three yet


def test_a_stall_is_detected_only_after_the_wait_then_the_publisher_computes_it():
    m = machine(own=True, trusted=["a", "b"])
    two_results_need_three(m)
    ask(m, "a", 100), ask(m, "b", 100)           # they ask, and may not take it
    assert not of(m.handle(S.Tick(1_000)), S.ShardStalled)
    assert m.shards[(JOB, 0)].stalled_ms == 1_000
    assert not of(m.handle(S.Tick(1_000 + WAIT - 1)), S.ShardStalled)
    [st] = of(m.handle(S.Tick(1_000 + WAIT)), S.ShardStalled)
    assert (st.shard, st.step) == (0, "publisher")
    sh = m.shards[(JOB, 0)]
    assert sh.fallback == "publisher" and sh.status == "open"
    assert m.audits_waiting() and m.open_replicas(sh) == 1
    assert ask(m, "c", 7_000) == []              # a newcomer does not get the publisher's replica
    [gown] = own_ask(m, 7_001)
    eff = result(m, gown, "P", 8_000)
    [acc] = of(eff, S.ShardAccepted)
    assert acc.digest == GOOD and of(eff, S.JobDone)  # a, b and the publisher agree
    assert m.leases[gown.lease_id].verdict == "valid"
    # The publisher's own result is never paid; a and b were paid when they agreed.
    assert not [p for p in of(eff, S.Pay) if p.worker == OWN]
    assert m.job_counts(JOB)["self_computed"] == 1


def test_no_stall_while_nobody_asks_or_an_eligible_worker_asks():
    m = machine(own=True, trusted=["a", "b", "c"])
    two_results_need_three(m)
    for t in (10_000, 10_000 + 10 * WAIT):      # nobody asked recently: a fleet yet to come
        assert not of(m.handle(S.Tick(10**6 + t)), S.ShardStalled)
    now = 2 * 10**6
    m.handle(S.WorkRequested(now, key("c"), "10.0.99.0/24", CLASS, 1000.0, 0, (JOB,)))  # no slot
    for t in range(0, 3 * WAIT, 1_000):          # c could take it (once it has a free slot)
        assert not of(m.handle(S.Tick(now + t)), S.ShardStalled)
    assert m.shards[(JOB, 0)].stalled_ms == 0


def test_a_busy_worker_counts_as_part_of_the_fleet():
    """A worker computing a long lease asks again only when done: it still could take the
    shard, so the shard is not stalled (else a busy fleet's shards would go to the fallback)."""
    m = machine(own=True, trusted=["a", "b", "c"])
    other = S.JobParams(b"o" * 16, SECRET, (10,), (5,), (True,), (100,), audit_rate=0.0)
    m.handle(S.JobAdded(0, other))
    eff = m.handle(S.WorkRequested(0, key("c"), "10.0.99.0/24", CLASS, 1000.0, 1,
                                   (JOB, other.job_id)))
    [gc] = [g for e in eff if isinstance(e, S.Grant) for g in e.leases]
    two_results_need_three(m)
    later = 5 * S.MINUTE_MS                      # c asked long ago but holds a live lease
    ask(m, "a", later)
    assert not of(m.handle(S.Tick(later + 1)) + m.handle(S.Tick(later + 1 + WAIT)),
                  S.ShardStalled)
    m.handle(S.HandedBack(later + 2, gc.lease_id, key("c")))   # c is gone now
    m.handle(S.Tick(later + 3))
    assert of(m.handle(S.Tick(later + 3 + WAIT)), S.ShardStalled)


def test_without_self_compute_the_rules_relax_in_order_and_stay_sound():
    # Everyone established at once; an audit whose trusted machine ("t") never comes.
    m = machine(own=False, trusted=["t"], established_everyone=True)
    m.handle(S.JobAdded(0, job(1, quorum=2, recheck_rate=1.0, audit_rate=1.0)))
    p1, p2 = "10.0.1.0/24", "10.0.2.0/24"
    [ga] = ask(m, "a", 0, p1)
    m.handle(S.LeaseFailed(1, ga.lease_id, key("a"), "timeout"))
    [gc] = ask(m, "c", 2, p2)
    [gb] = ask(m, "b", 3, p1)                    # a's lease ended: p1 is free again
    result(m, gc, "c", 4), result(m, gb, "b", 5)
    sh = m.shards[(JOB, 0)]
    assert (sh.target, sh.audit) == (3, True)
    t, steps = 2 * S.MINUTE_MS, []               # a's failure back-off is over
    for _ in range(12):
        for who, pre in (("a", p1), ("b", p1), ("c", p2)):
            for g in ask(m, who, t, pre):
                result(m, g, who, t + 1)
        eff = m.handle(S.Tick(t + 2)) + m.handle(S.Tick(t + 2 + WAIT))
        steps += [e.step for e in of(eff, S.ShardStalled)]
        if sh.status != "open":
            break
        t += 2 * WAIT + 10
    assert steps == ["reissue", "prefix", "recheck", "audit"]
    assert sh.status == "accepted" and sh.fallback == "reissue,prefix,recheck,audit"
    backers = [l for l in m.returned(JOB, 0) if l.verdict == "valid"]
    assert {l.worker for l in backers} == {key("a"), key("b"), key("c")}


def test_a_fresh_swarm_never_gets_a_shard_accepted_by_relaxing():
    """Throwaway identities in many prefixes take and drop a shard, or answer wrongly, to
    force the fallback: without self-compute every relaxation keeps the rule that at most
    one fresh identity votes, so nothing is accepted (it waits, marked); with self-compute
    the publisher computes the shard once, and its result decides."""
    for own in (False, True):
        m = machine(own=own)
        m.handle(S.JobAdded(0, job(1, quorum=2)))
        t, stalls = 0, []
        for i in range(40):
            who = f"x{i}"
            for g in ask(m, who, t, f"10.{i}.0.0/24"):
                if i % 2:
                    m.handle(S.LeaseFailed(t + 1, g.lease_id, key(who), "timeout"))
                else:
                    result(m, g, who, t + 1, digest=b"wrong".ljust(32, b"."))
            if own:
                for g in own_ask(m, t + 2):
                    result(m, g, "P", t + 3)
            stalls += of(m.handle(S.Tick(t + 4)) + m.handle(S.Tick(t + 4 + WAIT)), S.ShardStalled)
            t += 2 * WAIT + 10
        sh = m.shards[(JOB, 0)]
        own_leases = [l for l in m.shard_leases(JOB, 0) if l.worker == OWN]
        if own:
            assert sh.status == "accepted" and m.leases[sh.accepted_lease].worker == OWN
            assert len(own_leases) == 1          # the fallback cost one computation
        else:
            assert sh.status != "accepted" and not own_leases
            assert [s.step for s in stalls][-1] == "exhausted"
            assert "exhausted" in sh.fallback
            assert m.job_counts(JOB)["exhausted"] == 1


def test_the_publishers_failed_own_computation_fails_the_shard_with_a_reason():
    m = machine(own=True, trusted=["a", "b"])
    two_results_need_three(m)
    ask(m, "a", 100)
    m.handle(S.Tick(1_000)), m.handle(S.Tick(1_000 + WAIT))
    [gown] = own_ask(m, 7_000)
    m.handle(S.HandedBack(7_001, gown.lease_id, OWN))
    ask(m, "a", 7_002)
    m.handle(S.Tick(8_000))
    eff = m.handle(S.Tick(8_000 + WAIT))
    [f] = of(eff, S.ShardFailed)
    assert "publisher's own computation" in f.reason and of(eff, S.JobDone)


def test_stall_decisions_replay_from_the_event_log_and_survive_a_restart(tmp_path):
    lines: list[str] = []
    live = machine(own=True, trusted=["a", "b"], sink=lambda e: lines.append(S.event_json(e)))
    two_results_need_three(live)
    ask(live, "a", 100)
    effects = [live.handle(S.Tick(1_000)), live.handle(S.Tick(1_000 + WAIT))]
    assert of(effects[1], S.ShardStalled)
    replayed = machine(own=True, trusted=["a", "b"])
    out = [replayed.handle(S.event_from_json(line)) for line in lines]
    assert out[-2:] == effects
    # The store keeps how the stall was resolved: a restarted publisher computes it.
    store = JobStore(tmp_path / "jobs.sqlite")
    with store.transaction():
        store.add_job(live.jobs[JOB].job, {}, 0, [(b"d" * 32, [])])
        store.save_records(*live.take_changes())
    store.close()
    store = JobStore(tmp_path / "jobs.sqlite")
    again = machine(own=True, trusted=["a", "b"])
    again.restore(*store.load_records())
    store.close()
    assert again.shards[(JOB, 0)].fallback == "publisher"
    [gown] = own_ask(again, 7_000)
    assert of(result(again, gown, "P", 7_001), S.ShardAccepted)
