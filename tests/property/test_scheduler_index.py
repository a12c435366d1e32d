"""The scheduler's shard index decides exactly as the plain scan of every shard did.

`Scheduler` keeps, per job, the sorted shards with a replica to offer and the undecided ones,
refreshed from the records each rule marks as changed, keeps a shard's open-replica count
until it changes, and checks stalls against the job's requesters gathered once per tick.
`Scan` below is the same machine with the straightforward rules it replaced (the reference):
the window found by walking the shards in order from the first undecided one, a job done
when every shard is decided, the requesters gathered again for every shard, a shard's open
replicas counted on every read, ranks keyed afresh, the live leases counted per request.
Both are driven through one random sequence of work requests, results (agreeing, wrong,
failing a known answer), failures, hand-backs, expiries (ticks), cancellations and a second
job, and must return the same effects, hold the same windows and shard records after every
event. Ended jobs are forgotten now and then (`JobForgotten`) by both, and a third machine
that never forgets must keep deciding as they do (forgetting an ended job changes no other
decision). tools/bench_sim.py uses `Scan` as its baseline.
"""

from __future__ import annotations

import copy
import hashlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pfleet.core import scheduler as S
from p2pfleet.core import trust as T

OWN = b"P".ljust(32, b".")
CLASSES = (b"A" * 32, b"B" * 32)


class Scan(S.Scheduler):
    """The reference: the rules without the index (each read scans every shard)."""

    def _window(self, rec: S.JobRec) -> list[S.ShardRec]:
        job_id, n = rec.job.job_id, len(rec.job.samples)
        if not hasattr(self, "decided_prefix"):
            self.decided_prefix: dict[bytes, int] = {}  # per job: shards [0, n) are decided
        start = self.decided_prefix.get(job_id, 0)
        while start < n and self.shards[(job_id, start)].status != "open":
            start += 1
        self.decided_prefix[job_id] = start
        out = []
        for i in range(start, n):
            sh = self.shards[(job_id, i)]
            untouched = sh.target == 0 and not sh.fallback and sh.status == "open"
            if (untouched and rec.status == "live") or self.open_replicas(sh) > 0:
                out.append(sh)
                if len(out) >= self.s.window:
                    break
        return out

    def _reopen(self, sh: S.ShardRec, bad: S.LeaseRec, claim: str) -> list:
        effects = super()._reopen(sh, bad, claim)
        if hasattr(self, "decided_prefix"):
            self.decided_prefix[sh.job_id] = min(self.decided_prefix.get(sh.job_id, 0), sh.index)
        return effects

    def _maybe_done(self, job_id: bytes) -> list:
        rec = self.jobs[job_id]
        if rec.status != "live":
            return []
        if all(self.shards[(job_id, i)].status in ("accepted", "failed")
               for i in range(len(rec.job.samples))):
            rec.status = "done"
            self._dirty.add(("job", job_id))
            return [S.JobDone(job_id)]
        return []

    def _untrusted_room(self, sh: S.ShardRec) -> int:  # counted every time, never kept
        if (sh.status != "open" or self.jobs[sh.job_id].status != "live"
                or sh.fallback == "publisher"):
            return 0
        return self._count_room(sh)

    def _ranker(self, job: S.JobParams, worker: bytes):
        return lambda shard: S.rank(job.secret, job.job_id, shard, worker)

    def _live_counts(self, worker: bytes, prefix: str) -> tuple[int, int, int]:
        mine = in_prefix = fresh_in_prefix = 0  # a pass over the live leases, every time
        for l in self.live_leases():
            mine += l.worker == worker
            if l.prefix == prefix:
                in_prefix += 1
                fresh_in_prefix += l.fresh
        return mine, in_prefix, fresh_in_prefix

    def stalled(self, sh, now, busy=None, asking=None) -> bool:
        if sh.status != "open" or self.jobs[sh.job_id].status != "live":
            return False
        leases = self.shard_leases(sh.job_id, sh.index)
        if any(l.state == "live" for l in leases):
            return False
        if sh.fallback == "publisher":
            return any(l.worker == self.s.own_key for l in leases)
        if self.open_replicas(sh) <= 0:
            return False
        if busy is None:
            busy = {l.worker for l in self.live_leases()}
        asking = self._requesters(sh.job_id, now, busy)
        return bool(asking) and not any(self._able(sh, r, now) for r in asking)


def machines(window: int, own: bool, trusted: int, stall_wait_ms: int,
             lazy: bool) -> list[S.Scheduler]:
    trust = T.TrustSettings(
        trusted=frozenset({OWN} if own else set()) | {worker(i) for i in range(trusted)},
        established_accepted=2, established_age_ms=120_000)
    s = S.SchedulerSettings(window=window, request_interval_ms=0, stall_wait_ms=stall_wait_ms,
                            own_key=OWN if own else b"", cross_class_wait_ms=30_000,
                            trust=trust)
    # the simulator's options (records made on first use, no change list) on the new one
    return [S.Scheduler(s, rng=S.KeyedRandom(b"k" * 32), lazy_shards=lazy, keep_changes=not lazy),
            Scan(s, rng=S.KeyedRandom(b"k" * 32))]


def worker(i: int) -> bytes:
    return f"w{i}".encode().ljust(32, b".")


def job(name: bytes, shards: int, recheck: float, audit: float, quorum: int) -> S.JobParams:
    return S.JobParams(name.ljust(16, b"."), hashlib.sha256(name).digest(), (8,) * shards,
                       (3,) * shards, tuple(i % 3 != 2 for i in range(shards)),
                       (100,) * shards, quorum=quorum, recheck_rate=recheck, audit_rate=audit,
                       max_error=2)


def digest_of(shard: int, wrong: int) -> bytes:
    return hashlib.sha256(f"{shard} {wrong}".encode()).digest()


def by_id(lease: S.LeaseRec) -> bytes:
    return lease.lease_id


def unordered(effects: object) -> object:
    """One event's effects as a multiset, cancelled leases one by one (after a restart)."""
    if not isinstance(effects, list):
        return effects
    flat = [S.CancelLeases(e.worker, e.job_id, (l,), e.reason) if isinstance(e, S.CancelLeases)
            else e for e in effects for l in getattr(e, "lease_ids", (None,))]
    return sorted(map(repr, flat))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), window=st.integers(1, 6), own=st.booleans(), trusted=st.integers(0, 2),
       shards=st.integers(1, 20), workers=st.integers(2, 9), quorum=st.integers(1, 3),
       recheck=st.sampled_from([0.0, 0.3]), audit=st.sampled_from([0.0, 0.3]),
       stall_wait_ms=st.sampled_from([5_000, 30_000]), lazy=st.booleans())
def test_indexed_scheduler_decides_as_the_scan(data, window, own, trusted, shards, workers,
                                               quorum, recheck, audit, stall_wait_ms, lazy):
    new, ref = machines(window, own, trusted, stall_wait_ms, lazy)
    keeper = machines(window, own, trusted, stall_wait_ms, lazy)[0]  # never forgets
    jobs = [job(b"first", shards, recheck, audit, quorum)]
    now = 0
    both = (new, ref)
    # per worker: its prefix (some share one) and hardware class
    prefixes = [f"10.0.{i if i % 4 else 0}.0/24" for i in range(workers)]

    store: dict[tuple[str, object], object] = {}  # what a driver persisted (not lazy)
    restarted = False

    def step(ev: object, keep: bool = True) -> None:
        """`keep` False: the machine that never forgets does not see `ev` (a late message
        about a job the others forgot: it would take it)."""
        outs = []
        for m in (*both, keeper):
            if m is keeper and (isinstance(ev, S.JobForgotten) or not keep):
                continue
            try:
                outs.append(("ok", m.handle(ev)))
            except (S.PeerViolation, S.CoreUsageError, S.Forgotten) as exc:
                outs.append(("error", str(exc)))
        if restarted:
            outs = [(o, unordered(effects)) for o, effects in outs]
        assert outs[0] == outs[1], f"after {ev}"
        assert (isinstance(ev, S.JobForgotten) or not keep
                or outs[0] == outs[2]), f"forgetting, after {ev}"
        for rec in ref.jobs.values():
            assert ([sh.index for sh in new._window(new.jobs[rec.job.job_id])]
                    == [sh.index for sh in ref._window(rec)])
        assert [(k, new.shards[k]) for k in ref.shards] == list(ref.shards.items())
        for i in range(workers):  # the kept live-lease caps, against a count of them
            assert (new._live_counts(worker(i), prefixes[i])
                    == ref._live_counts(worker(i), prefixes[i]))
        if not lazy:  # each event's changes, persisted as a driver does
            taken = new.take_changes()
            assert taken == ref.take_changes()
            for kind, recs in zip(("job", "shard", "lease", "worker"), taken):
                for r in recs:
                    store[(kind, r.job.job_id if kind == "job" else (r.job_id, r.index)
                           if kind == "shard" else r.lease_id if kind == "lease"
                           else r.worker)] = r

    for i in range(0, workers, 2):  # veterans: established before the run, as fleet.py does
        for m in (*both, keeper):
            m.workers[worker(i)] = T.WorkerTrust(worker(i), accepted=10, first_valid_ms=-10**9)
        store[("worker", worker(i))] = new.workers[worker(i)]
    gone: list[S.LeaseRec] = []  # leases of forgotten jobs, as they were
    step(S.JobAdded(0, jobs[0]))
    for _ in range(data.draw(st.integers(10, 150), label="events")):
        now += data.draw(st.sampled_from([0, 500, 5_000, 40_000, 400_000]), label="dt")
        live = [l for l in ref.live_leases()]
        kind = data.draw(st.sampled_from(
            ["ask", "ask", "ask", "result", "result", "result", "fail", "hand_back", "tick",
             "own", "late", "cancel", "job", "forget", "stale", "restart"]), label="kind")
        if kind == "ask":
            i = data.draw(st.integers(0, workers - 1), label="worker")
            step(S.WorkRequested(now, worker(i), prefixes[i], CLASSES[i % 2], 0.05,
                                 data.draw(st.integers(1, 3), label="slots"),
                                 tuple(j.job_id for j in jobs)))
        elif kind == "own" and own:
            step(S.WorkRequested(now, OWN, "self", CLASSES[0], 0.05, 2,
                                 tuple(j.job_id for j in jobs), audit_only=True))
        elif kind in ("result", "late") and (live or kind == "late"):
            pool = live if kind == "result" else [l for l in ref.leases.values()
                                                  if l.state == "expired"]
            if not pool:
                continue
            lease = data.draw(st.sampled_from(pool), label="lease")
            wrong = data.draw(st.sampled_from([0] * 6 + [1, 2]), label="wrong")
            ka_known = ref.jobs[lease.job_id].job.known_answer[lease.shard]
            ka = None if not ka_known else data.draw(st.sampled_from([True, True, wrong == 0]))
            d = digest_of(lease.shard, wrong)
            agrees = tuple(l.lease_id for l in ref.returned(lease.job_id, lease.shard)
                           if l.digest == d)
            step(S.ResultArrived(now, lease.lease_id, lease.worker, d, True, ka, agrees))
        elif kind in ("fail", "hand_back") and live:
            lease = data.draw(st.sampled_from(live), label="lease")
            cls = S.LeaseFailed if kind == "fail" else S.HandedBack
            step(cls(now, lease.lease_id, lease.worker, "error") if kind == "fail"
                 else cls(now, lease.lease_id, lease.worker))
        elif kind == "stale":
            # what a worker may still send: a second, different result for a lease it
            # returned; a failure or hand-back after its lease expired; any of these for a
            # lease of a job forgotten since (refused as Forgotten by the forgetting ones)
            pool = [l for l in ref.leases.values() if l.state in ("returned", "expired")]
            pool += [l for l in gone if l.job_id not in ref.jobs]
            if not pool:
                continue
            lease = data.draw(st.sampled_from(pool), label="lease")
            msg = data.draw(st.sampled_from(["result", "fail", "hand_back"]), label="msg")
            if msg == "result":
                ev = S.ResultArrived(now, lease.lease_id, lease.worker,
                                     digest_of(lease.shard, 3), True, None, (), lease.job_id)
            elif msg == "fail":
                ev = S.LeaseFailed(now, lease.lease_id, lease.worker, "late", lease.job_id)
            else:
                ev = S.HandedBack(now, lease.lease_id, lease.worker, lease.job_id)
            step(ev, keep=lease.job_id in ref.jobs)
        elif kind == "restart" and not lazy:
            # a driver's restart (publisher/engine.py): ended jobs are forgotten, the live
            # ones restored from the store; what the scheduler keeps in memory only (who
            # asked lately, hardware classes seen, prefix back-offs, the clock) is carried
            # over so decisions can be compared. restore() must rebuild every index the
            # handlers keep.
            for j in jobs:
                if j.job_id in ref.jobs and ref.jobs[j.job_id].status != "live":
                    gone.extend(copy.copy(l) for l in ref.leases.values()
                                if l.job_id == j.job_id)
                    step(S.JobForgotten(now, j.job_id))
            held = set(ref.jobs)
            records = {k: [r for (kind_, _), r in store.items() if kind_ == k and
                           (k == "worker" or (r.job.job_id if k == "job" else r.job_id) in held)]
                       for k in ("job", "shard", "lease", "worker")}
            back = S.Scheduler(new.s, rng=S.KeyedRandom(b"k" * 32))
            back.rng.setstate(new.rng.getstate())
            back.restore(records["job"], records["shard"], records["lease"], records["worker"],
                         forgotten=new.forgotten)
            assert back.jobs == new.jobs and back.leases == new.leases
            assert dict(back.shards) == dict(new.shards) and back.workers == new.workers
            # The same records; the store keeps no issue order within a millisecond (a
            # grant's leases), so a restored machine lists them by (issue time, id): verify.py
            # orders votes by arrival, and only the order of effects (payments, cancelled
            # ids) can differ (`unordered`).
            assert ({k: sorted(v, key=by_id) for k, v in back._by_shard.items()}
                    == {k: sorted(v, key=by_id) for k, v in new._by_shard.items()})
            assert sorted(back._live) == sorted(new._live)
            assert back._live_of_worker == new._live_of_worker
            assert back._live_in_prefix == new._live_in_prefix
            assert back._next_expiry() == new._next_expiry()
            # (a running machine drops decided shards from it at its next tick)
            assert back._own_fallback == {k for k in new._own_fallback
                                          if new.shards[k].status == "open"}
            # arrival order only ranks the results of one shard: restored from the held
            # leases, it may be below the forgotten jobs' (carried over to compare records)
            assert back._order == max((l.order for l in back.leases.values()), default=0)
            back._requests, back._class_seen = dict(new._requests), dict(new._class_seen)
            back._prefix_backoff, back._now = dict(new._prefix_backoff), new._now
            back._order = new._order
            new, restarted = back, True
            both = (new, ref)
        elif kind == "tick":
            step(S.Tick(now))
        elif (kind == "cancel" and len(jobs) > 1 and jobs[-1].job_id not in ref.forgotten
              and data.draw(st.booleans())):
            step(S.JobCancelled(now, jobs[-1].job_id))
        elif kind == "job" and len(jobs) < 2:
            jobs.append(job(b"second", data.draw(st.integers(1, 12)), recheck, audit, quorum))
            step(S.JobAdded(now, jobs[-1]))
        elif kind == "forget" and any(j.job_id in ref.jobs and ref.jobs[j.job_id].status != "live"
                                      for j in jobs):
            ended = next(j.job_id for j in jobs
                         if j.job_id in ref.jobs and ref.jobs[j.job_id].status != "live")
            taken = ref.take_changes()  # its changes reach the store first
            if not lazy:
                assert new.take_changes() == taken
            gone.extend(copy.copy(l) for l in ref.leases.values() if l.job_id == ended)
            step(S.JobForgotten(now, ended))
            assert ended not in new.jobs and not any(k[0] == ended for k in new.shards)
        else:
            step(S.Tick(now))
    for j in jobs:
        if j.job_id not in ref.forgotten:
            assert new.job_counts(j.job_id) == ref.job_counts(j.job_id)
    if not lazy:
        assert new.take_changes() == ref.take_changes()
