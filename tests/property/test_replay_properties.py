"""Any scheduler run, logged as the publisher logs it, replays to the same decisions.

Hypothesis draws a run: workers (one of them a cheater failing known answers, one the
publisher's own machine computing audits) asking for work, returning good or bad results,
failing or handing back leases, time passing, and restarts of the publisher, each of which
rebuilds the machine from the records persisted so far (as `JobStore.load_records` gives
them) with a fresh key and appends a header. With re-check and audit draws on, `sim replay`
must take every decision again, across every restart.
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pfleet.core import eventlog
from p2pfleet.core import scheduler as S
from p2pfleet.core import trust as T
from p2pfleet.sim.replay import replay

JOB = b"j" * 16
CLASS = b"c" * 32
WORKERS = ("a", "b", "c", "d", "cheat", "own")


def key(name: str) -> bytes:
    return name.encode().ljust(32, b".")


SETTINGS = S.SchedulerSettings(
    cross_class_rate=0.0, request_interval_ms=0, stall_wait_ms=5_000, own_key=key("own"),
    trust=T.TrustSettings(established_accepted=0, established_age_ms=0,
                          trusted=frozenset({key("own"), key("a"), key("b")})))

ASK = st.tuples(st.just("ask"), st.sampled_from(WORKERS), st.integers(1, 3))
RESULT = st.tuples(st.just("result"), st.integers(0, 50), st.integers(0, 9).map(lambda n: n > 0))
ACTIONS = st.lists(st.one_of(
    ASK, ASK, ASK, RESULT, RESULT, RESULT,
    st.tuples(st.just("fail"), st.integers(0, 50), st.sampled_from(["fail", "hand_back"])),
    st.tuples(st.just("tick"), st.integers(1, 20 * 60_000), st.just(0)),
    st.tuples(st.just("restart"), st.just(0), st.just(0)),
), min_size=40, max_size=150)


class Publisher:
    """The scheduler as the engine drives it: each event logged with its effects, its
    changes persisted, restarts rebuilt from what was persisted."""

    def __init__(self, log: Path):
        self.log, self.store, self.starts = log, ({}, {}, {}, {}), 0
        self.start()

    def start(self) -> None:
        self.starts += 1
        k = self.starts.to_bytes(32, "big")
        self.m = S.Scheduler(SETTINGS, rng=S.KeyedRandom(k))
        records = tuple(list(part.values()) for part in self.store)
        restored = None
        if any(records):
            self.m.restore(*records)
            restored = {name: [eventlog.plain(r) for r in part] for name, part in
                        zip(("jobs", "shards", "leases", "workers"), records)}
        with self.log.open("a") as f:
            f.write(eventlog.header("scheduler", SETTINGS, rng={"key": k.hex(), "counter": 0},
                                    restored=restored) + "\n")

    def handle(self, ev) -> list:
        try:
            effects = self.m.handle(ev)
        except (S.PeerViolation, S.CoreUsageError):
            return []  # refused: changes nothing, not logged (as the engine)
        with self.log.open("a") as f:
            f.write(eventlog.record(ev, effects) + "\n")
        jobs, shards, leases, workers = self.m.take_changes()
        for part, recs, by in zip(self.store, (jobs, shards, leases, workers), (
                lambda r: r.job.job_id, lambda r: (r.job_id, r.index), lambda r: r.lease_id,
                lambda r: r.worker)):
            for r in recs:
                part[by(r)] = r
        return effects


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(actions=ACTIONS)
def test_every_logged_run_replays_across_restarts(tmp_path_factory, actions):
    log = tmp_path_factory.mktemp("replay") / "pub.jsonl"
    pub = Publisher(log)
    at = 1_000
    pub.handle(S.JobAdded(at, S.JobParams(JOB, b"s" * 32, (10,) * 6, (5,) * 6, (True,) * 6,
                                          (100,) * 6, recheck_rate=0.3, audit_rate=0.3)))
    held: list[tuple[bytes, str, int]] = []  # (lease id, worker, shard) not yet answered
    returned: dict[int, list[tuple[bytes, bytes]]] = {}  # shard -> (lease id, digest)
    for kind, x, y in actions:
        at += 50
        if kind == "ask":
            i = WORKERS.index(x)
            for e in pub.handle(S.WorkRequested(at, key(x), f"10.0.{i}.0/24", CLASS, 100.0, y,
                                                (JOB,), audit_only=x == "own")):
                if isinstance(e, S.Grant):
                    held += [(g.lease_id, x, g.shard) for g in e.leases]
        elif kind in ("result", "fail") and held:
            lease_id, who, shard = held.pop(x % len(held))
            if kind == "fail" and y == "hand_back":
                pub.handle(S.HandedBack(at, lease_id, key(who)))
            elif kind == "fail":
                pub.handle(S.LeaseFailed(at, lease_id, key(who), "error"))
            else:
                digest = (b"bad" if who == "cheat" or not y else b"good").ljust(32, b".")
                same = tuple(l for l, d in returned.get(shard, []) if d == digest)
                pub.handle(S.ResultArrived(at, lease_id, key(who), digest,
                                           known_answer_ok=who != "cheat", agrees=same))
                returned.setdefault(shard, []).append((lease_id, digest))
        elif kind == "tick":
            at += x
            pub.handle(S.Tick(at))
        elif kind == "restart":
            pub.start()
    report = replay([log])
    assert report.divergence is None, report.divergence
    assert report.segments == pub.starts
    assert report.jobs[JOB.hex()] == pub.m.job_counts(JOB)
