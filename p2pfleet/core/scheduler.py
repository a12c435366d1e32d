"""The publisher's scheduler: who gets which replica, leases, expiry, quorum, receipts, exclusion.

A pure state machine for all of one publisher's jobs (notes/style.md; specs/
work-and-leases.md, sections 3, 4 and 8; verification.md, sections 3-8). Frozen events in
(`handle(event) -> list[effect]`), effects out; `at_ms` comes in every event and an `rng`
(unpredictable to workers: lease ids and re-check draws come from it) in the constructor.
It decides, then mutates: an event it refuses (`PeerViolation`, `CoreUsageError`) changes
nothing.

Replicas. A shard needs `target` agreeing results: max(quorum, min_replicas), or 1 when
its first replica went to a worker trusted for a single copy (trust.may_take_single), plus
one when it is drawn for a re-check (`recheck_rate`). A shard drawn for an audit
(`audit_rate`, only when the publisher has trusted machines: its own key among them) is
accepted only by a quorum holding a trusted result, and keeps one replica beyond `target`
for them until one holds a replica. Eligibility of worker W for shard s: W never held a
lease of s; no live or returned lease of s from W's network prefix; for a non-established
W: no other live or returned lease of s by a non-established identity, none ever by a
non-established identity of W's prefix, and s holds known-answer rows; replicas after a
disagreement and re-checks of single copies go to established identities; a shard drawn
for cross-class (`cross_class_rate`) waits up to `cross_class_wait_ms` for a worker of
another hardware class than its first replica. Among eligible shards in the window of the
lowest-numbered open shards, W gets those with the lowest HMAC(secret, job_id || u32be(s)
|| W). Caps: per identity (trust.lease_cap, and the request's free slots), per prefix
(all identities, and the non-established ones apart), the job's credit budget (paid +
outstanding may not exceed it); the non-established identities of a prefix back off
together after one of them fails.

Results. The driver states in `ResultArrived` what only data can tell (form valid, known
answers matched, which earlier results it agrees with); verify.py finds the quorum, under
the replica rules again (distinct workers and prefixes, at most one non-established vote:
a late result of an expired lease is no back door) and chooses the output the user gets.
Valid results (agreeing with the accepted output, also late ones) are paid once (`Pay`);
invalid ones reset the worker's trust, and exclude it when a trusted machine's result was
in the quorum. A failed known answer, or a second different result for one lease, excludes
the worker too (`Excluded`, with the lease ids whose signed results are the proof), cancels
its live leases, discards its results in undecided shards and reopens the shards of live
jobs its results helped accept (`ShardReopened`; decided again under an audit). Errors
(failed, expired, malformed) count once per established identity and once per prefix for
non-established ones, never for excluded ones; beyond `max_error`, or `max_total` leases
issued without a quorum, the shard fails.

Stalls (work-and-leases.md, section 4). On every `Tick`, a shard that needs a replica, has
no live lease, and that no worker of its job's fleet may take (asked recently or holds a
live lease; caps and the cross-class wait aside) for `stall_wait_ms` is resolved, never
silently (`ShardStalled`, `ShardRec.fallback`): the publisher computes it when its own key
is trusted (`own_key`; its result decides, see `_evaluate`), else one relaxation of
RELAX_ORDER per wait, then it waits marked "exhausted".

Ended jobs (work-and-leases.md, section 8). `JobForgotten` drops a done or cancelled job's
records (a long-running driver then holds the jobs in flight only); a later result, failure
or hand-back naming it is refused with `Forgotten` (no penalty, nothing paid). Trust
records, and so exclusions, are per worker and stay.

State is kept in plain records (`JobRec`, `ShardRec`, `LeaseRec`, trust.WorkerTrust);
`take_changes()` returns those touched since the last call so the driver persists them in
the same transaction as the event's input, and `restore()` rebuilds the machine from them.
An optional `sink` gets every event (event_json gives one JSON line for a replay log).
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import hashlib
import heapq
import hmac
import ipaddress
import json
import math
import random
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from . import trust as T
from .ratelimit import TokenBuckets
from .verify import (ESTABLISHED, FRESH, TRUSTED, Vote, choose_output, find_quorum, is_valid,
                     largest_agreeing)

MINUTE_MS = 60_000
# Relaxations of a stalled shard's rules when the publisher does not compute it itself, in
# the order they are applied (one per stall wait): a worker whose earlier lease of it ended
# without a result may take it again; established identities may share a prefix (lease and
# quorum); a re-check's extra replica is dropped; an audit's trusted vote is dropped. None
# lets a quorum form without an established or trusted vote (at most one fresh, always).
RELAX_ORDER = ("reissue", "prefix", "recheck", "audit")
UNKNOWN_PREFIX = "unknown"  # relayed or unknown address: all such workers share one prefix
MAX_CLASSES_SEEN = 256  # hardware classes remembered for the cross-class wait


class CoreUsageError(Exception):
    """The caller (our code) used the machine wrongly: unknown job, time going back."""


class Forgotten(Exception):
    """A result, failure or hand-back for a lease of a job that ended and was forgotten
    (`JobForgotten`): refused, nothing changes and nothing is paid. Not the peer's fault
    (a late result may well be honest): no penalty."""

    def __init__(self, worker: bytes, job_id: bytes, lease_id: bytes, what: str):
        super().__init__(f"{what} for lease {lease_id.hex()} of job {job_id.hex()}, which "
                         f"ended and was forgotten: refused, nothing is paid")
        self.worker, self.job_id, self.lease_id = worker, job_id, lease_id


class PeerViolation(Exception):
    """A peer broke the protocol; `penalty` names the reputation offence."""

    def __init__(self, peer: bytes, why: str, penalty: str = "invalid-message"):
        super().__init__(f"peer {peer.hex()[:16]}: {why}")
        self.peer, self.why, self.penalty = peer, why, penalty


# --- settings -------------------------------------------------------------------------
@dataclass(frozen=True)
class SchedulerSettings:
    prefix_v4: int = 24
    prefix_v6: int = 48
    prefix_cap: int = 64
    window: int = 256
    min_replicas: int = 2            # untrusted work is always replicated
    min_deadline_ms: int = 10 * MINUTE_MS
    grace_min_ms: int = MINUTE_MS
    grace_fraction: float = 0.1
    transfer_bytes_per_s: float = 1e6
    request_interval_ms: int = 10_000  # work requests per identity: one per interval ...
    request_burst: int = 3             # ... on average, in bursts of this many
    no_work_retry_ms: int = MINUTE_MS
    cross_class_rate: float = 0.1
    recheck_cross_rate: float = 0.5  # share of re-checks that must go to another class
    cross_class_wait_ms: int = MINUTE_MS  # a one-class fleet must not stall for long
    fresh_need_known_answer: bool = True
    fresh_prefix_cap: int = 4        # live leases of non-established identities per prefix
    max_batch: int = 64
    trust: T.TrustSettings = field(default_factory=T.TrustSettings)
    own_key: bytes = b""             # the publisher's own key: its audits are never paid
    # A shard that needs replicas, has no live lease and that no worker asking for its job
    # may take is "stalled"; after this long it is resolved (publisher computes it, or the
    # rules are relaxed one step): tens of seconds, so a small honest fleet finishes soon.
    stall_wait_ms: int = 30_000


@dataclass(frozen=True)
class JobParams:
    """What the scheduler needs of a job; per-shard tuples are indexed by shard."""

    job_id: bytes
    secret: bytes
    samples: tuple[int, ...]         # per shard, known-answer rows included
    credit: tuple[int, ...]
    known_answer: tuple[bool, ...]
    input_size: tuple[int, ...]
    quorum: int = 2
    max_error: int = 3
    max_total: int = 0               # 0: 2 * quorum + 4
    recheck_rate: float = 0.07
    budget: int | None = None
    audit_rate: float = 0.05         # shards whose extra replica is the publisher's own

    def __post_init__(self) -> None:
        n = len(self.samples)
        if n == 0:
            raise CoreUsageError("a job needs at least one shard")
        if not (len(self.credit) == len(self.known_answer) == len(self.input_size) == n):
            raise CoreUsageError("per-shard tuples of a job must have one entry per shard")
        if len(self.secret) < 32:
            raise CoreUsageError("the job secret must be at least 32 bytes")
        if not 1 <= self.quorum <= 255:
            raise CoreUsageError(f"quorum {self.quorum} outside 1..255")
        for name in ("recheck_rate", "audit_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise CoreUsageError(f"{name} {getattr(self, name)} outside [0, 1]")

    @property
    def total_bound(self) -> int:
        return self.max_total or 2 * self.quorum + 4


# --- events ----------------------------------------------------------------------------
@dataclass(frozen=True)
class JobAdded:
    at_ms: int
    job: JobParams


@dataclass(frozen=True)
class WorkRequested:
    at_ms: int
    worker: bytes
    prefix: str
    hw_class: bytes
    bench: float
    free_slots: int
    jobs: tuple[bytes, ...]  # live jobs whose requirements the request meets (driver checks)
    audit_only: bool = False  # the publisher computing audits itself: only audit replicas


@dataclass(frozen=True)
class ResultArrived:
    at_ms: int
    lease_id: bytes
    worker: bytes
    digest: bytes
    form_ok: bool = True
    known_answer_ok: bool | None = None   # None: the shard holds no known answers
    agrees: tuple[bytes, ...] = ()         # lease ids of the shard's results it agrees with
    job_id: bytes = b""                    # the message's job (b"": not given)


@dataclass(frozen=True)
class LeaseFailed:
    at_ms: int
    lease_id: bytes
    worker: bytes
    reason: str
    job_id: bytes = b""                    # the message's job (b"": not given)


@dataclass(frozen=True)
class HandedBack:
    at_ms: int
    lease_id: bytes
    worker: bytes
    job_id: bytes = b""                    # the message's job (b"": not given)


@dataclass(frozen=True)
class Tick:
    at_ms: int


@dataclass(frozen=True)
class JobCancelled:
    at_ms: int
    job_id: bytes


@dataclass(frozen=True)
class JobForgotten:
    """The driver lets an ended (done or cancelled) job go: its job, shard and lease records
    leave the machine (the store keeps them). Late messages about it are refused
    (`Forgotten`); trust records and exclusions of its workers stay."""
    at_ms: int
    job_id: bytes


EVENTS = (JobAdded, WorkRequested, ResultArrived, LeaseFailed, HandedBack, Tick, JobCancelled,
          JobForgotten)


# --- effects ---------------------------------------------------------------------------
@dataclass(frozen=True)
class LeaseGrant:
    lease_id: bytes
    job_id: bytes
    shard: int
    deadline_ms: int
    credit: int
    first_batch: int = 0


@dataclass(frozen=True)
class Grant:
    worker: bytes
    leases: tuple[LeaseGrant, ...]


@dataclass(frozen=True)
class Refuse:
    worker: bytes
    reason: str  # a NoWork reason
    retry_after_ms: int


@dataclass(frozen=True)
class Pay:
    lease_id: bytes
    job_id: bytes
    shard: int
    worker: bytes
    digest: bytes
    credit: int
    at_ms: int


@dataclass(frozen=True)
class CancelLeases:
    worker: bytes
    job_id: bytes
    lease_ids: tuple[bytes, ...]
    reason: str


@dataclass(frozen=True)
class Excluded:
    worker: bytes
    job_id: bytes
    claim: str                       # conflicting_results | failed_known_answer
    lease_ids: tuple[bytes, ...]     # leases whose stored results are the proofs
    note: str


@dataclass(frozen=True)
class ShardAccepted:
    job_id: bytes
    shard: int
    lease_id: bytes
    digest: bytes


@dataclass(frozen=True)
class ShardReopened:
    """An accepted shard's output is withdrawn: a result it relied on came from a worker
    excluded since. It will be accepted again (ShardAccepted) or fail."""
    job_id: bytes
    shard: int
    lease_id: bytes                  # the excluded worker's result
    reason: str


@dataclass(frozen=True)
class ShardStalled:
    """No worker asking for the job could take the shard for `stall_wait_ms`: resolved by
    `step`, "publisher" (the publisher computes the missing replica itself) or the next
    relaxation of RELAX_ORDER, or "failed" when none is left."""
    job_id: bytes
    shard: int
    step: str
    note: str


@dataclass(frozen=True)
class ShardFailed:
    job_id: bytes
    shard: int
    reason: str


@dataclass(frozen=True)
class JobDone:
    job_id: bytes


@dataclass(frozen=True)
class WakeAt:
    at_ms: int


# --- state records ---------------------------------------------------------------------
@dataclass(slots=True)
class JobRec:
    job: JobParams
    status: str = "live"     # live | cancelled | done
    paid: int = 0


@dataclass(slots=True)  # many: a simulated fleet holds millions
class ShardRec:
    job_id: bytes
    index: int
    status: str = "open"     # open | accepted | failed | cancelled
    target: int = 0          # 0: no replica issued yet
    single: bool = False
    recheck: bool = False
    cross: bool = False
    audit: bool = False      # one replica is reserved for a trusted machine of the publisher
    errors: int = 0
    issued: int = 0          # leases counted against max_total (hand-backs are not)
    accepted_lease: bytes | None = None
    reason: str = ""
    last_issue_ms: int = 0
    # How a stall was resolved: "" (never), "publisher" (its own result decides), or the
    # relaxations applied so far, in RELAX_ORDER, joined by ",".
    fallback: str = ""
    stalled_ms: int = 0      # since when no asking worker may take it (0: not stalled)

    def relaxed(self, step: str) -> bool:
        return bool(self.fallback) and step in self.fallback.split(",")


@dataclass(slots=True)  # many: a simulated fleet holds millions
class LeaseRec:
    lease_id: bytes
    job_id: bytes
    shard: int
    worker: bytes
    prefix: str
    hw_class: bytes
    issued_ms: int
    expires_ms: int
    deadline_ms: int
    credit: int
    fresh: bool              # the worker was not established when the lease was issued or
                             # when its result arrived
    state: str = "live"      # live | returned | expired | failed | handed_back | cancelled
    digest: bytes | None = None
    ok: bool = False
    agrees: tuple[bytes, ...] = ()
    order: int = 0
    verdict: str = ""        # "" | valid | invalid | discarded
    paid: bool = False


def prefix_of(ip: str | None, v4_bits: int = 24, v6_bits: int = 48) -> str:
    """The network prefix a worker counts under (UNKNOWN_PREFIX when relayed/unknown)."""
    if not ip:
        return UNKNOWN_PREFIX
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return UNKNOWN_PREFIX
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    bits = v4_bits if addr.version == 4 else v6_bits
    return str(ipaddress.ip_network(f"{addr}/{bits}", strict=False))


RANKS_PER_BLOCK = 8  # one HMAC-SHA256 gives the 4-byte ranks of 8 neighbouring shards


def rank(secret: bytes, job_id: bytes, shard: int, worker: bytes) -> bytes:
    """The worker's rank of a shard (lower first; ties go to the lower index): 4 bytes of
    HMAC-SHA256(job secret, job id || worker || u32be(shard // 8)), at 4 x (shard % 8).
    Keyed by the job's secret, so nobody else can tell which shards a worker will be
    offered; one HMAC per 8 shards, so ranking a window costs a few hashes, not one each."""
    block, at = divmod(shard, RANKS_PER_BLOCK)
    digest = hmac.new(secret, job_id + worker + block.to_bytes(4, "big"), hashlib.sha256).digest()
    return digest[4 * at:4 * at + 4]


def lease_deadline_ms(samples: int, bench: float, input_size: int, s: SchedulerSettings,
                      queued_samples: int = 0) -> int:
    """About three times the expected compute time plus the transfer time, >= the minimum.
    `queued_samples`: samples of the leases ahead of this one in the same batch (a worker
    runs a batch's leases one after another, so the last waits for the others)."""
    compute_ms = 3000.0 * (samples + queued_samples) / max(bench, 1e-3)
    transfer_ms = 1000.0 * input_size / s.transfer_bytes_per_s
    return int(min(max(s.min_deadline_ms, compute_ms + transfer_ms), 2**32 - 1))


def grace_ms(deadline_ms: int, s: SchedulerSettings) -> int:
    return max(s.grace_min_ms, int(s.grace_fraction * deadline_ms))


class KeyedRandom(random.Random):
    """A random.Random drawing from HMAC-SHA256(key, counter): unpredictable to anyone
    without the key (workers see lease ids), yet replayable by whoever holds it."""

    def __init__(self, key: bytes):
        self._key = bytes(key)
        self._pads = _hmac_pads(self._key)
        self._counter = 0
        super().__init__(0)

    def seed(self, *args, **kwargs) -> None:  # random.Random.__init__ calls it
        self._counter = 0

    def _block(self) -> bytes:
        self._counter += 1
        inner, outer = self._pads[0].copy(), self._pads[1].copy()
        inner.update(self._counter.to_bytes(8, "big"))
        outer.update(inner.digest())
        return outer.digest()  # HMAC-SHA256(key, u64be(counter))

    def getrandbits(self, k: int) -> int:
        if k < 0:
            raise ValueError("number of bits must be non-negative")
        out = b""
        while len(out) * 8 < k:
            out += self._block()
        return int.from_bytes(out, "big") >> (len(out) * 8 - k)

    def random(self) -> float:
        return self.getrandbits(53) / float(1 << 53)

    def randbytes(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += self._block()
        return out[:n]

    def getstate(self):  # noqa: D401 - mirrors random.Random
        return (self._key, self._counter)

    def setstate(self, state) -> None:
        self._key, self._counter = state
        self._pads = _hmac_pads(self._key)


def _hmac_pads(key: bytes, inner_prefix: bytes = b"") -> tuple:
    """SHA-256 states fed HMAC's padded key (RFC 2104), the inner one also `inner_prefix`:
    HMAC-SHA256(key, inner_prefix + m) is outer.copy() fed inner.copy() fed m, so a
    caller hashing many messages under one key does not key HMAC again for each."""
    key = key if len(key) <= 64 else hashlib.sha256(key).digest()
    key = key.ljust(64, b"\0")
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in key) + inner_prefix)
    outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))
    return inner, outer


class _LazyShards(dict):
    """Shard records by (job id, index), for a machine holding jobs of many shards (the
    simulator): a shard nobody read or changed yet is made, in its initial state, on first
    read, so the records of shards never leased take no memory. Iterating lists the shards
    made so far only."""

    def __init__(self, jobs: dict[bytes, JobRec]):
        super().__init__()
        self._jobs = jobs

    def __missing__(self, key: tuple[bytes, int]) -> ShardRec:
        job_id, index = key
        rec = self._jobs.get(job_id)
        if rec is None or not 0 <= index < len(rec.job.samples):
            raise KeyError(key)
        sh = self[key] = ShardRec(job_id, index)
        return sh


class _Changes(set):
    """The records touched since `take_changes()`, as ("job" | "shard" | "lease" | "worker",
    key). Every rule that changes a record marks it here (the store must see it), so each
    mark also tells `on_touch`: the scheduler's shard index refreshes that shard. `keep`
    False (a driver that persists nothing, as the simulator): marks are passed on, not kept."""

    def __init__(self, on_touch: Callable[[tuple[str, object]], None], keep: bool = True):
        super().__init__()
        self._on_touch, self._keep = on_touch, keep

    def add(self, item: tuple[str, object]) -> None:
        if self._keep:
            super().add(item)
        self._on_touch(item)

    def update(self, *items: Iterable[tuple[str, object]]) -> None:
        for group in items:
            for item in group:
                self.add(item)


# --- the machine -----------------------------------------------------------------------
class Scheduler:
    def __init__(self, settings: SchedulerSettings | None = None, *, rng: random.Random,
                 sink: Callable[[object], None] | None = None, keep_changes: bool = True,
                 lazy_shards: bool = False):
        """`keep_changes` False: `take_changes()` returns nothing (a driver that persists
        nothing). `lazy_shards`: shard records are made on first use (`_LazyShards`; the
        simulator), so `shards` lists only those. Neither changes a decision."""
        self.s = settings or SchedulerSettings()
        self._horizon_ms = max(self.s.stall_wait_ms,  # `_horizon`
                               self.s.no_work_retry_ms + self.s.request_interval_ms)
        self.rng = rng
        self.sink = sink
        self.jobs: dict[bytes, JobRec] = {}
        self.shards: dict[tuple[bytes, int], ShardRec] = (
            _LazyShards(self.jobs) if lazy_shards else {})
        self.leases: dict[bytes, LeaseRec] = {}
        self.workers: dict[bytes, T.WorkerTrust] = {}
        # a shard's leases in issue order; a tuple: 8 bytes a lease, a list kept 88 a shard
        self._by_shard: dict[tuple[bytes, int], tuple[LeaseRec, ...]] = {}
        self._live: dict[bytes, None] = {}  # live lease ids, in issue order
        # Live leases per worker, and per prefix [all, non-established]: the caps a work
        # request checks, kept as leases go live and end (not counted per request).
        self._live_of_worker: dict[bytes, int] = {}
        self._live_in_prefix: dict[str, list[int]] = {}
        # (expiry, lease id) of every lease put live, a heap: the earliest live one is its
        # top once the ended ones above it are dropped (a lease never goes live again)
        self._expiry: list[tuple[int, bytes]] = []
        # The shard index (what `_window` and `_maybe_done` read, instead of scanning every
        # shard of a job per request): per job, the sorted indices of shards with a replica
        # to offer (`_in_window`), the undecided shards, and the shards touched since (whose
        # entries are refreshed before the next read).
        self._rank_base: dict[bytes, tuple] = {}  # job -> (inner, outer) hash states
        self._window_of: dict[bytes, list[ShardRec]] = {}  # job -> its window, until it moves
        self._offered: dict[bytes, array] = {}         # sorted shard indices ('q')
        self._undecided: dict[bytes, list] = {}        # [count, bytearray: 1 if undecided]
        self._touched: dict[bytes, set[int]] = {}
        self._room: dict[tuple[bytes, int], int] = {}  # _untrusted_room of unchanged shards
        # job -> shard -> the asking worker the stall check last found able to take it: asked
        # first next time (it usually still is), so a tick does not walk every requester
        self._able_hint: dict[bytes, dict[int, bytes]] = {}
        self._request_rate = (TokenBuckets(60_000 / self.s.request_interval_ms,
                                           max(1, self.s.request_burst))
                              if self.s.request_interval_ms > 0 else None)
        # prefix -> (consecutive failures of its non-established identities, back off until)
        self._prefix_backoff: dict[str, tuple[int, int]] = {}
        self._order = 0
        # worker -> its last work request (not the publisher's own): who could take a
        # stalled shard. In memory only: after a restart stall clocks start again.
        self._requests: dict[bytes, WorkRequested] = {}
        self._class_seen: dict[str, int] = {}  # hardware class -> its latest work request
        self._own_fallback: set[tuple[bytes, int]] = set()  # open shards the publisher computes
        self.forgotten: set[bytes] = set()  # ended jobs let go (JobForgotten): ids only
        self._now = 0
        self._dirty: set[tuple[str, object]] = _Changes(self._touch, keep_changes)

    # --- queries (read-only) ---------------------------------------------------------
    def trust_of(self, worker: bytes) -> T.WorkerTrust:
        return self.workers.get(worker) or T.WorkerTrust(worker)

    def shard_leases(self, job_id: bytes, shard: int) -> tuple[LeaseRec, ...]:
        return self._by_shard.get((job_id, shard), ())

    def returned(self, job_id: bytes, shard: int) -> list[LeaseRec]:
        return [l for l in self.shard_leases(job_id, shard) if l.state == "returned"]

    def live_leases(self, worker: bytes | None = None) -> list[LeaseRec]:
        return [self.leases[i] for i in self._live
                if worker is None or self.leases[i].worker == worker]

    def _set_state(self, lease: LeaseRec, state: str) -> None:
        lease.state = state
        if state == "live":
            self._live_add(lease)
        elif lease.lease_id in self._live:
            del self._live[lease.lease_id]
            n = self._live_of_worker[lease.worker] - 1
            if n:
                self._live_of_worker[lease.worker] = n
            else:
                del self._live_of_worker[lease.worker]
            counts = self._live_in_prefix[lease.prefix]
            counts[0] -= 1
            counts[1] -= lease.fresh
            if not counts[0]:
                del self._live_in_prefix[lease.prefix]

    def _live_add(self, lease: LeaseRec) -> None:
        if lease.lease_id in self._live:
            return
        self._live[lease.lease_id] = None
        heapq.heappush(self._expiry, (lease.expires_ms, lease.lease_id))
        self._live_of_worker[lease.worker] = self._live_of_worker.get(lease.worker, 0) + 1
        counts = self._live_in_prefix.setdefault(lease.prefix, [0, 0])
        counts[0] += 1
        counts[1] += lease.fresh

    def _next_expiry(self) -> int | None:
        """When the earliest live lease expires (None: no lease is live)."""
        heap = self._expiry
        while heap and heap[0][1] not in self._live:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def _due(self, at_ms: int) -> list[LeaseRec]:
        """The live leases expired by `at_ms`, by (expiry, lease id), taken off the heap."""
        heap, due = self._expiry, []
        while heap and heap[0][0] <= at_ms:
            _exp, lease_id = heapq.heappop(heap)
            if lease_id in self._live:
                due.append(self.leases[lease_id])
        return due

    def _live_counts(self, worker: bytes, prefix: str) -> tuple[int, int, int]:
        """Live leases of `worker`, of `prefix`, and of its non-established identities."""
        in_prefix, fresh_in_prefix = self._live_in_prefix.get(prefix, (0, 0))
        return self._live_of_worker.get(worker, 0), in_prefix, fresh_in_prefix

    def _vote(self, l: LeaseRec) -> Vote:
        standing = (TRUSTED if l.worker in self.s.trust.trusted else
                    FRESH if l.fresh else ESTABLISHED)
        return Vote(l.lease_id, l.worker, l.digest or b"", l.order, frozenset(l.agrees), l.ok,
                    l.prefix, standing)

    def errors(self, sh: ShardRec) -> int:
        """The shard's errors as counted against max_error: failed and expired leases and
        malformed results, once per established identity and once per network prefix for
        non-established ones (throwaway keys behind one address count as one), never those
        of an excluded identity."""
        keys = set()
        for l in self.shard_leases(sh.job_id, sh.index):
            if l.state in ("failed", "expired") or (l.state == "returned" and
                                                     l.verdict == "invalid" and not l.ok):
                if not self.trust_of(l.worker).excluded:
                    keys.add(("prefix", l.prefix) if l.fresh else ("worker", l.worker))
        return len(keys)

    def _untrusted_room(self, sh: ShardRec) -> int:
        """Replicas the shard still needs, apart from an audit's reserved one (which is
        needed as long as no trusted machine holds a replica)."""
        if (sh.status != "open" or self.jobs[sh.job_id].status != "live"
                or sh.fallback == "publisher"):  # the publisher's own result decides it
            return 0
        key = (sh.job_id, sh.index)
        room = self._room.get(key)
        if room is None:  # kept until the shard or one of its leases changes (`_touch`)
            room = self._room[key] = self._count_room(sh)
        return room

    def _count_room(self, sh: ShardRec) -> int:
        job = self.jobs[sh.job_id].job
        target = sh.target or max(job.quorum, self.s.min_replicas)
        leases = self.shard_leases(sh.job_id, sh.index)
        live = sum(1 for l in leases if l.state == "live")
        votes = [self._vote(l) for l in leases if l.state == "returned"]
        # An audited shard counts what agrees with a trusted result once it has one, and
        # its trusted replica is one more than the others: workers may still fill all of
        # `target` (colluders must not learn that a shard is audited by finding it full).
        trusted = sh.audit and any(v.ok and v.standing == TRUSTED for v in votes)
        have = largest_agreeing(votes, trusted=trusted, shared_prefix=sh.relaxed("prefix"))
        extra = 1 if sh.audit and not self._audit_pending(sh) else 0
        return max(0, target - have - live + extra)

    def _audit_pending(self, sh: ShardRec) -> bool:
        """An audited shard whose reserved replica no trusted machine holds yet, or a stalled
        one the publisher is to compute and has not taken yet."""
        if sh.fallback == "publisher":
            return not any(l.worker == self.s.own_key
                           for l in self.shard_leases(sh.job_id, sh.index))
        trusted = self.s.trust.trusted
        return sh.audit and not any(
            l.worker in trusted and (l.state == "live" or (l.state == "returned" and l.ok))
            for l in self.shard_leases(sh.job_id, sh.index))

    def audits_waiting(self) -> bool:
        """Does a live job have an audited shard whose reserved replica nobody holds?"""
        return any(self._audit_pending(sh) for rec in self.jobs.values() if rec.status == "live"
                   for sh in self._window(rec))

    def open_replicas(self, sh: ShardRec) -> int:
        if sh.status != "open" or self.jobs[sh.job_id].status != "live":
            return 0
        return max(0, self._untrusted_room(sh)) + (1 if self._audit_pending(sh) else 0)

    def job_counts(self, job_id: bytes) -> dict[str, int]:
        n = len(self.jobs[job_id].job.samples)
        # a shard record not made yet (lazy_shards) is in its initial state: counted in none
        shards = [sh for i in range(n) if (sh := self.shards.get((job_id, i))) is not None]
        leases = [l for l in self.leases.values() if l.job_id == job_id]
        return {
            "shards": n,
            "accepted": sum(1 for s in shards if s.status == "accepted"),
            "failed": sum(1 for s in shards if s.status == "failed"),
            "leases": len(leases),
            "live": sum(1 for l in leases if l.state == "live"),
            "invalid": sum(1 for l in leases if l.verdict in ("invalid", "discarded")),
            "workers": len({l.worker for l in leases}),
            "paid": self.jobs[job_id].paid,
            "self_computed": sum(1 for s in shards if s.fallback == "publisher"),
            "relaxed": sum(1 for s in shards if s.fallback and s.fallback != "publisher"),
            "stalled": sum(1 for s in shards if s.stalled_ms and s.status == "open"),
            "exhausted": sum(1 for s in shards if s.relaxed("exhausted") and s.status == "open"),
        }

    # --- persistence -----------------------------------------------------------------
    def take_changes(self) -> tuple[list[JobRec], list[ShardRec], list[LeaseRec], list[T.WorkerTrust]]:
        jobs, shards, leases, workers = [], [], [], []
        for kind, key in sorted(self._dirty, key=repr):
            if kind == "job":
                jobs.append(copy.copy(self.jobs[key]))
            elif kind == "shard":
                shards.append(copy.copy(self.shards[key]))
            elif kind == "lease":
                leases.append(copy.copy(self.leases[key]))
            else:
                workers.append(self.workers[key])
        self._dirty.clear()
        return jobs, shards, leases, workers

    def restore(self, jobs: Iterable[JobRec], shards: Iterable[ShardRec],
                leases: Iterable[LeaseRec], workers: Iterable[T.WorkerTrust],
                forgotten: Iterable[bytes] = ()) -> None:
        """Rebuild from persisted records (on an empty machine). `forgotten`: ids of ended
        jobs whose records were left out (`JobForgotten`): a late message naming one is
        refused as `Forgotten`."""
        if self.jobs or self.leases:
            raise CoreUsageError("restore() needs a fresh scheduler")
        self.forgotten = set(forgotten)
        for j in jobs:
            if j.job.job_id in self.forgotten:
                raise CoreUsageError(f"job {j.job.job_id.hex()} is both restored and forgotten")
            self.jobs[j.job.job_id] = copy.copy(j)
        for sh in shards:
            self.shards[(sh.job_id, sh.index)] = copy.copy(sh)
        for held in sorted(leases, key=lambda l: (l.issued_ms, l.lease_id)):
            l = self.leases[held.lease_id] = copy.copy(held)
            if l.state == "live":
                self._live_add(l)
            key = (l.job_id, l.shard)
            self._by_shard[key] = self._by_shard.get(key, ()) + (l,)
            self._order = max(self._order, l.order)
        for w in workers:
            self.workers[w.worker] = w
        for l in sorted(self.leases.values(), key=lambda l: (l.expires_ms, l.lease_id)):
            if l.fresh and l.state in ("failed", "expired"):  # when it ended is not kept:
                self._prefix_failed(l.prefix, l.expires_ms)  # its expiry bounds it
            elif l.fresh and l.verdict == "valid":
                self._prefix_backoff.pop(l.prefix, None)
        for job_id, rec in self.jobs.items():
            for i in range(len(rec.job.samples)):
                if (job_id, i) not in self.shards:
                    raise CoreUsageError(f"job {job_id.hex()}: shard {i} missing from the store")
        self._own_fallback = {k for k, sh in self.shards.items()
                              if sh.fallback == "publisher" and sh.status == "open"}
        for job_id, index in self.shards:
            self._touched.setdefault(job_id, set()).add(index)

    # --- events ----------------------------------------------------------------------
    def handle(self, ev: object) -> list:
        at = getattr(ev, "at_ms", None)
        if not isinstance(ev, EVENTS):
            raise CoreUsageError(f"not a scheduler event: {type(ev).__name__}")
        if at < self._now - 5_000:
            # Small steps back happen between threads of one driver; larger ones are a bug.
            raise CoreUsageError(f"{type(ev).__name__} at {at} ms goes back from {self._now} ms")
        method = getattr(self, "_on_" + type(ev).__name__)
        effects = method(ev)
        self._now = max(self._now, at)
        if self.sink is not None:
            self.sink(ev)
        return effects

    def _on_JobAdded(self, ev: JobAdded) -> list:
        job = ev.job
        if job.job_id in self.jobs or job.job_id in self.forgotten:
            raise CoreUsageError(f"job {job.job_id.hex()} already exists")
        self.jobs[job.job_id] = JobRec(job)
        self._dirty.add(("job", job.job_id))
        lazy = isinstance(self.shards, _LazyShards)
        for i in range(len(job.samples)):
            if not lazy:
                self.shards[(job.job_id, i)] = ShardRec(job.job_id, i)
            self._dirty.add(("shard", (job.job_id, i)))
        return []

    def _on_JobCancelled(self, ev: JobCancelled) -> list:
        rec = self.jobs.get(ev.job_id)
        if rec is None:
            raise CoreUsageError(f"no job {ev.job_id.hex()}")
        if rec.status != "live":
            return []
        rec.status = "cancelled"
        self._forget_window(ev.job_id)
        self._dirty.add(("job", ev.job_id))
        for i in range(len(rec.job.samples)):
            sh = self.shards[(ev.job_id, i)]
            if sh.status == "open":
                sh.status = "cancelled"
                self._dirty.add(("shard", (ev.job_id, i)))
        return self._cancel([l for l in self.live_leases() if l.job_id == ev.job_id],
                            "job cancelled")

    def _on_JobForgotten(self, ev: JobForgotten) -> list:
        """Drop an ended job's records. Nothing of it can change a decision any more: it
        offers no replica, holds no live lease (its end cancelled them), and an exclusion
        reopens shards of live jobs only. What is lost: a late valid result of one of its
        expired leases is no longer paid, and a second, different result for one of its
        leases no longer proves anything (specs/work-and-leases.md, section 8)."""
        job_id = ev.job_id
        rec = self.jobs.get(job_id)
        if rec is None:
            raise CoreUsageError(f"no job {job_id.hex()}")
        if rec.status == "live":
            raise CoreUsageError(f"job {job_id.hex()} is live: only an ended job is forgotten")
        if any(self._of_job(item) == job_id for item in self._dirty):
            raise CoreUsageError(f"job {job_id.hex()}: take_changes() first, its records "
                                 f"must reach the store before they are forgotten")
        for i in range(len(rec.job.samples)):
            key = (job_id, i)
            self.shards.pop(key, None)
            for l in self._by_shard.pop(key, ()):
                del self.leases[l.lease_id]
            self._room.pop(key, None)
            self._own_fallback.discard(key)
        for kept in (self._rank_base, self._window_of, self._offered, self._undecided,
                     self._touched, self._able_hint):
            kept.pop(job_id, None)
        del self.jobs[job_id]
        self.forgotten.add(job_id)
        return []

    def _of_job(self, item: tuple[str, object]) -> bytes | None:
        """The job a change mark (`_Changes`) belongs to (None: a trust record)."""
        kind, key = item
        if kind == "job":
            return key  # type: ignore[return-value]
        if kind == "shard":
            return key[0]  # type: ignore[index]
        if kind == "lease":
            return self.leases[key].job_id  # type: ignore[index]
        return None

    def _cancel(self, leases: list[LeaseRec], reason: str) -> list:
        by: dict[tuple[bytes, bytes], list[bytes]] = {}
        for l in leases:
            self._set_state(l, "cancelled")
            self._dirty.add(("lease", l.lease_id))
            by.setdefault((l.worker, l.job_id), []).append(l.lease_id)
        return [CancelLeases(w, j, tuple(ids), reason) for (w, j), ids in by.items()]

    # work requests ---------------------------------------------------------------------
    def _on_WorkRequested(self, ev: WorkRequested) -> list:
        s = self.s
        t = self.trust_of(ev.worker)
        now = ev.at_ms
        if t.excluded:
            return [Refuse(ev.worker, "excluded", 24 * 60 * MINUTE_MS)]
        if not ev.audit_only and ev.worker != s.own_key:
            self._requests[ev.worker] = ev
            self._class_seen[ev.hw_class] = now
            if len(self._class_seen) > MAX_CLASSES_SEEN:  # class names are the worker's word
                self._class_seen = {c: at for c, at in self._class_seen.items()
                                    if now - at <= self._horizon()}
                while len(self._class_seen) > MAX_CLASSES_SEEN:
                    del self._class_seen[min(self._class_seen, key=self._class_seen.__getitem__)]
        rate = self._request_rate
        # the driver's own audits are not rate limited; a burst lets a worker that just
        # heard of a new job ask at once, even if it asked about another a moment ago
        if rate is not None and not ev.audit_only and not rate.allow(ev.worker, now / 1000):
            return [Refuse(ev.worker, "backoff", math.ceil(rate.wait_s(ev.worker, now / 1000) * 1000))]
        if t.backoff_until_ms > now:
            return [Refuse(ev.worker, "backoff", t.backoff_until_ms - now)]
        live = [j for j, r in self.jobs.items() if r.status == "live"]
        if not live:
            return [Refuse(ev.worker, "no_work", s.no_work_retry_ms)]
        wanted = [j for j in live if j in set(ev.jobs)]
        if not wanted:
            return [Refuse(ev.worker, "not_eligible", s.no_work_retry_ms)]
        established = T.established(t, s.trust, now)
        if not established:
            _fails, until = self._prefix_backoff.get(ev.prefix, (0, 0))
            if until > now:
                return [Refuse(ev.worker, "backoff", until - now)]
        mine, in_prefix, fresh_in_prefix = self._live_counts(ev.worker, ev.prefix)
        room = min(ev.free_slots, T.lease_cap(t, s.trust, now) - mine,
                   s.prefix_cap - in_prefix, s.max_batch)
        if not established:
            room = min(room, s.fresh_prefix_cap - fresh_in_prefix)
        if room <= 0:
            return [Refuse(ev.worker, "quota", s.no_work_retry_ms)]
        picks: list[tuple[JobRec, ShardRec]] = []
        for job_id in wanted:
            rec = self.jobs[job_id]
            outstanding = self._outstanding_credit(job_id) if rec.job.budget is not None else 0
            # Rank first, then check eligibility in rank order only until the batch is full:
            # the same picks as ranking the eligible ones, without judging the whole window
            # (a full check per shard per request was the publisher's top cost).
            ranker = self._ranker(rec.job, ev.worker)
            candidates = sorted((ranker(sh.index), sh.index, sh) for sh in self._window(rec))
            for _r, _i, sh in candidates:
                if len(picks) >= room:
                    break
                if not self._eligible(sh, ev, established, now):
                    continue
                credit = rec.job.credit[sh.index]
                if (rec.job.budget is not None and not ev.audit_only  # own work is unpaid
                        and rec.paid + outstanding + credit > rec.job.budget):
                    continue  # no_work: the job's status tells its owner the budget is spent
                outstanding += credit
                picks.append((rec, sh))
            if len(picks) >= room:
                break
        if not picks:
            return [Refuse(ev.worker, "no_work", s.no_work_retry_ms)]
        grants, queued = [], 0
        for rec, sh in picks:
            grants.append(self._issue(rec, sh, ev, t, now, queued))
            queued += rec.job.samples[sh.index]
        return [Grant(ev.worker, tuple(grants)), WakeAt(self._next_expiry())]

    def _ranker(self, job: JobParams, worker: bytes) -> Callable[[int], bytes]:
        """`rank` for one job and worker: the same HMAC-SHA256 (RFC 2104), from hash states
        already fed the padded key and the job id (HMAC is not keyed again per request),
        each block hashed once per request."""
        states = self._rank_base.get(job.job_id)
        if states is None:
            states = self._rank_base[job.job_id] = _hmac_pads(job.secret, job.job_id)
        inner, outer = states
        blocks: dict[int, bytes] = {}

        def ranked(shard: int) -> bytes:
            block, at = divmod(shard, RANKS_PER_BLOCK)
            digest = blocks.get(block)
            if digest is None:
                h = inner.copy()
                h.update(worker + block.to_bytes(4, "big"))
                o = outer.copy()
                o.update(h.digest())
                digest = blocks[block] = o.digest()
            return digest[4 * at:4 * at + 4]
        return ranked

    def _outstanding_credit(self, job_id: bytes) -> int:
        return sum(l.credit for l in self.leases.values() if l.job_id == job_id and
                   (l.state == "live" or (l.state == "returned" and not l.verdict)))

    def _window(self, rec: JobRec) -> list[ShardRec]:
        """The job's window: its `window` lowest-numbered shards with a replica to offer
        (`_in_window`), read from the shard index: a request costs O(window), not O(shards).
        The list is kept until the window moves: read it, do not change it."""
        if rec.status != "live":
            return []  # no shard of a job that is not live offers a replica
        job_id = rec.job.job_id
        self._refresh(job_id)
        window = self._window_of.get(job_id)
        if window is None:
            window = self._window_of[job_id] = [self.shards[(job_id, i)]
                                                for i in self._offered[job_id][:self.s.window]]
        return window

    def _forget_window(self, job_id: bytes) -> None:
        """A job no longer live offers nothing: its kept window goes."""
        self._window_of.pop(job_id, None)

    def _in_window(self, sh: ShardRec) -> bool:
        # A shard never issued (no target drawn, no fallback) has every replica open:
        # no need to count its votes.
        untouched = sh.target == 0 and not sh.fallback and sh.status == "open"
        return (untouched and self.jobs[sh.job_id].status == "live") or self.open_replicas(sh) > 0

    def _touch(self, item: tuple[str, object]) -> None:
        """A record was changed (`_Changes`): its shard's index entries are stale."""
        kind, key = item
        if kind == "shard":
            job_id, index = key  # type: ignore[misc]
        elif kind == "lease":
            lease = self.leases.get(key)  # type: ignore[arg-type]
            if lease is None:
                return
            job_id, index = lease.job_id, lease.shard
        else:
            return  # a job's status is read directly; trust records do not enter the index
        self._touched.setdefault(job_id, set()).add(index)
        self._room.pop((job_id, index), None)

    def _refresh(self, job_id: bytes) -> None:
        """Bring the job's shard index up to date with the shards touched since."""
        touched = self._touched.pop(job_id, None)
        if not touched:
            return
        offered = self._offered.get(job_id)
        if offered is None:
            offered = self._offered[job_id] = array("q")
            self._undecided[job_id] = [0, bytearray(len(self.jobs[job_id].job.samples))]
        undecided = self._undecided[job_id]
        flags = undecided[1]
        add, drop = [], []
        for i in touched:
            sh = self.shards.get((job_id, i)) or ShardRec(job_id, i)  # not made: initial
            now_undecided = sh.status not in ("accepted", "failed")
            if now_undecided != flags[i]:
                flags[i] = now_undecided
                undecided[0] += 1 if now_undecided else -1
            at = bisect.bisect_left(offered, i)
            present = at < len(offered) and offered[at] == i
            if self._in_window(sh):
                if not present:
                    add.append(i)
            elif present:
                drop.append(i)
        if add or drop:
            self._window_of.pop(job_id, None)
        if len(add) + len(drop) > 64:  # many at once (a new job): rebuild, not shift each
            self._offered[job_id] = array("q", sorted(set(offered).difference(drop).union(add)))
            return
        for i in drop:
            del offered[bisect.bisect_left(offered, i)]
        for i in add:
            bisect.insort(offered, i)

    def _eligible(self, sh: ShardRec, ev: WorkRequested, established: bool, now: int,
                  stall_check: bool = False) -> bool:
        """May `ev`'s worker take a replica of `sh` now? `stall_check`: is it one that could
        (a cross-class wait ends by itself, so it does not count)."""
        if ev.audit_only and not self._audit_pending(sh):
            return False
        own = sh.fallback == "publisher"
        if own and ev.worker != self.s.own_key:
            return False  # the publisher computes it: nobody else
        job = self.jobs[sh.job_id].job
        leases = self.shard_leases(sh.job_id, sh.index)
        held = [l for l in leases if l.state == "live" or l.state == "returned"]
        # (plain loops: this runs per shard per request and per tick, and a generator per
        # test cost more than the test)
        worker, prefix = ev.worker, ev.prefix
        again = established and sh.relaxed("reissue")  # only a vote of its own counts once
        for l in (held if again else leases):
            if l.worker == worker:
                return False  # one replica per peer, ever
        if not (established and sh.relaxed("prefix")):
            for l in held:
                if l.prefix == prefix:
                    return False  # one replica per network prefix
        if not established:
            if any(l.fresh and l.prefix == ev.prefix for l in leases):
                return False  # one fresh identity per prefix per shard, ever
            # one new identity per shard; a result found invalid (its sender excluded) is in
            # no quorum, so it does not hold that place (else a cheater could stall the shard)
            if any(l.fresh and l.verdict != "invalid" for l in held):
                return False
            if self.s.fresh_need_known_answer and not job.known_answer[sh.index]:
                return False
            votes = [self._vote(l) for l in held if l.state == "returned"]
            if sh.single or (votes and largest_agreeing(
                    votes, shared_prefix=sh.relaxed("prefix")) < sum(v.ok for v in votes)):
                return False  # re-checks of single copies and tie-breakers: established only
        if (sh.cross and held and not stall_check
                and now - sh.last_issue_ms < self.s.cross_class_wait_ms):
            first = min(leases, key=lambda l: (l.issued_ms, l.lease_id)).hw_class
            if (all(l.hw_class == first for l in held) and ev.hw_class == first
                    and self._other_class_asking(first, now)):
                return False  # wait a while for a machine of another class
        if (ev.worker not in self.s.trust.trusted and sh.target
                and self._untrusted_room(sh) <= 0):
            return False  # the open replica is an audit's: the publisher's machines only
        if sh.issued >= job.total_bound and not own:
            return False
        return True

    def _issue(self, rec: JobRec, sh: ShardRec, ev: WorkRequested, t: T.WorkerTrust,
               now: int, queued_samples: int = 0) -> LeaseGrant:
        job = rec.job
        credit = job.credit[sh.index]
        if sh.target == 0:
            sh.single = T.may_take_single(t, self.s.trust, credit, now, self.rng)
            sh.recheck = self.rng.random() < job.recheck_rate
            rate = self.s.recheck_cross_rate if sh.recheck else self.s.cross_class_rate
            sh.cross = self.rng.random() < rate
            base = 1 if sh.single else max(job.quorum, self.s.min_replicas)
            # Audits need the publisher's own machines; drawn whoever asks first, so a
            # worker learns nothing from being given an audited shard.
            sh.audit = bool(self.s.trust.trusted) and self.rng.random() < job.audit_rate
            sh.target = base + (1 if sh.recheck else 0)
        deadline = lease_deadline_ms(job.samples[sh.index], ev.bench, job.input_size[sh.index],
                                     self.s, queued_samples)
        lease = LeaseRec(
            lease_id=self.rng.randbytes(16), job_id=job.job_id, shard=sh.index,
            worker=ev.worker, prefix=ev.prefix, hw_class=ev.hw_class, issued_ms=now,
            expires_ms=now + deadline + grace_ms(deadline, self.s), deadline_ms=deadline,
            credit=credit, fresh=not T.established(t, self.s.trust, now))
        while lease.lease_id in self.leases:  # 128 random bits: never, but never twice either
            lease.lease_id = self.rng.randbytes(16)
        if sh.relaxed("reissue"):  # its expired lease's late result would be a second vote
            for old in self.shard_leases(job.job_id, sh.index):
                if old.worker == ev.worker and old.state == "expired":
                    self._set_state(old, "cancelled")
                    self._dirty.add(("lease", old.lease_id))
        self.leases[lease.lease_id] = lease
        self._live_add(lease)
        key = (job.job_id, sh.index)
        self._by_shard[key] = self._by_shard.get(key, ()) + (lease,)
        sh.issued += 1
        sh.last_issue_ms = now
        self._dirty.update({("lease", lease.lease_id), ("shard", (job.job_id, sh.index))})
        return LeaseGrant(lease.lease_id, job.job_id, sh.index, deadline, credit, 0)

    # results -----------------------------------------------------------------------------
    def lease_of(self, lease_id: bytes, worker: bytes, what: str,
                 job_id: bytes = b"") -> LeaseRec:
        """The lease `worker` reports `what` about; PeerViolation if it is not its lease,
        `Forgotten` if it is none we hold and `job_id` (the message's) was forgotten."""
        lease = self.leases.get(lease_id)
        if lease is None:
            if job_id and job_id in self.forgotten:
                raise Forgotten(worker, job_id, lease_id, what)
            raise PeerViolation(worker, f"{what} for lease {lease_id.hex()}, which this "
                                        f"publisher never issued")
        if lease.worker != worker:
            raise PeerViolation(worker, f"{what} for lease {lease_id.hex()}, issued to "
                                        f"another worker")
        return lease

    def _on_ResultArrived(self, ev: ResultArrived) -> list:
        lease = self.lease_of(ev.lease_id, ev.worker, "result", ev.job_id)
        if lease.state == "returned":
            if lease.digest == ev.digest:
                return []  # a retry of the result we hold
            return self._exclude(ev.worker, lease.job_id, "conflicting_results", (lease.lease_id,),
                                 f"two results for lease {lease.lease_id.hex()}", ev.at_ms)
        if lease.state in ("failed", "handed_back", "cancelled"):
            return []  # given up already; the replica was reissued; nothing is paid
        if self.trust_of(ev.worker).excluded:
            return []
        sh = self.shards[(lease.job_id, lease.shard)]
        mates = {l.lease_id for l in self.returned(lease.job_id, lease.shard)}
        self._order += 1
        self._set_state(lease, "returned")
        # A worker reset since the lease was issued votes as a fresh identity.
        lease.fresh = lease.fresh or not T.established(self.trust_of(ev.worker), self.s.trust,
                                                        ev.at_ms)
        lease.digest = ev.digest
        lease.ok = ev.form_ok and ev.known_answer_ok is not False
        lease.agrees = tuple(sorted(set(ev.agrees) & mates))
        lease.order = self._order
        self._dirty.update({("lease", lease.lease_id), ("shard", (sh.job_id, sh.index))})
        for other in lease.agrees:
            o = self.leases[other]
            o.agrees = tuple(sorted(set(o.agrees) | {lease.lease_id}))
            self._dirty.add(("lease", other))
        effects: list = []
        if not ev.form_ok or ev.known_answer_ok is False:
            lease.verdict = "invalid"
            self._set_trust(T.on_disagreement(self.trust_of(ev.worker), ev.at_ms))
        if ev.known_answer_ok is False:
            effects += self._exclude(ev.worker, lease.job_id, "failed_known_answer",
                                     (lease.lease_id,), f"known-answer rows of shard "
                                     f"{lease.shard} did not match", ev.at_ms)
        return effects + self._evaluate(sh, ev.at_ms)

    def _on_LeaseFailed(self, ev: LeaseFailed) -> list:
        return self._give_up(self.lease_of(ev.lease_id, ev.worker, "failed", ev.job_id),
                             "failed", ev.at_ms)

    def _on_HandedBack(self, ev: HandedBack) -> list:
        return self._give_up(self.lease_of(ev.lease_id, ev.worker, "hand_back", ev.job_id),
                             "handed_back", ev.at_ms)

    def _give_up(self, lease: LeaseRec, state: str, now: int) -> list:
        if lease.state not in ("live", "expired"):
            return []  # a retry, or the lease was decided otherwise
        was_live = lease.state == "live"
        sh = self.shards[(lease.job_id, lease.shard)]
        self._set_state(lease, state)
        self._dirty.update({("lease", lease.lease_id), ("shard", (sh.job_id, sh.index))})
        if state == "handed_back":
            sh.issued -= 1 if was_live else 0  # not the worker's fault: not counted
        elif was_live:  # an expired lease was counted as a failure already
            self._on_failure(lease, now)
        return self._evaluate(sh, now)

    def _on_Tick(self, ev: Tick) -> list:
        effects: list = []
        for lease in self._due(ev.at_ms):
            if lease.expires_ms <= ev.at_ms:
                self._set_state(lease, "expired")
                sh = self.shards[(lease.job_id, lease.shard)]
                self._dirty.update({("lease", lease.lease_id), ("shard", (sh.job_id, sh.index))})
                self._on_failure(lease, ev.at_ms)
                effects += self._evaluate(sh, ev.at_ms)
        effects += self._check_stalls(ev.at_ms)
        next_exp = self._next_expiry()
        if next_exp is not None:
            effects.append(WakeAt(next_exp))
        return effects

    def _other_class_asking(self, hw_class: str, now: int) -> bool:
        """Has a machine of another hardware class asked for work lately? If not, a
        cross-class replica would wait for nobody: a one-class fleet does not wait."""
        return any(c != hw_class and now - at <= self._horizon()
                   for c, at in self._class_seen.items())

    # stalled shards ----------------------------------------------------------------------
    def _horizon(self) -> int:
        return self._horizon_ms

    def _requesters(self, job_id: bytes, now: int, busy: set[bytes],
                    excluded: bool = False) -> list[WorkRequested]:
        """Workers of this job's fleet: they asked for its work recently enough to ask again
        (a refused worker waits `no_work_retry_ms`) or hold a live lease (they ask when done);
        not excluded (`excluded`: excluded ones too, for a caller that checks them later)."""
        horizon = self._horizon()
        return [r for r in self._requests.values()
                if self._asks(r, job_id, now, horizon, busy)
                and (excluded or not self.trust_of(r.worker).excluded)]

    @staticmethod
    def _asks(r: WorkRequested, job_id: bytes, now: int, horizon: int, busy: set[bytes]) -> bool:
        return (now - r.at_ms <= horizon or r.worker in busy) and job_id in r.jobs

    def _able(self, sh: ShardRec, req: WorkRequested, now: int) -> bool:
        """Could this asking worker take a replica of `sh` (caps aside, which free up)?"""
        t = self.trust_of(req.worker)
        if t.backoff_until_ms > now:
            return False
        established = T.established(t, self.s.trust, now)
        if not established and self._prefix_backoff.get(req.prefix, (0, 0))[1] > now:
            return False
        return self._eligible(sh, req, established, now, stall_check=True)

    def stalled(self, sh: ShardRec, now: int, busy: set[bytes] | None = None,
                asking: list[WorkRequested] | None = None) -> bool:
        """Does `sh` need a replica that no live lease covers and that no worker asking for
        its job may take? Not while nobody asks at all: that is a fleet yet to come."""
        if sh.status != "open" or self.jobs[sh.job_id].status != "live":
            return False
        leases = self.shard_leases(sh.job_id, sh.index)
        for l in leases:
            if l.state == "live":
                return False
        if sh.fallback == "publisher":  # stalled again only if its own computation ended
            return any(l.worker == self.s.own_key for l in leases)  # without deciding it
        if self.open_replicas(sh) <= 0:
            return False
        if busy is None:
            busy = set(self._live_of_worker)  # workers holding a live lease
        hints = self._able_hint.setdefault(sh.job_id, {})
        hint = self._requests.get(hints.get(sh.index, b""))
        if (hint is not None and self._asks(hint, sh.job_id, now, self._horizon(), busy)
                and not self.trust_of(hint.worker).excluded and self._able(sh, hint, now)):
            return False  # the same answer as the walk below, which would find it too
        if asking is None:
            asking = self._requesters(sh.job_id, now, busy)
        anyone = False
        for r in asking:
            if self.trust_of(r.worker).excluded:
                continue  # `asking` may predate an exclusion (`_check_stalls`)
            if self._able(sh, r, now):
                hints[sh.index] = r.worker
                return False
            anyone = True
        return anyone

    def _check_stalls(self, now: int) -> list:
        busy = set(self._live_of_worker)  # workers holding a live lease
        for w in [w for w, r in self._requests.items()
                  if now - r.at_ms > self._horizon() and w not in busy]:
            del self._requests[w]
        self._own_fallback = {k for k in self._own_fallback if self.shards[k].status == "open"}
        effects: list = []
        wake: int | None = None  # when a stalled shard's wait ends
        for rec in [r for r in self.jobs.values() if r.status == "live"]:
            window = self._window(rec)
            check = window + [self.shards[k] for k in sorted(self._own_fallback)
                              if k[0] == rec.job.job_id and self.shards[k] not in window]
            # who asks for this job's work does not change during the loop (exclusions,
            # which may, are checked per shard in stalled())
            asking = self._requesters(rec.job.job_id, now, busy, excluded=True)
            for sh in check:
                if not self.stalled(sh, now, busy, asking):
                    if sh.stalled_ms:
                        sh.stalled_ms = 0
                        self._dirty.add(("shard", (sh.job_id, sh.index)))
                    continue
                if not sh.stalled_ms:
                    sh.stalled_ms = now
                    self._dirty.add(("shard", (sh.job_id, sh.index)))
                    due = now + self.s.stall_wait_ms
                elif now - sh.stalled_ms >= self.s.stall_wait_ms:
                    effects += self._resolve_stall(sh, now)
                    due = now  # still stalled after this step? the next check says
                else:
                    due = sh.stalled_ms + self.s.stall_wait_ms
                wake = due if wake is None else min(wake, due)
                if rec.status != "live":
                    break
        if wake is not None:  # a driver that ticks only when asked (the simulator)
            effects.append(WakeAt(wake))
        return effects

    def _resolve_stall(self, sh: ShardRec, now: int) -> list:
        """One step for a shard stalled for `stall_wait_ms`: the publisher computes it when it
        can (its own key is trusted: `own_key` set, self-audit on); else the next relaxation of
        RELAX_ORDER that applies; else the shard fails. Never silent: `ShardStalled`."""
        key = (sh.job_id, sh.index)
        waited = (now - sh.stalled_ms) / 1000
        sh.stalled_ms = 0
        self._dirty.add(("shard", key))
        leases = self.shard_leases(*key)
        own = self.s.own_key
        if (not sh.fallback and own and own in self.s.trust.trusted
                and not any(l.worker == own for l in leases)):
            sh.fallback = "publisher"
            self._own_fallback.add(key)
            return [ShardStalled(*key, "publisher", f"no eligible worker for {waited:.0f} s: "
                                                    f"the publisher computes it")]
        if sh.fallback != "publisher":
            applies = {
                "reissue": any(l.state in ("failed", "expired", "handed_back", "cancelled")
                               for l in leases),
                "prefix": any(l.state in ("live", "returned") for l in leases),
                "recheck": sh.recheck,
                "audit": sh.audit,
            }
            step = next((x for x in RELAX_ORDER if applies[x] and not sh.relaxed(x)), None)
            if step is not None:
                sh.fallback = ",".join(x for x in RELAX_ORDER if sh.relaxed(x) or x == step)
                if step == "recheck":
                    sh.recheck, sh.target = False, max(1, sh.target - 1)
                elif step == "audit":
                    sh.audit = False
                return [ShardStalled(*key, step, f"no eligible worker for {waited:.0f} s: "
                                                 f"relaxed {step}")] + self._evaluate(sh, now)
            # Nothing left to relax: failing it would let throwaway identities that keep
            # asking fail shards while the established workers are away. It waits, marked.
            if sh.relaxed("exhausted"):
                return []
            sh.fallback = ",".join(filter(None, (sh.fallback, "exhausted")))
            return [ShardStalled(*key, "exhausted", "no relaxation left: waits for an "
                                                    "established or trusted worker")]
        reason = "stalled: the publisher's own computation of it ended without a result"
        sh.status, sh.reason = "failed", reason
        effects: list = [ShardStalled(*key, "failed", reason), ShardFailed(*key, reason)]
        effects += self._cancel([l for l in leases if l.state == "live"], "shard failed")
        return effects + self._maybe_done(sh.job_id)

    # decisions ---------------------------------------------------------------------------
    def _set_trust(self, t: T.WorkerTrust) -> None:
        self.workers[t.worker] = t
        self._dirty.add(("worker", t.worker))

    def _on_failure(self, lease: LeaseRec, now: int) -> None:
        """A failed or expired lease: the worker backs off, and so do the non-established
        identities of its prefix when it was one (throwaway keys share their address's fate)."""
        self._set_trust(T.on_failure(self.trust_of(lease.worker), self.s.trust, now))
        if lease.fresh:
            self._prefix_failed(lease.prefix, now)

    def _prefix_failed(self, prefix: str, now: int) -> None:
        fails = self._prefix_backoff.get(prefix, (0, 0))[0] + 1
        self._prefix_backoff[prefix] = (fails, now + T.backoff_ms(fails, self.s.trust))

    def _pay(self, lease: LeaseRec, now: int) -> list:
        if lease.paid or lease.worker == self.s.own_key:
            # judged again after a reopened shard (paid once, counted once), or the
            # publisher's own audit (nobody to pay)
            lease.verdict = "valid"
            self._dirty.add(("lease", lease.lease_id))
            return []
        if lease.fresh:
            self._prefix_backoff.pop(lease.prefix, None)
        lease.verdict = "valid"
        lease.paid = True
        self.jobs[lease.job_id].paid += lease.credit
        self._dirty.update({("lease", lease.lease_id), ("job", lease.job_id)})
        self._set_trust(T.on_valid(self.trust_of(lease.worker), lease.credit, now))
        return [Pay(lease.lease_id, lease.job_id, lease.shard, lease.worker, lease.digest,
                    lease.credit, now)]

    def _evaluate(self, sh: ShardRec, now: int) -> list:
        job_rec = self.jobs[sh.job_id]
        job = job_rec.job
        leases = self.shard_leases(sh.job_id, sh.index)
        effects: list = []
        if sh.status == "accepted":
            accepted = self._vote(self.leases[sh.accepted_lease])
            audited = any(l.worker in self.s.trust.trusted and l.verdict == "valid"
                          for l in leases)
            for l in leases:
                if l.state == "returned" and not l.verdict:
                    effects += self._judge(l, accepted, now, audited)
            return effects
        if sh.status != "open":
            return effects
        votes = [self._vote(l) for l in leases if l.state == "returned"]
        need = sh.target or max(job.quorum, self.s.min_replicas)
        group = None
        if job_rec.status == "live":
            group = find_quorum(votes, need, trusted=sh.audit, shared_prefix=sh.relaxed("prefix"))
            if group is None and sh.fallback == "publisher":
                # Stalled, computed by the publisher itself: its own result decides.
                own = [v for v in votes if v.ok and v.worker == self.s.own_key]
                group = (own[0],) if own else None
        errors = self.errors(sh)
        if errors != sh.errors:
            sh.errors = errors
            self._dirty.add(("shard", (sh.job_id, sh.index)))
        if group is not None:
            winner = choose_output(group, votes)
            sh.status = "accepted"
            sh.accepted_lease = winner.lease_id
            self._dirty.add(("shard", (sh.job_id, sh.index)))
            effects.append(ShardAccepted(sh.job_id, sh.index, winner.lease_id, winner.digest))
            audited = any(v.standing == TRUSTED for v in group)
            for l in leases:
                if l.state == "returned" and not l.verdict:
                    effects += self._judge(l, winner, now, audited)
            effects += self._cancel([l for l in leases if l.state == "live"], "shard decided")
            return effects + self._maybe_done(sh.job_id)
        reason = ""
        if errors > job.max_error:
            reason = f"{errors} errors, more than max_error {job.max_error}"
        elif (sh.issued >= job.total_bound and self.open_replicas(sh) > 0
              and not any(l.state == "live" for l in leases)):
            reason = f"no quorum of {need} within max_total {job.total_bound} results"
        if reason:
            sh.status = "failed"
            sh.reason = reason
            self._dirty.add(("shard", (sh.job_id, sh.index)))
            effects.append(ShardFailed(sh.job_id, sh.index, reason))
            effects += self._cancel([l for l in leases if l.state == "live"], "shard failed")
            effects += self._maybe_done(sh.job_id)
        return effects

    def _judge(self, lease: LeaseRec, accepted: Vote, now: int, audited: bool = False) -> list:
        if is_valid(self._vote(lease), accepted):
            return self._pay(lease, now)
        lease.verdict = "invalid"
        self._dirty.add(("lease", lease.lease_id))
        self._set_trust(T.on_disagreement(self.trust_of(lease.worker), now))
        if audited and lease.ok and lease.worker not in self.s.trust.trusted:
            # The publisher's own machine computed this shard: a result that disagrees with
            # the accepted output is wrong, as a failed known answer is.
            return self._exclude(lease.worker, lease.job_id, "wrong_result", (lease.lease_id,),
                                 f"result for shard {lease.shard} disagrees with the "
                                 f"publisher's audit", now)
        return []

    def _maybe_done(self, job_id: bytes) -> list:
        rec = self.jobs[job_id]
        if rec.status != "live":
            return []
        self._refresh(job_id)
        if not self._undecided[job_id][0]:  # every shard accepted or failed
            rec.status = "done"
            self._forget_window(job_id)
            self._dirty.add(("job", job_id))
            return [JobDone(job_id)]
        return []

    def _exclude(self, worker: bytes, job_id: bytes, claim: str, lease_ids: tuple[bytes, ...],
                 note: str, now: int) -> list:
        t = self.trust_of(worker)
        if t.excluded:
            return []
        self._set_trust(T.on_excluded(t, claim))
        effects: list = [Excluded(worker, job_id, claim, lease_ids, note)]
        effects += self._cancel(self.live_leases(worker), "excluded")
        touched, reopen = set(), []
        for l in self.leases.values():
            if l.worker != worker or l.state != "returned":
                continue
            sh = self.shards[(l.job_id, l.shard)]
            if not l.verdict and sh.status == "open":
                l.ok = False
                l.verdict = "discarded"
                self._dirty.add(("lease", l.lease_id))
                touched.add((l.job_id, l.shard))
            elif (l.verdict == "valid" and sh.status == "accepted"
                  and self.jobs[l.job_id].status == "live"):
                reopen.append(l)
        for l in sorted(reopen, key=lambda l: (l.job_id, l.shard)):
            effects += self._reopen(self.shards[(l.job_id, l.shard)], l, claim)
        for key in sorted(touched | {(l.job_id, l.shard) for l in reopen}):
            effects += self._evaluate(self.shards[key], now)
        return effects

    def _reopen(self, sh: ShardRec, bad: LeaseRec, claim: str) -> list:
        """An excluded worker's valid result helped accept `sh` (a job still live): the
        acceptance is withdrawn and the shard decided again without it, audited by the
        publisher's machines where it has some. Its fellow voters are judged again (what
        was paid stays paid) so a colluder that agreed with it is found out in turn."""
        bad.ok = False
        bad.verdict = "discarded"
        self._dirty.add(("lease", bad.lease_id))
        sh.status, sh.accepted_lease, sh.reason = "open", None, ""
        sh.audit = sh.audit or bool(self.s.trust.trusted)  # the quorum must hold a trusted vote
        if sh.fallback == "publisher":  # open again: the stall check must see it (as restore())
            self._own_fallback.add((sh.job_id, sh.index))
        for l in self.shard_leases(sh.job_id, sh.index):
            if l.state == "returned" and l.ok and l.verdict in ("valid", "invalid"):
                l.verdict = ""
                self._dirty.add(("lease", l.lease_id))
        self._dirty.add(("shard", (sh.job_id, sh.index)))
        return [ShardReopened(sh.job_id, sh.index, bad.lease_id,
                              f"accepted with a result of a worker excluded for {claim}")]


# --- event log (one JSON line per event, for replay) -----------------------------------
def _plain(value: object) -> object:
    if isinstance(value, bytes):
        return {"hex": value.hex()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("non-finite numbers are not logged")
    return value


def event_json(ev: object) -> str:
    """One JSON line for an event: {"type": ..., fields; bytes as {"hex": ...}}."""
    return json.dumps({"type": type(ev).__name__, **_plain(ev)}, sort_keys=True)


_TYPES = {cls.__name__: cls for cls in EVENTS}


def _typed(value: object) -> object:
    if isinstance(value, dict) and set(value) == {"hex"}:
        return bytes.fromhex(value["hex"])
    if isinstance(value, list):
        return tuple(_typed(v) for v in value)
    return value


def event_from_json(line: str) -> object:
    """Inverse of event_json."""
    data = json.loads(line)
    cls = _TYPES[data.pop("type")]
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data and f.default is not dataclasses.MISSING:
            continue  # a field added since the log was written
        v = data[f.name]
        if f.name == "job":
            v = JobParams(**{k: _typed(x) for k, x in v.items()})
        kwargs[f.name] = _typed(v)
    return cls(**kwargs)


__all__ = [
    "Scheduler", "SchedulerSettings", "JobParams", "CoreUsageError", "PeerViolation",
    "JobAdded", "WorkRequested", "ResultArrived", "LeaseFailed", "HandedBack", "Tick",
    "JobCancelled", "JobForgotten", "Forgotten", "LeaseGrant", "Grant", "Refuse", "Pay", "CancelLeases", "Excluded",
    "ShardAccepted", "ShardReopened", "ShardStalled", "ShardFailed", "RELAX_ORDER", "JobDone", "WakeAt", "JobRec", "ShardRec", "LeaseRec",
    "prefix_of", "rank", "lease_deadline_ms", "grace_ms", "KeyedRandom", "event_json",
    "event_from_json", "UNKNOWN_PREFIX",
]
