"""The scheduler against simulated fleets of honest workers and cheaters (pure, virtual time).

A small discrete-event driver plays the publisher's side the way the engine does: workers
ask for work, compute for a while (or vanish, or fail), and return results whose "outputs"
are digests: honest workers of any hardware class agree (tolerance), a cheat's digest
disagrees with honest ones, and the known-answer rows a shard holds fail for every cheat
(each cheat here substitutes the whole shard's computation). Properties, for every seed:
no shard lost (each ends accepted or failed with a reason), none accepted twice, zero wrong
results accepted, never two replicas of a shard to one peer or to one network prefix at a
time, and a swarm of fresh identities never gets a shard accepted on its own.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfleet.core import scheduler as S
from p2pfleet.core import trust as T

MIN = 60_000
HOUR = 60 * MIN


@dataclass
class Worker:
    name: str
    prefix: str
    cheat: str = ""            # "", random, fp16, copy, strategic
    hw_class: bytes = b"A" * 32
    flaky: float = 0.0         # probability of dropping a lease silently
    honest_streak: int = 12    # strategic: honest this many results first
    key: bytes = b""
    done: int = 0
    busy: list = field(default_factory=list)  # (finish_at, grant)

    def __post_init__(self) -> None:
        self.key = self.name.encode().ljust(32, b".")


def honest_digest(shard: int) -> bytes:
    return b"H" + shard.to_bytes(4, "big") + b"." * 27


class Sim:
    def __init__(self, seed: int, shards: int, workers: list[Worker], *, trusted=(),
                 known_answers: bool = True, quorum: int = 2, recheck: float = 0.07,
                 trust: T.TrustSettings | None = None, days: float = 2.0):
        self.rng = random.Random(seed)
        trust = trust or T.TrustSettings()
        trust = T.TrustSettings(**{**trust.__dict__, "trusted": frozenset(
            w.key for w in workers if w.name in trusted)})
        self.m = S.Scheduler(S.SchedulerSettings(trust=trust, cross_class_wait_ms=5 * MIN,
                                                 fresh_need_known_answer=known_answers),
                             rng=random.Random(seed + 1))
        self.job = S.JobParams(b"J" * 16, b"s" * 32, (32,) * shards, (10,) * shards,
                               (known_answers,) * shards, (1000,) * shards, quorum=quorum,
                               recheck_rate=recheck)
        self.workers = workers
        self.by_key = {w.key: w for w in workers}
        self.accepted: dict[int, bytes] = {}
        self.failed: dict[int, str] = {}
        self.excluded: set[bytes] = set()
        self.wrong_accepted = 0
        self.now = 0
        self.end = int(days * 24 * HOUR)
        self.m.handle(S.JobAdded(0, self.job))

    def digest_for(self, w: Worker, shard: int) -> bytes:
        cheat = w.cheat
        if cheat == "strategic":
            cheat = "fp16" if w.done >= w.honest_streak else ""
        if cheat == "random":
            return bytes(self.rng.getrandbits(8) for _ in range(32))
        if cheat == "fp16":
            return b"F" + shard.to_bytes(4, "big") + b"." * 27
        if cheat == "copy":
            return honest_digest((shard + 1) % len(self.job.samples))
        return honest_digest(shard)

    def agrees(self, a: bytes, b: bytes) -> bool:
        return a == b  # honest classes are bit-identical here; every cheat differs

    def apply(self, effects) -> None:
        for e in effects:
            if isinstance(e, S.ShardAccepted):
                assert e.shard not in self.accepted, "shard accepted twice"
                self.accepted[e.shard] = e.digest
                if e.digest != honest_digest(e.shard):
                    self.wrong_accepted += 1
            elif isinstance(e, S.ShardReopened):  # decided again later, without the excluded
                digest = self.accepted.pop(e.shard)
                self.wrong_accepted -= digest != honest_digest(e.shard)
            elif isinstance(e, S.ShardFailed):
                assert e.reason
                self.failed[e.shard] = e.reason
            elif isinstance(e, S.Excluded):
                self.excluded.add(e.worker)
            elif isinstance(e, S.CancelLeases):
                w = self.by_key[e.worker]
                w.busy = [(t, g) for t, g in w.busy if g.lease_id not in e.lease_ids]

    def check_replica_rules(self) -> None:
        for i in range(len(self.job.samples)):
            leases = self.m.shard_leases(self.job.job_id, i)
            workers = [l.worker for l in leases]
            assert len(workers) == len(set(workers)), "two replicas to one peer"
            held = [l.prefix for l in leases if l.state in ("live", "returned")]
            assert len(held) == len(set(held)), "two replicas held in one prefix"
            fresh = [l for l in leases if l.fresh and l.state in ("live", "returned")
                     and l.verdict != "invalid"]  # an invalid result is in no quorum
            assert len(fresh) <= 1, "two fresh identities on one shard"

    def step(self) -> None:
        self.apply(self.m.handle(S.Tick(self.now)))
        order = self.workers[:]
        self.rng.shuffle(order)
        for w in order:
            for item in [x for x in w.busy if x[0] <= self.now]:
                if item not in w.busy:
                    continue  # cancelled meanwhile
                w.busy.remove(item)
                g = item[1]
                if self.rng.random() < w.flaky:
                    continue  # vanished: the lease expires
                digest = self.digest_for(w, g.shard)
                mates = self.m.returned(g.job_id, g.shard)
                agrees = tuple(l.lease_id for l in mates if self.agrees(l.digest, digest))
                ka = (digest == honest_digest(g.shard)) if self.job.known_answer[g.shard] else None
                self.apply(self.m.handle(S.ResultArrived(self.now, g.lease_id, w.key, digest,
                                                         True, ka, agrees)))
                w.done += 1
            if len(w.busy) < 2:
                eff = self.m.handle(S.WorkRequested(self.now, w.key, w.prefix, w.hw_class, 50.0,
                                                    2 - len(w.busy), (self.job.job_id,)))
                self.apply(eff)
                for e in eff:
                    if isinstance(e, S.Grant):
                        for g in e.leases:
                            w.busy.append((self.now + self.rng.randint(1, 5) * MIN, g))
                self.check_replica_rules()

    def run(self) -> "Sim":
        n = len(self.job.samples)
        last_change, decided = 0, 0
        while self.now < self.end and len(self.accepted) + len(self.failed) < n:
            self.now += MIN
            self.step()
            if len(self.accepted) + len(self.failed) != decided or any(w.busy for w in self.workers):
                decided, last_change = len(self.accepted) + len(self.failed), self.now
            elif self.now - last_change > 6 * HOUR:
                break  # idle: what is left waits for an eligible worker
        return self


def fleet(honest: int, cheaters: list[tuple[str, str]], flaky: float = 0.0) -> list[Worker]:
    ws = [Worker(f"h{i}", f"10.0.{i}.0/24", hw_class=(b"A" if i % 2 else b"B") * 32, flaky=flaky)
          for i in range(honest)]
    ws += [Worker(name, prefix, cheat=cheat) for name, prefix, cheat in
           [(f"x{i}", p, c) for i, (c, p) in enumerate(cheaters)]]
    return ws


HONEST_TRUSTED = [f"h{i}" for i in range(3)]


def assert_sound(sim: Sim) -> None:
    n = len(sim.job.samples)
    assert sim.wrong_accepted == 0
    for i in range(n):
        sh = sim.m.shards[(sim.job.job_id, i)]
        # Not lost: decided, or still offered to the next eligible worker that asks (a shard
        # can wait when every established identity in reach has held it once already).
        assert i in sim.accepted or i in sim.failed or sim.m.open_replicas(sh) > 0, f"shard {i} lost"
    for i, d in sim.accepted.items():
        assert d == honest_digest(i)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), shards=st.integers(1, 30), flaky=st.sampled_from([0.0, 0.2]),
       cheat=st.sampled_from(["random", "fp16", "copy", "strategic"]))
def test_no_shard_lost_none_twice_no_wrong_result(seed, shards, flaky, cheat):
    # Honest newcomers become established after 10 results and an hour (the defaults' day
    # would leave shards waiting: only established identities may take a second replica).
    ws = fleet(6, [(cheat, "10.9.0.0/24"), (cheat, "10.9.1.0/24")], flaky=flaky)
    trust = T.TrustSettings(established_age_ms=HOUR, reset_quiet_ms=HOUR)
    sim = Sim(seed, shards, ws, trusted=HONEST_TRUSTED, trust=trust).run()
    assert_sound(sim)
    if not flaky:
        assert len(sim.accepted) == shards  # honest capacity suffices: nothing fails


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10**6), shards=st.integers(1, 20))
def test_a_swarm_of_fresh_identities_never_forms_a_quorum_alone(seed, shards):
    ws = [Worker(f"s{i}", f"10.{i}.0.0/24", cheat="fp16") for i in range(20)]
    sim = Sim(seed, shards, ws, days=0.25).run()
    assert sim.accepted == {}


# Cheats of the issue, each with its seed, shard count and cheat fraction stated. Defaults
# of the design: every shard holds known-answer rows, quorum 2, re-check 7%.
CHEATS = [
    # (name, cheaters, seed, shards)
    ("random outputs", [("random", "10.9.0.0/24")], 11, 60),
    ("fp16 weights", [("fp16", "10.9.0.0/24")], 12, 60),
    ("deterministic colluders (same fp16 cheat)", [("fp16", "10.9.0.0/24"), ("fp16", "10.9.1.0/24")], 13, 60),
    ("copied results", [("copy", "10.9.0.0/24")], 14, 60),
    ("ten identities behind one prefix", [("fp16", "10.9.9.0/24")] * 10, 15, 60),
]


def test_each_cheat_gets_zero_wrong_results_and_is_excluded():
    for name, cheaters, seed, shards in CHEATS:
        sim = Sim(seed, shards, fleet(4, cheaters), trusted=HONEST_TRUSTED).run()
        assert_sound(sim)
        cheat_keys = {w.key for w in sim.workers if w.cheat}
        leased = {l.worker for l in sim.m.leases.values()}
        assert cheat_keys & leased, f"{name}: the cheaters got no work at all"
        assert (cheat_keys & leased) <= sim.excluded, f"{name}: a cheater that worked was not excluded"


def test_strategic_cheater_honest_for_a_streak_then_cheating_under_single_copies():
    # Established after 10 results and an hour; single copies need a streak of 10 worth
    # 10 shards. The cheater turns to fp16 after 25 honest results. Seed 21, 200 shards.
    trust = T.TrustSettings(established_age_ms=HOUR, reset_quiet_ms=HOUR)
    ws = fleet(4, [])
    ws.append(Worker("x0", "10.9.0.0/24", cheat="strategic", honest_streak=25))
    sim = Sim(21, 200, ws, trusted=HONEST_TRUSTED, trust=trust, days=4).run()
    assert_sound(sim)
    x = ws[-1]
    assert x.done > x.honest_streak, "the cheater never reached its cheating phase"
    assert any(sh.single for sh in sim.m.shards.values()), "no single copies were issued"
    assert x.key in sim.excluded


def test_without_known_answers_replication_alone_still_accepts_nothing_wrong():
    # Known answers off: fresh identities pair only with established ones, so a cheat
    # disagrees, an established tie-breaker decides, and the cheat resets its own trust
    # (one disagreement is no proof: no exclusion). Not covered: a cheater that first becomes
    # established and then cheats under single copies; only re-checks (7%) catch that here.
    for name, cheaters, seed, shards in CHEATS:
        sim = Sim(seed, shards, fleet(4, cheaters), trusted=HONEST_TRUSTED,
                  known_answers=False).run()
        assert_sound(sim)
        assert len(sim.accepted) == shards, name
        cheat_keys = {w.key for w in sim.workers if w.cheat}
        invalid = [l for l in sim.m.leases.values() if l.worker in cheat_keys and l.verdict == "invalid"]
        assert invalid, f"{name}: no cheat result was judged"
