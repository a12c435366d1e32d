"""The worker's rules for pulling work: whom to ask, when to ask again, what to accept.

Pure (no I/O, no clock, no randomness of its own): the node's work loop
(`p2pfleet/live/worker.py`) passes in the jobs it heard, the time and a seeded rng. The rules are
specs/work-and-leases.md, sections 2-3:

- ask only publishers the owner works for (allowlist, or anyone), whose announced job the
  node meets the requirements of, whose unpaid work is under the cap (credit.md, section 3),
  and whose last `no_work` back-off has passed;
- back off from a job that has no work for this node (from its publisher when the refusal
  is about the node): exponentially from 60 s to 4 h with jitter (BOINC's scheduler
  back-off), never before its `retry_after_ms`; news of the job ends its back-off;
- check every lease batch before holding a lease: the publisher signed it, it answers our
  request, it is for us, it is not bigger than asked, every lease is for a job that
  publisher announced, runnable here (micro-batch count, first batch, onnxruntime range);
- obey a `cancel` only for leases its signer issued to this node (`leases_to_cancel`);
- hold enough leases that the sandbox never waits for the network, but none it could not
  finish before its deadline (`leases_to_request`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Sequence

if TYPE_CHECKING:  # the caller hands in its seeded rng: core only names the type
    import random

MAX_BATCHES = 256  # micro-batches per shard (execution.md)
MAX_LEASES_PER_BATCH = 64
BACKOFF_MIN_S = 60.0
BACKOFF_MAX_S = 4 * 3600.0
PROVIDER_CPU = "CPUExecutionProvider"
FETCH_SHARE = 0.5  # of a lease's time, fetching may use at most this much; computing the rest


@dataclass(frozen=True)
class Offer:
    """What this node offers, as its capacity record and work requests state it."""

    sw_version: str
    ort_version: str
    memory_mb: int
    providers: tuple[str, ...] = (PROVIDER_CPU,)


@dataclass(frozen=True)
class HeardJob:
    """A verified job announcement: `publisher` is the signer's key."""

    publisher: bytes
    job_id: bytes
    shards_left: int
    requirements: object  # wire.kinds.Requirements
    heard_at: float
    addrs: tuple[str, ...] = ()


class LeaseRefused(Exception):
    """A lease batch or lease the worker must not hold; `punish`: the publisher broke a rule."""

    def __init__(self, reason: str, punish: bool = True):
        super().__init__(reason)
        self.reason = reason
        self.punish = punish


def _version_at_least(version: str, floor: str) -> bool:
    from packaging.version import InvalidVersion, Version

    if not floor.strip():
        return True
    try:
        return Version(version) >= Version(floor)
    except InvalidVersion:
        return False


def ort_allowed(spec: str, version: str) -> bool:
    """Does `version` satisfy the PEP 440 specifier set `spec` ("" allows any)?"""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet
    from packaging.version import InvalidVersion, Version

    if not spec.strip():
        return True
    try:
        return SpecifierSet(spec).contains(Version(version), prereleases=True)
    except (InvalidSpecifier, InvalidVersion):
        return False


def unmet_requirement(requirements: object, offer: Offer) -> str | None:
    """Why this node cannot take a job with `requirements`, or None."""
    r = requirements
    if offer.memory_mb < r.min_memory_mb:
        return f"needs {r.min_memory_mb} MiB, the node offers {offer.memory_mb}"
    wanted = tuple(r.providers) or (PROVIDER_CPU,)
    if not set(wanted) & set(offer.providers):
        return f"needs one of {', '.join(wanted)}"
    if not _version_at_least(offer.sw_version, r.min_sw_version):
        return f"needs node software >= {r.min_sw_version}"
    if not ort_allowed(r.ort_versions, offer.ort_version):
        return f"needs onnxruntime {r.ort_versions}, the node runs {offer.ort_version}"
    return None


@dataclass
class PublisherBackoff:
    """When each publisher, and each of its jobs, may be asked again (monotonic seconds).

    A request names one job, so a refusal about that job (`no_work`, `not_eligible`: it is
    finished, or has nothing for this node) backs off from that job only; a refusal about
    the node or the publisher's door (`excluded`, `backoff`, `quota`, an unreachable
    publisher) backs off from the publisher. Otherwise a finished job the node still held
    would keep it away from the publisher's next job for minutes."""

    base_s: float = BACKOFF_MIN_S
    max_s: float = BACKOFF_MAX_S
    max_jobs: int = 4096  # job back-offs remembered (the expired ones go first)
    _until: dict[bytes, float] = field(default_factory=dict)
    _streak: dict[bytes, int] = field(default_factory=dict)
    _job_until: dict[tuple[bytes, bytes], float] = field(default_factory=dict)
    _job_streak: dict[tuple[bytes, bytes], int] = field(default_factory=dict)
    _left: dict[tuple[bytes, bytes], int] = field(default_factory=dict)  # shards left heard

    def ready(self, publisher: bytes, now: float, job_id: bytes | None = None) -> bool:
        until = self.until(publisher, job_id)
        return until is None or now >= until

    def until(self, publisher: bytes, job_id: bytes | None = None) -> float | None:
        """When the publisher (and, if named, that job of it) may be asked again."""
        times = [t for t in (self._until.get(publisher),
                             self._job_until.get((publisher, job_id)) if job_id else None)
                 if t is not None]
        return max(times) if times else None

    def got_work(self, publisher: bytes, job_id: bytes | None = None) -> None:
        self._until.pop(publisher, None)
        self._streak.pop(publisher, None)
        if job_id is not None:
            self._job_until.pop((publisher, job_id), None)
            self._job_streak.pop((publisher, job_id), None)

    def heard(self, publisher: bytes, job_id: bytes, shards_left: int) -> None:
        """A job announcement: a job that made progress (or is new) may have work again,
        so its publisher is asked without waiting out the back-off of earlier no_works."""
        key = (publisher, job_id)
        if self._left.get(key) != shards_left:
            self._left[key] = shards_left
            self.got_work(publisher, job_id)
            if len(self._left) > self.max_jobs:
                self._left.pop(next(iter(self._left)))

    def no_work(self, publisher: bytes, now: float, retry_after_s: float, rng: random.Random,
                *, exponential: bool = True, job_id: bytes | None = None) -> float:
        """Record a refusal (or an unreachable publisher); returns when to ask again.

        `exponential`: the reason says there is nothing to do (back off 60 s .. 4 h, with
        jitter); other reasons (quota, rate limit) wait only `retry_after_s`. `job_id`: the
        refusal is about that job only."""
        key: object = publisher if job_id is None else (publisher, job_id)
        streaks: dict = self._streak if job_id is None else self._job_streak
        untils: dict = self._until if job_id is None else self._job_until
        delay = max(0.0, retry_after_s)
        if exponential:
            n = streaks.get(key, 0)
            streaks[key] = n + 1
            backoff = min(self.max_s, self.base_s * 2**n) * rng.uniform(0.5, 1.0)
            delay = max(delay, backoff)
        untils[key] = now + delay
        if len(self._job_until) > self.max_jobs:
            self._forget_jobs(now)
        return now + delay

    def _forget_jobs(self, now: float) -> None:
        """Bound the table: forget the job back-offs that ended, else the oldest one."""
        ended = [k for k, t in self._job_until.items() if t <= now]
        for k in ended or [next(iter(self._job_until))]:
            self._job_until.pop(k, None)
            self._job_streak.pop(k, None)


def eligible_publishers(jobs: Iterable[HeardJob], offer: Offer, *, allow: Sequence[bytes],
                        serve_anyone: bool, over_cap: set[bytes], backoff: PublisherBackoff,
                        now: float) -> dict[bytes, list[HeardJob]]:
    """Publisher key -> its jobs this node may ask for now (work left, requirements met)."""
    allowed = set(allow)
    out: dict[bytes, list[HeardJob]] = {}
    for job in jobs:
        if not serve_anyone and job.publisher not in allowed:
            continue
        if job.publisher in over_cap or not backoff.ready(job.publisher, now, job.job_id):
            continue
        if job.shards_left <= 0 or unmet_requirement(job.requirements, offer) is not None:
            continue
        out.setdefault(job.publisher, []).append(job)
    return out


def choose_job(jobs: Iterable[HeardJob], offer: Offer, *, allow: Sequence[bytes],
               serve_anyone: bool, over_cap: set[bytes], backoff: PublisherBackoff,
               now: float, rng: random.Random) -> HeardJob | None:
    """The job to ask for next: allowlisted publishers first, then anyone's; within a
    group a random one (so a fleet spreads over publishers and jobs)."""
    by_pub = eligible_publishers(jobs, offer, allow=allow, serve_anyone=serve_anyone,
                                 over_cap=over_cap, backoff=backoff, now=now)
    if not by_pub:
        return None
    preferred = [p for p in by_pub if p in set(allow)] or list(by_pub)
    publisher = sorted(preferred)[rng.randrange(len(preferred))]
    candidates = sorted(by_pub[publisher], key=lambda j: j.job_id)
    return candidates[rng.randrange(len(candidates))]


def check_lease_batch(signer: bytes, body: object, *, publisher: bytes, req_id: bytes,
                      own_key: bytes, free_slots: int, known_jobs: set[bytes]) -> list:
    """The leases of a `lease_batch` (work-and-leases.md, section 3), or LeaseRefused.

    Faults refuse the whole batch (wrong signer, request or worker, more leases than asked,
    a job the publisher never announced, a shard shape no node may run). A well-formed lease
    this node cannot run is for `cannot_run`: it is handed back at once."""
    if signer != publisher:
        raise LeaseRefused("lease batch not signed by the publisher asked")
    if body.req_id != req_id:
        raise LeaseRefused("lease batch answers another request")
    if body.worker != own_key:
        raise LeaseRefused("lease batch is for another worker")
    if len(body.leases) > min(free_slots, MAX_LEASES_PER_BATCH):
        raise LeaseRefused(f"{len(body.leases)} leases for {free_slots} free slots")
    ids = [lease.lease_id for lease in body.leases]
    if len(set(ids)) != len(ids):
        raise LeaseRefused("lease batch repeats a lease id")
    for lease in body.leases:
        if lease.job_id not in known_jobs:
            raise LeaseRefused(f"lease {lease.lease_id.hex()} is for job {lease.job_id.hex()}, "
                               "which this publisher did not announce")
        total = math.ceil(lease.samples / lease.micro_batch)
        if total > MAX_BATCHES:
            raise LeaseRefused(f"lease {lease.lease_id.hex()}: {total} micro-batches, at most "
                               f"{MAX_BATCHES}")
        if lease.first_batch >= total:
            raise LeaseRefused(f"lease {lease.lease_id.hex()}: first_batch {lease.first_batch} "
                               f"past the last of {total} micro-batches")
    return list(body.leases)


OPEN_LEASE_STATUSES = ("queued", "running")


@dataclass(frozen=True)
class LeaseStatus:
    """A lease the node holds, as its ledger has it (queued, running, done, ...)."""

    lease_id: bytes
    status: str


class CancelRefused(Exception):
    """A `cancel` that is not its leases' publisher's: drop it, keep nothing, penalise."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def leases_to_cancel(job_id: bytes, lease_ids: Sequence[bytes],
                     from_signer: Iterable[LeaseStatus]) -> tuple[bytes, ...]:
    """The leases a `cancel` for `job_id` stops (work-and-leases.md, section 8).

    `from_signer` are the leases of `job_id` the node holds from the cancel's signer. The
    cancel names `lease_ids` (empty: the whole job). Only the signer's own leases count: if
    it names none of them it is not their publisher's (CancelRefused). Of those it names,
    the queued and running ones are stopped; finished ones are left alone (a cancel that
    crossed their result is no fault)."""
    named = set(lease_ids)
    held = [lease for lease in from_signer if not named or lease.lease_id in named]
    if not held:
        what = f"{len(named)} leases" if named else "the whole job"
        raise CancelRefused(f"cancel of {what} of job {job_id.hex()}: none of them is a lease "
                            "the signer issued to this node")
    return tuple(lease.lease_id for lease in held if lease.status in OPEN_LEASE_STATUSES)


def fetch_time_s(lease: object) -> float:
    """How long fetching a lease's model and input may keep being retried, seconds."""
    return lease.deadline_ms / 1000.0 * FETCH_SHARE


PIPELINE_DEPTH = 2  # leases held at least: one computing, the next one fetched meanwhile
DEADLINE_MARGIN = 0.8  # a lease is planned to end within this share of its time left


@dataclass(frozen=True)
class HeldLease:
    """A lease the worker holds and has not finished (running or queued), as the lease-count
    rule sees it."""

    time_left_s: float       # until its deadline
    compute_s: float | None  # compute it still needs, estimated (None: not known yet)


@dataclass(frozen=True)
class Pace:
    """What the worker measured for the job it would ask for (None: not measured yet)."""

    compute_s: float | None = None    # one lease's compute
    fetch_s: float | None = None      # one lease's input fetch
    request_gap_s: float = 0.0        # least time the publisher wants between two requests
    deadline_s: float | None = None   # a lease's deadline (the newest one granted)


def leases_to_request(held: Sequence[HeldLease], pace: Pace, *, slots: int) -> int:
    """How many leases to ask for now (0: none), for a worker that runs its leases one after
    another and fetches the next one's input while the current one computes.

    Enough that the sandbox never idles: one computing and, behind it, as many as compute
    for the time the next one takes to arrive (its fetch and the publisher's request gap),
    at least PIPELINE_DEPTH in all. No more than `slots`, and none that could not finish
    before its deadline: leases held run first (`held` in running order), a new lease starts
    once they are done and its input is in, and must end within DEADLINE_MARGIN of its
    deadline; if a held lease is already planned past that, nothing more is asked for.
    Without measurements (a job not run yet) only the depth counts."""
    if slots <= 0:
        return 0
    compute = pace.compute_s if pace.compute_s is not None and pace.compute_s > 0 else None
    want = PIPELINE_DEPTH
    if compute is not None:
        arrive = (pace.fetch_s or 0.0) + max(0.0, pace.request_gap_s)
        want = max(want, 1 + math.ceil(arrive / compute))
    n = max(0, min(want, slots) - len(held))
    if n == 0:
        return 0
    ahead = 0.0
    for h in held:
        c = h.compute_s if h.compute_s is not None else compute
        if c is None:
            return n  # nothing to plan with yet
        ahead += max(0.0, c)
        if ahead > DEADLINE_MARGIN * h.time_left_s:
            return 0
    if compute is None or pace.deadline_s is None:
        return n
    start = max(ahead, pace.fetch_s or 0.0)
    fits = 0
    while fits < n and start + (fits + 1) * compute <= DEADLINE_MARGIN * pace.deadline_s:
        fits += 1
    return fits


def hand_back_reason(condition: str) -> str:
    """The hand_back reason for the vehicle-policy condition that stopped the node."""
    return condition if condition in ("unplugged", "departure") else "policy"


def cannot_run(lease: object, *, ort_version: str, max_model_bytes: int,
               max_input_bytes: int) -> str | None:
    """Why this node must hand a well-formed lease back at once (`overloaded`), or None."""
    if not ort_allowed(lease.ort_versions, ort_version):
        return f"onnxruntime {ort_version} is outside the lease's {lease.ort_versions!r}"
    if lease.model_size > max_model_bytes:
        return f"model of {lease.model_size} bytes, this node's cap is {max_model_bytes}"
    if lease.input_size > max_input_bytes:
        return f"input of {lease.input_size} bytes, this node's cap is {max_input_bytes}"
    if lease.provider != PROVIDER_CPU:
        return f"execution provider {lease.provider} is not offered"
    return None


__all__ = ["Offer", "HeardJob", "LeaseRefused", "PublisherBackoff", "unmet_requirement",
           "eligible_publishers", "choose_job", "check_lease_batch", "cannot_run", "ort_allowed",
           "fetch_time_s", "hand_back_reason", "LeaseStatus", "CancelRefused", "leases_to_cancel",
           "OPEN_LEASE_STATUSES", "HeldLease", "Pace", "leases_to_request", "PIPELINE_DEPTH",
           "DEADLINE_MARGIN"]
