"""Verification against adversaries: the publisher's real scheduler, in virtual time.

One job of `shards` shards runs through `p2pfleet.core.scheduler.Scheduler` (the machine the
publisher engine drives) with a fleet of honest workers and cheaters, and the run counts what
verification let through: shards accepted, failed, accepted with a wrong output, cheaters
excluded, leases issued (specs/verification.md, section 5, "Measured in the scheduler
simulation"). Pure: it imports `p2pfleet.core` only, time is virtual (ms), and every random
draw comes from the seed passed in, so one seed gives one trace.

Outputs are modelled, not computed. A result's output is a *content key*: honest workers
compute ("ok", shard); a cheat computes something else. The driver states agreement the way
the engine does with `compare_outputs`: two results agree when their content keys are equal.
Digests are per hardware class (honest classes differ in bytes and agree within tolerance),
so the scheduler sees agreement through `agrees`, not only through equal digests.

Known answers (section 7): a shard holds one known-answer row among its `samples` rows with
probability `known_answer_rate`, at a secret position. A cheat that substitutes the whole
shard (random, fp16, copy) fails it; a cheat that changes `rows` rows fails it only when the
row is among them (probability rows / samples). Identities of one colluding group change
the same rows of a shard (they coordinate by input digest), so they pass or fail together.

What an adversary knows (the worst case, so the counts are upper bounds for these
strategies): whether the publisher counts it established (it reads the publisher's trust
record) and which replicas its fellow colluders hold (out of band, by input digest). What it
cannot know: which row is a known answer, which shards are re-checked or audited, the
publisher's ranks. See `Cheat` for the strategies.

The event loop: workers ask for work (obeying `retry_after_ms`), compute each lease for
samples / bench seconds (x0.7-1.5), return a result, fail, hand back or vanish; `WakeAt`
effects become `Tick`s. The run ends when the job is done, after `max_days`, or when nothing
was issued or decided for `idle_ms` (what is left waits for an eligible worker). On every
grant the driver checks the replica rules the scheduler promises (`InvariantBroken`).

A stream of jobs (`job_shards`, the fleet simulator's workload): the `shards` are cut into
jobs of `job_shards` (the last takes the rest), numbered globally (job k holds shards
k * job_shards ..), and the publisher keeps `jobs_live` of them live: when one is done it
is forgotten (`JobForgotten`, so the scheduler holds only the jobs in flight) and the next
is submitted. Late results for a forgotten job are refused (`late_refused`); what the
checks need of a forgotten job (its decisions, the backers of its wrong acceptances, its
shards given twice to one peer) is counted before it goes.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from dataclasses import dataclass, field, replace

from p2pfleet.core import scheduler as S
from p2pfleet.core import trust as T

MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS
JOB_ID = b"J" * 16

# Trust settings under which a cheater is established within a run (3 accepted results,
# 10 minutes after the first), beside the defaults (10 results, 24 h).
SHORT_TRUST = T.TrustSettings(established_accepted=3, established_age_ms=10 * MINUTE_MS)
DEFAULT_TRUST = T.TrustSettings()


class InvariantBroken(AssertionError):
    """The scheduler broke a rule it promises (a bug in core, not in the adversary)."""


@dataclass(frozen=True)
class Cheat:
    """How a dishonest worker behaves. A worker with `cheat=None` is honest.

    output: what a wrong result holds: "random" (a different output every time), "fp16"
      (deterministic: every fp16 cheat of a shard agrees with every other), "copy" (the honest
      output of the next shard), all three substituting the whole shard; or "rows": `rows`
      rows of the shard changed (a partial cheat), per `group` (one shared wrong output per
      group and shard) or per identity when `group` is "".
    honest_for: honest for this many results first (strategic).
    established: honest until the publisher counts it established, then cheat.
    when: "always", or "together": only when a fellow of its group holds another replica
      of the shard as it reports: one established now (it will cheat too) or one that
      returned the group's wrong output.
    lease: "run" (compute and report), "expire" (let the lease expire, report `late_ms`
      after its expiry), "fail" (report `failed` a minute or two after the grant): the
      lease games, played only while cheating.
    rotate: a fresh key (same prefix) after each lease ends and after each refusal, as
      throwaway identities do.
    """

    output: str = "fp16"
    rows: int = 1
    group: str = ""
    honest_for: int = 0
    established: bool = False
    when: str = "always"
    lease: str = "run"
    late_ms: int = 5 * MINUTE_MS
    rotate: bool = False

    def __post_init__(self) -> None:
        if self.output not in ("random", "fp16", "copy", "rows"):
            raise ValueError(f"Cheat.output {self.output!r}: random, fp16, copy or rows")
        if self.when not in ("always", "together"):
            raise ValueError(f"Cheat.when {self.when!r}: always or together")
        if self.when == "together" and not self.group:
            raise ValueError("Cheat.when='together' needs a group")
        if self.lease not in ("run", "expire", "fail"):
            raise ValueError(f"Cheat.lease {self.lease!r}: run, expire or fail")
        if self.output == "rows" and self.rows < 1:
            raise ValueError("Cheat.rows must be >= 1")


def _key(name: str, n: int) -> bytes:
    return hashlib.sha256(f"worker {name} key {n}".encode()).digest()


@dataclass
class Worker:
    name: str
    prefix: str
    cheat: Cheat | None = None
    hw_class: bytes = b"A" * 32
    bench: float = 0.2            # samples per second: a 32-row shard takes ~160 s
    slots: int = 2
    flaky: float = 0.0            # share of leases dropped silently (they expire)
    hand_back: float = 0.0        # share of leases handed back (the car was unplugged)
    trusted: bool = False         # one of the publisher's own machines
    audit_only: bool = False      # the publisher itself, computing audits with its own key
    keys: list[bytes] = field(default_factory=list)   # identities used, the current last
    results: int = 0              # results returned
    cheated: int = 0              # wrong results returned
    busy: dict[bytes, bytes] = field(default_factory=dict)  # live lease id -> key issued to
    asking: bool = False          # an "ask" event is pending

    def __post_init__(self) -> None:
        if not self.keys:
            self.keys.append(_key(self.name, 0))

    @property
    def key(self) -> bytes:
        return self.keys[-1]

    def rotate(self) -> bytes:
        self.keys.append(_key(self.name, len(self.keys)))
        return self.key


@dataclass(frozen=True)
class SimJob:
    """The job: `samples` rows per shard (known-answer row included), and its parameters."""

    samples: int = 32
    credit: int = 10
    quorum: int = 2
    max_error: int = 3
    recheck_rate: float = 0.07
    audit_rate: float = 0.05
    known_answer_rate: float = 1.0


def honest_output(shard: int) -> tuple:
    return ("ok", shard)


def _unit(*parts: object) -> float:
    """A number in [0, 1) fixed by `parts` (seeded draws that two workers share)."""
    h = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


class Sim:
    """One job, one fleet, one seed. `run()` plays it out; `report()` sums it up."""

    def __init__(self, seed: int, shards: int, workers: list[Worker], *,
                 job: SimJob = SimJob(), trust: T.TrustSettings = DEFAULT_TRUST,
                 settings: S.SchedulerSettings | None = None, max_days: float = 30.0,
                 idle_ms: int = 6 * HOUR_MS, job_shards: int | None = None,
                 jobs_live: int = 1):
        self.seed = seed
        self.rng = random.Random(seed)
        self.workers = workers
        trusted = frozenset(w.key for w in workers if w.trusted or w.audit_only)
        trust = replace(trust, trusted=trust.trusted | trusted)
        base = replace(settings or S.SchedulerSettings(), trust=trust)
        own = [w.key for w in workers if w.audit_only]
        if own:
            base = replace(base, own_key=own[0])
        self.m = S.Scheduler(base,
                             rng=S.KeyedRandom(hashlib.sha256(f"publisher {seed}".encode()).digest()),
                             keep_changes=False, lazy_shards=True)  # persists nothing
        self.spec = job
        if job_shards is not None and job_shards < 1:
            raise ValueError(f"job_shards must be >= 1, got {job_shards}")
        if jobs_live < 1:
            raise ValueError(f"jobs_live must be >= 1, got {jobs_live}")
        self.ka = tuple(self.rng.random() < job.known_answer_rate for _ in range(shards))
        self.secret = hashlib.sha256(f"secret {seed}".encode()).digest()
        self.n = shards                            # over all jobs
        self.per_job = job_shards or shards
        self.n_jobs = -(-shards // self.per_job)
        self.jobs_live = jobs_live
        self.stream = job_shards is not None       # ended jobs are forgotten
        self.job = self._params(0)                 # the first job
        self.number: dict[bytes, int] = {}         # job id -> its number, submitted ones
        self.live: dict[bytes, None] = {}          # live jobs, in submission order
        self.jobs_ended = 0
        self.late_refused = 0                      # late results of forgotten jobs
        self.leased: set[bytes] = set()            # identities given a lease
        self._decided_gone = 0                     # accepted shards of forgotten jobs
        self._backers_gone: dict[int, list[S.LeaseRec]] = {}  # wrong shards forgotten
        self._twice_gone: list[int] = []
        self.by_key: dict[bytes, Worker] = {w.key: w for w in workers}
        self.content: dict[bytes, tuple] = {}      # digest -> content key
        self.accepted: dict[int, bytes] = {}
        self.failed: dict[int, str] = {}
        self.excluded: set[bytes] = set()
        self.wrong: set[int] = set()               # shards whose accepted output is wrong
        self.wrong_ever = 0                        # wrong acceptances, withdrawn ones too
        self.reopened = 0                          # acceptances withdrawn (ShardReopened)
        self.unbacked: list[int] = []              # accepted with no established backer
        self.paid: dict[bytes, int] = {}           # valid results per key
        self.cheat_established: set[bytes] = set() # cheater keys that cheated while established
        self.cheated: set[bytes] = set()           # cheater keys that returned a wrong result
        self.grants = 0
        self.done = False
        self.now = 0
        self.end = int(max_days * DAY_MS)
        self.idle_ms = idle_ms
        self.last_progress = 0
        self._heap: list = []
        self._seq = 0
        self._ticks: set[int] = set()
        self._random_outputs = 0
        self._submit()

    # --- jobs ------------------------------------------------------------------------
    def job_id(self, k: int) -> bytes:
        return JOB_ID if k == 0 else JOB_ID[:12] + k.to_bytes(4, "big")

    def _params(self, k: int) -> S.JobParams:
        start = k * self.per_job
        n, job = min(self.per_job, self.n - start), self.spec
        return S.JobParams(
            self.job_id(k), self.secret, (job.samples,) * n, (job.credit,) * n,
            self.ka[start:start + n], (1000,) * n, quorum=job.quorum, max_error=job.max_error,
            recheck_rate=job.recheck_rate, audit_rate=job.audit_rate)

    def _loc(self, shard: int) -> tuple[bytes, int]:
        """(job id, index in the job) of a global shard number."""
        return self.job_id(shard // self.per_job), shard % self.per_job

    def _glob(self, job_id: bytes, index: int) -> int:
        return self.number[job_id] * self.per_job + index

    def _submit(self) -> None:
        """Submit jobs until `jobs_live` are live (or none is left)."""
        while len(self.live) < self.jobs_live and len(self.number) < self.n_jobs:
            k = len(self.number)
            params = self.job if k == 0 else self._params(k)
            self.number[params.job_id] = k
            self.live[params.job_id] = None
            self.apply(self.m.handle(S.JobAdded(self.now, params)))

    def _forget(self, job_id: bytes) -> None:
        """Count what the checks need of an ended job, then let it go and submit the next."""
        k, n = self.number[job_id], len(self.m.jobs[job_id].job.samples)
        for g in range(k * self.per_job, k * self.per_job + n):
            if g in self.wrong:
                self._backers_gone[g] = self.backers(g)
            self._decided_gone += self.accepted.pop(g, None) is not None
        self._twice_gone += self.two_replicas_to_one_peer(job_id)
        # Its results' content keys go too, but for the first shard's: a copy cheat of the
        # shard before (another job, maybe live) computes that one.
        start, end = k * self.per_job, k * self.per_job + n
        for i in range(n):
            for l in self.m.shard_leases(job_id, i):
                c = self.content.get(l.digest) if l.digest else None
                if c is not None and (c[0] == "random" or start < c[-1] < end):
                    del self.content[l.digest]
        self.apply(self.m.handle(S.JobForgotten(self.now, job_id)))
        self._submit()

    # --- outputs ---------------------------------------------------------------------
    def digest(self, content: tuple, hw_class: bytes) -> bytes:
        d = hashlib.sha256(repr((content, hw_class)).encode()).digest()
        self.content[d] = content
        return d

    def is_honest(self, shard: int, digest: bytes) -> bool:
        return self.content.get(digest) == honest_output(shard)

    def cheats_now(self, w: Worker, key: bytes, shard: int) -> bool:
        c = w.cheat
        if c is None or w.results < c.honest_for:
            return False
        if c.established and not T.established(self.m.trust_of(key), self.m.s.trust, self.now):
            return False
        if c.when == "together":  # a fellow who will cheat too, or did, holds a replica
            wrong = self.wrong_output(w, shard)
            for l in self.m.shard_leases(*self._loc(shard)):
                if l.worker == key or self._group_of(l.worker) != c.group:
                    continue
                if l.state == "live" and T.established(self.m.trust_of(l.worker),
                                                       self.m.s.trust, self.now):
                    return True
                if l.state == "returned" and l.ok and self.content.get(l.digest) == wrong:
                    return True
            return False
        return True

    def _group_of(self, key: bytes) -> str:
        w = self.by_key.get(key)
        return w.cheat.group if w is not None and w.cheat is not None else ""

    def wrong_output(self, w: Worker, shard: int) -> tuple:
        c = w.cheat
        assert c is not None
        if c.output == "random":
            self._random_outputs += 1
            return ("random", self._random_outputs)
        if c.output == "fp16":
            return ("fp16", shard)
        if c.output == "copy":
            return honest_output((shard + 1) % self.n) if self.n > 1 else ("copy", shard)
        return ("rows", c.group or w.name, shard)

    def known_answer_ok(self, w: Worker, shard: int, content: tuple) -> bool | None:
        if not self.ka[shard]:
            return None
        if content == honest_output(shard):
            return True
        if content[0] != "rows":
            return False  # the whole shard substituted: the known-answer row is wrong too
        rows = self.spec.samples
        at = int(_unit(self.seed, "known answer row", shard) * rows)
        start = int(_unit(self.seed, "rows changed", content[1], shard) * rows)
        changed = {(start + i) % rows for i in range(w.cheat.rows)}
        return at not in changed

    # --- events ----------------------------------------------------------------------
    def _push(self, at: int, kind: str, *data: object) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, kind, data))

    def _ask_at(self, w: Worker, at: int) -> None:
        if not w.asking:
            w.asking = True
            self._push(at, "ask", w)

    def apply(self, effects: list) -> None:
        for e in effects:
            if isinstance(e, S.ShardAccepted):
                g = self._glob(e.job_id, e.shard)
                if g in self.accepted or g in self.failed:
                    raise InvariantBroken(f"shard {g} decided twice")
                self.accepted[g] = e.digest
                self.last_progress = self.now
                if not self.is_honest(g, e.digest):
                    self.wrong.add(g)
                    self.wrong_ever += 1
                self._check_quorum(g)
            elif isinstance(e, S.ShardReopened):
                # an excluded worker's result had helped accept it: decided again later
                g = self._glob(e.job_id, e.shard)
                if self.accepted.pop(g, None) is None:
                    raise InvariantBroken(f"shard {g} reopened but not accepted")
                self.wrong.discard(g)
                self.reopened += 1
                self.done = False
            elif isinstance(e, S.ShardFailed):
                g = self._glob(e.job_id, e.shard)
                if g in self.accepted or g in self.failed:
                    raise InvariantBroken(f"shard {g} decided twice")
                if not e.reason:
                    raise InvariantBroken(f"shard {g} failed without a reason")
                self.failed[g] = e.reason
                self.last_progress = self.now
            elif isinstance(e, S.Excluded):
                self.excluded.add(e.worker)
            elif isinstance(e, S.Pay):
                self.paid[e.worker] = self.paid.get(e.worker, 0) + 1
            elif isinstance(e, S.CancelLeases):
                w = self.by_key[e.worker]
                for lid in e.lease_ids:
                    if w.busy.pop(lid, None) is not None:
                        self._ask_at(w, self.now)
            elif isinstance(e, S.WakeAt):
                # A tick already due no later does: it answers with the next WakeAt
                # (every Tick does), so a tick per lease that ended before its expiry would
                # only repeat the stall check.
                if not self._ticks or e.at_ms < min(self._ticks):
                    self._ticks.add(e.at_ms)
                    self._push(max(e.at_ms, self.now), "tick", e.at_ms)
            elif isinstance(e, S.JobDone):
                self.jobs_ended += 1
                del self.live[e.job_id]
                self.done = self.jobs_ended == self.n_jobs
                if self.stream:  # let it go once this event's effects are all applied
                    self._push(self.now, "forget", e.job_id)

    def _check_grant(self, shard: int, lease_id: bytes) -> None:
        leases = self.m.shard_leases(*self._loc(shard))
        new = next(l for l in leases if l.lease_id == lease_id)
        others = [l for l in leases if l.lease_id != lease_id]
        held = [l for l in others if l.state in ("live", "returned")]
        sh = self.m.shards[self._loc(shard)]  # a stalled shard's relaxations (RELAX_ORDER)
        again = not new.fresh and sh.relaxed("reissue")
        if any(l.worker == new.worker for l in (held if again else others)):
            raise InvariantBroken(f"shard {shard}: a second replica to one peer (seed {self.seed})")
        if (new.fresh or not sh.relaxed("prefix")) and any(l.prefix == new.prefix for l in held):
            raise InvariantBroken(f"shard {shard}: two replicas held in prefix {new.prefix} "
                                  f"(seed {self.seed})")
        if new.fresh and any(l.fresh and l.verdict != "invalid" for l in held):
            raise InvariantBroken(f"shard {shard}: two fresh identities (seed {self.seed})")
        if new.fresh and any(l.fresh and l.prefix == new.prefix for l in others):
            raise InvariantBroken(f"shard {shard}: a second fresh identity of prefix "
                                  f"{new.prefix} (seed {self.seed})")

    def _check_quorum(self, shard: int) -> None:
        """An accepted output should be backed by an ok result of an identity established
        (or trusted) when it reported, so a fresh identity never decides alone. Counted, not
        raised: `unbacked` lists the shards where this did not hold."""
        if not any(not l.fresh for l in self.backers(shard)):
            self.unbacked.append(shard)

    def _ask(self, w: Worker) -> None:
        w.asking = False
        free = w.slots - len(w.busy)
        if free <= 0:
            return  # asks again when a lease ends
        eff = self.m.handle(S.WorkRequested(self.now, w.key, w.prefix, w.hw_class, w.bench,
                                            free, tuple(self.live), audit_only=w.audit_only))
        self.apply(eff)
        for e in eff:
            if isinstance(e, S.Grant):
                for g in e.leases:
                    self._start(w, g)
                if len(w.busy) < w.slots:
                    self._ask_at(w, self.now + self.m.s.request_interval_ms)
            elif isinstance(e, S.Refuse):
                if w.cheat is not None and w.cheat.rotate and e.reason != "no_work":
                    w.rotate()
                    self.by_key[w.key] = w
                    self._ask_at(w, self.now + self.m.s.request_interval_ms)
                else:
                    self._ask_at(w, self.now + max(e.retry_after_ms, 1000))

    def _start(self, w: Worker, g: S.LeaseGrant) -> None:
        key = w.key
        w.busy[g.lease_id] = key
        self.grants += 1
        self.leased.add(key)
        self.last_progress = self.now
        shard = self._glob(g.job_id, g.shard)
        self._check_grant(shard, g.lease_id)
        expires = self.now + g.deadline_ms + S.grace_ms(g.deadline_ms, self.m.s)
        game = w.cheat.lease if w.cheat is not None else "run"
        if game != "run" and self.cheats_now(w, key, shard):
            if game == "fail":
                self._push(self.now + self.rng.randint(1, 2) * MINUTE_MS, "fail", w, g, key)
            else:
                self._push(expires, "free", w, g, key)
                self._push(expires + w.cheat.late_ms, "late", w, g, key)
            return
        compute = int(1000 * self.spec.samples / w.bench * self.rng.uniform(0.7, 1.5))
        draw = self.rng.random()
        if draw < w.flaky:
            self._push(expires, "free", w, g, key)  # vanished: the lease expires
        elif draw < w.flaky + w.hand_back:
            self._push(self.now + compute // 2, "hand_back", w, g, key)
        else:
            self._push(self.now + compute, "result", w, g, key)

    def _end_lease(self, w: Worker, lease_id: bytes) -> bool:
        """Free the worker's slot; False if the lease was cancelled meanwhile."""
        if w.busy.pop(lease_id, None) is None:
            return False
        if w.cheat is not None and w.cheat.rotate and not w.busy:
            w.rotate()
            self.by_key[w.key] = w
        self._ask_at(w, self.now)
        return True

    def _result(self, w: Worker, g: S.LeaseGrant, key: bytes) -> None:
        if g.job_id in self.m.forgotten:  # a late result: the job ended and was let go
            self.late_refused += 1
            return
        shard = self._glob(g.job_id, g.shard)
        cheat = self.cheats_now(w, key, shard)
        content = self.wrong_output(w, shard) if cheat else honest_output(shard)
        if cheat:
            w.cheated += 1
            self.cheated.add(key)
            if T.established(self.m.trust_of(key), self.m.s.trust, self.now):
                self.cheat_established.add(key)
        digest = self.digest(content, w.hw_class)
        ka = self.known_answer_ok(w, shard, content)
        agrees: tuple[bytes, ...] = ()
        if ka is not False:
            agrees = tuple(l.lease_id for l in self.m.returned(g.job_id, g.shard)
                           if self.content.get(l.digest) == content)
        w.results += 1
        self.apply(self.m.handle(S.ResultArrived(self.now, g.lease_id, key, digest, True, ka,
                                                 agrees, g.job_id)))

    def step(self) -> bool:
        """Handle the next event; False when the run is over."""
        if self.done or not self._heap:
            return False
        at, _seq, kind, data = heapq.heappop(self._heap)
        if at > self.end or at - self.last_progress > self.idle_ms:
            return False
        self.now = max(self.now, at)
        self.dispatch(kind, data)
        return True

    def dispatch(self, kind: str, data: tuple) -> None:
        """Handle one event pushed by `_push` at `self.now` (a driver with its own event
        loop, as sim/fleet.py, calls this for the publisher's events)."""
        if kind == "tick":
            self._ticks.discard(data[0])
            self.apply(self.m.handle(S.Tick(self.now)))
        elif kind == "ask":
            self._ask(data[0])
        elif kind == "forget":
            self._forget(data[0])
        else:
            w, g, key = data
            if kind == "late":
                self._result(w, g, key)  # after its expiry: the slot was freed then
            elif kind == "free":
                self._end_lease(w, g.lease_id)
            elif self._end_lease(w, g.lease_id):
                if kind == "result":
                    self._result(w, g, key)
                elif kind == "fail":
                    self.apply(self.m.handle(S.LeaseFailed(self.now, g.lease_id, key, "error")))
                elif kind == "hand_back":
                    self.apply(self.m.handle(S.HandedBack(self.now, g.lease_id, key)))

    def run(self) -> "Sim":
        for w in self.workers:
            self._ask_at(w, self.rng.randint(0, MINUTE_MS))
        while self.step():
            pass
        return self

    # --- results ---------------------------------------------------------------------
    def _held(self) -> list[int]:
        """Global numbers of the shards of the jobs the scheduler holds (submitted, not
        forgotten)."""
        return [self._glob(j, i) for j, rec in self.m.jobs.items()
                for i in range(len(rec.job.samples))]

    def lost(self) -> list[int]:
        """Shards neither decided nor still offered to the next eligible worker (of the jobs
        held: a forgotten one had every shard decided)."""
        out = []
        for i in self._held():
            if i in self.accepted or i in self.failed:
                continue
            if self.m.open_replicas(self.m.shards[self._loc(i)]) <= 0 and not any(
                    l.state == "live" for l in self.m.shard_leases(*self._loc(i))):
                out.append(i)
        return out

    def backers(self, shard: int) -> list[S.LeaseRec]:
        """The ok results of an accepted shard that agree with its accepted output (a wrong
        shard of a forgotten job: as they were when it was forgotten)."""
        if shard in self._backers_gone:
            return list(self._backers_gone[shard])
        won = self.content.get(self.accepted[shard])
        return [l for l in self.m.returned(*self._loc(shard))
                if l.ok and self.content.get(l.digest) == won]

    def two_replicas_to_one_peer(self, job_id: bytes | None = None) -> list[int]:
        """Shards where a peer got two replicas (after the `reissue` relaxation of a stalled
        shard: two held at once, or two results): of one job, or of every job."""
        out = [] if job_id is not None else list(self._twice_gone)
        shards = (self._held() if job_id is None else
                  [self._glob(job_id, i) for i in range(len(self.m.jobs[job_id].job.samples))])
        for i in shards:
            leases = self.m.shard_leases(*self._loc(i))
            if self.m.shards[self._loc(i)].relaxed("reissue"):
                leases = [l for l in leases if l.state in ("live", "returned")]
            if len({l.worker for l in leases}) != len(leases):
                out.append(i)
        return out

    def report(self) -> dict:
        cheat_keys = {k for w in self.workers if w.cheat is not None for k in w.keys}
        leased = self.leased
        reasons: dict[str, int] = {}
        for r in self.failed.values():
            kind = "errors > max_error" if "max_error" in r else r
            reasons[kind] = reasons.get(kind, 0) + 1
        return {
            "shards": self.n,
            "accepted": len(self.accepted) + self._decided_gone,
            "failed": len(self.failed),
            "undecided": self.n - len(self.accepted) - self._decided_gone - len(self.failed),
            "job_done": self.done,
            "wrong_accepted": len(self.wrong),
            "wrong_accepted_ever": self.wrong_ever,
            "reopened": self.reopened,
            "accepted_on_fresh_only": len(self.unbacked),
            "leases": self.grants,
            "results": sum(w.results for w in self.workers),
            "wrong_results": sum(w.cheated for w in self.workers),
            "cheater_identities": len(cheat_keys & leased),
            "cheaters_excluded": len(cheat_keys & self.excluded),
            "cheaters_cheating_established": len(self.cheat_established),
            "honest_excluded": len(self.excluded - cheat_keys),
            "virtual_hours": round(self.now / HOUR_MS, 1),
            "fail_reasons": dict(sorted(reasons.items())),
            "late_refused": self.late_refused,
        }


# --- fleets and scenarios ----------------------------------------------------------------
@dataclass(frozen=True)
class Adversaries:
    """`count` identities playing `cheat`, each in its own /24 (`prefixes` 0) or spread
    over `prefixes` /24s (1: a Sybil swarm behind one address)."""

    count: int
    cheat: Cheat
    prefixes: int = 0
    slots: int = 2


@dataclass(frozen=True)
class Scenario:
    name: str
    adversaries: tuple[Adversaries, ...] = ()
    honest: int = 28
    trusted: int = 3            # of the honest: the publisher's own machines
    flaky: int = 6              # of the honest: drop 20% and hand back 5% of their leases
    bench: float = 0.2          # honest speed, samples/s (32-row shards: ~160 s)
    job: SimJob = SimJob()
    trust: T.TrustSettings = SHORT_TRUST
    self_audit: bool = False    # the publisher computes audits itself (its own key)


def fleet(scn: Scenario) -> list[Worker]:
    ws = []
    for i in range(scn.honest):
        ws.append(Worker(f"h{i}", f"10.{i // 250}.{i % 250}.0/24", bench=scn.bench,
                         hw_class=(b"A" if i % 2 == 0 else b"B") * 32, trusted=i < scn.trusted,
                         flaky=0.2 if scn.trusted <= i < scn.trusted + scn.flaky else 0.0,
                         hand_back=0.05 if scn.trusted <= i < scn.trusted + scn.flaky else 0.0))
    for j, adv in enumerate(scn.adversaries):
        for i in range(adv.count):
            p = i if adv.prefixes == 0 else i % adv.prefixes
            ws.append(Worker(f"a{j}.{i}", f"172.{16 + j}.{p}.0/24", cheat=adv.cheat,
                             bench=scn.bench, slots=adv.slots,
                             hw_class=(b"A" if i % 2 == 0 else b"B") * 32))
    if scn.self_audit:
        ws.append(Worker("publisher", "192.0.2.0/24", bench=scn.bench, audit_only=True))
    return ws


def simulate(scn: Scenario, shards: int, seed: int, **kw) -> Sim:
    return Sim(seed, shards, fleet(scn), job=scn.job, trust=scn.trust, **kw).run()


def colluders(share: float, honest: int, cheat: Cheat) -> Adversaries:
    """Colluders making up `share` of all identities, each in its own /24."""
    return Adversaries(round(share * honest / (1.0 - share)), cheat)


def scenarios(trust: T.TrustSettings = SHORT_TRUST, bench: float = 0.2,
              honest: int = 28) -> list[Scenario]:
    """The adversaries of issue 12, each alone, then together. Under `trust`, cheaters
    that wait to be established are established within the run when the run lasts longer
    than `established_age_ms` (SHORT_TRUST: 10 min; the defaults need a day, so pass a slow
    `bench`, e.g. 0.02: a 32-row shard takes ~27 min and 10^4 shards ~5 days)."""
    coll = dict(group="c", established=True)
    base = Scenario("honest only", trust=trust, bench=bench, honest=honest,
                    flaky=max(1, honest // 5))
    share = 0.3
    return [
        base,
        replace(base, name="random outputs", adversaries=(Adversaries(4, Cheat("random")),)),
        replace(base, name="fp16 (whole shard)", adversaries=(Adversaries(4, Cheat("fp16")),)),
        replace(base, name="copiers", adversaries=(Adversaries(4, Cheat("copy")),)),
        replace(base, name="partial: 1 of 32 rows",
                adversaries=(Adversaries(4, Cheat("rows", rows=1)),)),
        replace(base, name="strategic: honest until established, then fp16",
                adversaries=(Adversaries(4, Cheat("fp16", established=True)),)),
        replace(base, name="strategic: honest until established, then 1 row",
                adversaries=(Adversaries(4, Cheat("rows", rows=1, established=True)),)),
        replace(base, name="Sybil: 40 keys behind one /24, fp16",
                adversaries=(Adversaries(40, Cheat("fp16"), prefixes=1),)),
        replace(base, name="Sybil: 40 keys behind one /24, one shared 1-row output",
                adversaries=(Adversaries(40, Cheat("rows", rows=1, group="s"), prefixes=1),)),
        replace(base, name="lease expiry: rotating keys of one /24 report late",
                adversaries=(Adversaries(20, Cheat("rows", rows=1, group="s", lease="expire",
                                                   rotate=True), prefixes=1),)),
        replace(base, name="throwaway keys of one /24 send failed",
                adversaries=(Adversaries(20, Cheat("fp16", lease="fail", rotate=True),
                                         prefixes=1),)),
        replace(base, name="throwaway keys of 8 /24s send failed",
                adversaries=(Adversaries(24, Cheat("fp16", lease="fail", rotate=True),
                                         prefixes=8),)),
        replace(base, name="colluders 30%: fp16, always",
                adversaries=(colluders(share, base.honest, Cheat("fp16", **coll)),)),
        replace(base, name="colluders 30%: 1 row, always",
                adversaries=(colluders(share, base.honest, Cheat("rows", rows=1, **coll)),)),
        replace(base, name="colluders 30%: fp16, together",
                adversaries=(colluders(share, base.honest,
                                       Cheat("fp16", when="together", **coll)),)),
        replace(base, name="colluders 30%: fp16, together, known answers in 10% of shards",
                job=replace(base.job, known_answer_rate=0.1),
                adversaries=(colluders(share, base.honest,
                                       Cheat("fp16", when="together", **coll)),)),
        replace(base, name="colluders 30%: 1 row, together",
                adversaries=(colluders(share, base.honest,
                                       Cheat("rows", rows=1, when="together", **coll)),)),
        replace(base, name="mixed: late Sybils, throwaway failers, copiers, "
                           "colluders 30% together",
                adversaries=(
                    Adversaries(20, Cheat("rows", rows=1, group="c", lease="expire",
                                          rotate=True), prefixes=1),
                    Adversaries(10, Cheat("fp16", lease="fail", rotate=True), prefixes=1),
                    Adversaries(3, Cheat("copy")),
                    colluders(share, base.honest,
                              Cheat("rows", rows=1, when="together", **coll)),
                )),
    ]


def zero_by_construction(scn: Scenario) -> bool:
    """Must no wrong output be accepted, whatever the seed? Yes unless some cheater may cheat
    while established with an output the known answers can miss (a partial cheat, or shards
    without known answers): then the count is measured, not zero (section 5's bound).

    Why: a quorum holds at most one non-established vote, and single copies go to
    established identities only, so an accepted output is backed by an established or
    trusted identity's result; while every such identity is honest no wrong output can
    gather a quorum. A whole-shard cheat of an established identity fails its shard's
    known-answer row, and a result failing it is in no quorum."""
    for adv in scn.adversaries:
        c = adv.cheat
        if (c.established or c.honest_for > 0) and (
                c.output == "rows" or scn.job.known_answer_rate < 1.0):
            return False
    return True


def collusion_sweep(trust: T.TrustSettings = SHORT_TRUST, bench: float = 0.2,
                    honest: int = 28) -> list[Scenario]:
    """Colluders (1 row, only together) against the re-check rate, the audit rate, the
    number of trusted machines (and the publisher auditing with its own key) and the
    colluders' share."""
    cheat = Cheat("rows", rows=1, group="c", established=True, when="together")
    base = Scenario("", trust=trust, bench=bench, honest=honest, flaky=max(1, honest // 5))
    out = []

    def add(share: float, recheck: float, audit: float, trusted: int,
            self_audit: bool = False) -> None:
        out.append(replace(base, name=f"colluders {share:.0%}: 1 row, together; re-check "
                                      f"{recheck:g}, audit {audit:g}, trusted {trusted}"
                                      + (" + the publisher" if self_audit else ""),
                           trusted=trusted, self_audit=self_audit,
                           job=replace(base.job, recheck_rate=recheck, audit_rate=audit),
                           adversaries=(colluders(share, base.honest, cheat),)))

    for recheck in (0.0, 0.07, 0.25, 0.5):
        add(0.3, recheck, 0.0, 3)
    for audit in (0.05, 0.2):
        add(0.3, 0.07, audit, 3)
    for trusted in (1, 9):
        add(0.3, 0.07, 0.05, trusted)
    add(0.3, 0.07, 0.05, 3, self_audit=True)
    add(0.3, 0.07, 0.2, 3, self_audit=True)
    add(0.1, 0.07, 0.0, 3)
    add(0.1, 0.07, 0.05, 3)
    return out
