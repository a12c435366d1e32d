"""The publisher engine: the scheduler (core/scheduler.py) driven on a real Mesh.

`Publisher.run()` is a trio service. It rebuilds the scheduler from the job store, answers
the `lease` protocol (one work_request -> one lease_batch or no_work) and the `report`
protocol (progress, hand_back, result, failed -> stored -> up to 64 pending receipts ->
clean close), authorises input fetches on the blob service with lease-bound tokens, pushes
cancels and receipts on `notice` when it can reach the worker, announces live jobs on the
jobs topic, publishes evidence, and ticks the scheduler so leases expire. A model or input
of a live job that its blob cache lost (a power loss zeroed the file, dropped at its first
serve) is stored again from the job store when a worker allowed to fetch it asks (`_recover`).

Order of persistence (specs/work-and-leases.md, section 10): each scheduler event runs
inside one store transaction with its input (the result envelope) and its consequences
(lease records, receipts, evidence); only after the commit is anything sent. A lease batch
is therefore on disk before the worker sees it, a result before it is acknowledged, a
receipt before it is delivered.

Violations: an envelope that does not open, a signer that is not the stream's remote peer,
a report about a lease not issued to it: reset and `mesh.penalize`. A well-formed result
that fails the publisher's own checks (digests, known answers) is stored, counted against
the worker's trust and acknowledged, so the worker stops resending it.

Replays (specs/identity-and-wire.md, section 10): the message ids of work requests and of
result / failed / hand_back reports go into the job store's replay store. A work request
seen before gets no answer (reset, no lease); a report seen before is acknowledged as the
first time and not taken again. Neither is penalised.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import trio
from packaging.version import InvalidVersion, Version

from ..core import eventlog
from ..core import scheduler as S
from ..core.ratelimit import TokenBuckets
from ..core.records import next_sequence
from ..exec.outputs import compare_outputs, decode_tensors
from ..exec.runner import ort_version_allowed
from ..identity import Identity, peer_id_from_key
from ..net import streams
from ..net.mesh import Mesh, MeshError
from ..store.jobs import JobStore
from ..wire.envelope import KEEP_UNTIL_MAX, MAX_CLOCK_SKEW_MS, open_envelope, seal
from ..wire.errors import Replay, WireError
from ..wire.kinds import (
    KINDS,
    Cancel,
    Evidence,
    FailedResult,
    HandBack,
    JobAnnouncement,
    Lease,
    LeaseBatch,
    NoWork,
    Progress,
    Receipt,
    ReceiptRequest,
    Requirements,
    Result,
)
from .audit import audit_loop
from .jobs import BuiltJob, JobSpec, JobSpecError, build_job, check_result_outputs, strip_known_answers

log = logging.getLogger(__name__)

REPORT_KINDS = {"progress", "hand_back", "result", "failed", "receipt_request"}
DEDUP_REPORT_KINDS = {"hand_back", "result", "failed"}  # progress changes nothing
REQUEST_CAP = KINDS["work_request"].max_body + streams.FRAME_OVERHEAD
REPORT_CAP = KINDS["result"].max_body + streams.FRAME_OVERHEAD
MAX_RECEIPTS_PER_ANSWER = 64
ANSWER_LIFETIME_MS = 60_000


class PublisherError(Exception):
    """A publisher operation cannot be done (unknown job, job not finished, ...)."""


@dataclass(frozen=True)
class PublisherSettings:
    scheduler: S.SchedulerSettings = field(default_factory=S.SchedulerSettings)
    announce_interval_s: float = 15.0
    announce_lifetime_ms: int = 10 * 60_000
    tick_interval_s: float = 1.0
    notice_timeout_s: float = 5.0
    receipt_retry_s: float = 30.0
    # receipt_request answers per worker: 6 a minute, bursts of 3 (an honest worker asks
    # about once a minute while receipts are missing)
    receipt_requests_per_minute: float = 6.0
    receipt_request_burst: int = 3
    read_timeout_s: float = 30.0
    output_fetch_timeout_s: float = 60.0
    max_output_bytes: int = 64 * 1024 * 1024
    event_log: Path | None = None     # one JSON line per scheduler event and its decisions
                                      # (specs/event-log.md; `p2pfleet sim replay`)
    self_audit: bool = True           # compute audited shards' reserved replicas itself
    forget_ended_after_s: float | None = 600.0  # let an ended job's records go from memory
                                      # (JobForgotten) this long after it ended; None: never.
                                      # A restart forgets every ended job at once.


@dataclass(frozen=True)
class JobStatus:
    job_id: bytes
    state: str                 # live | cancelled | done
    shards: int
    accepted: int
    failed: int
    leases: int                # replicas issued
    live: int
    rejected: int              # results found invalid or discarded
    workers: int
    evidence: int
    credit_paid: int
    budget: int | None
    waiting: str = ""          # why no progress is possible right now, if known
    self_computed: int = 0     # stalled shards the publisher computed itself (never paid)
    relaxed: int = 0           # stalled shards decided under relaxed replica rules


def _now_ms(clock: Callable[[], float]) -> int:  # noqa: D103
    return int(clock() * 1000)


def _open_log(path: Path):
    """Append to an event log readable by its owner only: it holds the job secrets and the
    scheduler's key (specs/event-log.md)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    return open(fd, "a", encoding="utf-8")  # noqa: SIM115


def _records_plain(records: tuple, forgotten: list[bytes]) -> dict | None:
    """The records a scheduler was restored from, for the log's header (None: empty)."""
    jobs, shards, leases, workers = (list(r) for r in records)
    if not (jobs or shards or leases or workers or forgotten):
        return None
    return {"jobs": [eventlog.plain(j) for j in jobs],
            "shards": [eventlog.plain(s) for s in shards],
            "leases": [eventlog.plain(l) for l in leases],
            "workers": [eventlog.plain(w) for w in workers],
            "forgotten": [j.hex() for j in forgotten]}


class _ByJob(dict):
    """Per-job data of the jobs the scheduler holds; a forgotten job's is read from the
    store on each use and not kept (its reads are rare: status, outputs)."""

    def __init__(self, load: Callable[[bytes], Any], items: dict):
        super().__init__(items)
        self._load = load

    def __missing__(self, job_id: bytes) -> Any:
        return self._load(job_id)


@dataclass(frozen=True)
class _Prepared:
    """A job sharded, encoded and hashed, not stored yet (`Publisher._prepare`)."""

    spec: JobSpec
    built: BuiltJob
    job_id: bytes
    secret: bytes
    model_digest: bytes
    shard_digests: tuple[bytes, ...]
    blobs: dict[bytes, bytes]  # digest -> bytes: model, known answers, shard inputs


def _one_blob_each(p: _Prepared) -> list[_Prepared]:
    return [replace(p, blobs={d: b}) for d, b in p.blobs.items()]


class Publisher:
    def __init__(self, identity: Identity, mesh: Mesh, store_path: Path | str, blobs: Any, *,
                 clock: Callable[[], float] = time.time, rng: Any = None,
                 settings: PublisherSettings | None = None):
        self.identity = identity
        self.mesh = mesh
        self.network = mesh.settings.network
        self.blobs = blobs
        self.clock = clock
        self.settings = settings or PublisherSettings()
        self.store = JobStore(store_path)
        self._token_key = self.store.secret("token-key")
        self._job_rng = rng or S.KeyedRandom(self.store.secret("publisher") + os.urandom(16))
        sched_settings = self.settings.scheduler
        if self.settings.self_audit:  # the publisher is one of its own trusted machines
            own = identity.public_key
            sched_settings = replace(sched_settings, own_key=own, trust=replace(
                sched_settings.trust, trusted=sched_settings.trust.trusted | {own}))
        # The scheduler draws from its own keyed stream, never shared with the job draws
        # (a shared one would interleave with submits, some in a worker thread, and no
        # replay could follow it). Its key is fresh per start and derived, so an event log,
        # which holds it, tells nothing of the store's secret (specs/event-log.md).
        seed = rng.randbytes(32) if rng is not None else os.urandom(32)
        key = hmac.new(self.store.secret("publisher"), b"scheduler key" + seed,
                       hashlib.sha256).digest()
        self.sched = S.Scheduler(sched_settings, rng=S.KeyedRandom(key))
        # Ended jobs stay in the store only (work-and-leases.md, section 8): their status and
        # outputs are read from it, and late messages about them are refused as Forgotten.
        records = self.store.load_records(ended=False)
        forgotten = self.store.ended_job_ids()
        self.sched.restore(*records, forgotten=forgotten)
        self._log_file = None
        if self.settings.event_log is not None:
            self._log_file = _open_log(self.settings.event_log)
            self._log_file.write(eventlog.header(
                "scheduler", sched_settings,
                rng={"key": key.hex(), "counter": self.sched.rng.getstate()[1]},
                restored=_records_plain(records, forgotten)) + "\n")
            self._log_file.flush()
        held = list(self.sched.jobs)
        self._meta: dict[bytes, dict] = _ByJob(
            self.store.job_meta, {jid: self.store.job_meta(jid) for jid in held})
        self._shards: dict[bytes, list[tuple[bytes, list[tuple[int, int]]]]] = _ByJob(
            self.store.shard_inputs, {jid: self.store.shard_inputs(jid) for jid in held})
        self._ended_ms: dict[bytes, int] = {}  # held jobs that ended: when (JobForgotten)
        self._views: OrderedDict[bytes, S.Scheduler] = OrderedDict()  # forgotten jobs' records
        self._done: dict[bytes, trio.Event] = {}
        self._changed: dict[bytes, trio.Event] = {}
        self._decoded: OrderedDict[bytes, dict] = OrderedDict()
        self._ka_cache: dict[bytes, dict] = {}
        self._seq: int | None = None
        self._announce_now = trio.Event()
        self._pending_proofs: dict[bytes, list[bytes]] = {}  # second results of one lease
        self._pushing: dict[bytes, trio.Lock] = {}
        self._last_ms = 0
        self._stopped = False
        self._nursery: trio.Nursery | None = None
        self.stats = {"requests": 0, "leases_sent": 0, "results": 0, "refused": 0, "replays": 0}
        self._reports_in_flight: set[bytes] = set()  # message ids being taken (bounded by streams)
        self._receipt_asks = TokenBuckets(self.settings.receipt_requests_per_minute,
                                          self.settings.receipt_request_burst)
        self._prev_authorize = getattr(blobs, "authorize", None) if blobs is not None else None
        if isinstance(getattr(self._prev_authorize, "__self__", None), Publisher):
            self._prev_authorize = None  # an earlier engine of this store, not another service
        self._recovering = trio.Lock()  # one blob stored again at a time (a rare repair)

    # --- public API --------------------------------------------------------------------
    def submit(self, spec: JobSpec) -> bytes:
        """Check, shard and store a job; returns its id. Announced once `run` is running.
        Blocks for the sharding and encoding: from a running trio loop use `submit_async`."""
        prepared = self._prepare(spec)
        self._store_blobs(prepared)
        self._provide_blobs(prepared)
        return self._add_prepared(prepared)

    async def submit_async(self, spec: JobSpec) -> bytes:
        """`submit` that leaves the event loop free to serve other jobs' leases and blobs:
        the known answers, sharding, encoding and hashing run in a worker thread, and the
        store and cache take the shard blobs one at a time (SQLite stays on this thread).
        The cache's copy of a blob (a file write and a hash check) is made in another worker
        thread while the store takes the next blob: one after the other, the two copies were
        most of a submit's time before the job could be announced (the cache is thread-safe)."""
        prepared = await trio.to_thread.run_sync(self._prepare, spec)
        failed: list[BaseException] = []
        send, receive = trio.open_memory_channel[_Prepared](2)

        async def provide_all() -> None:
            async with receive:
                async for one in receive:
                    if not failed:  # after a failure, drain: the job is not added
                        try:
                            await trio.to_thread.run_sync(self._provide_blobs, one)
                        except Exception as exc:  # noqa: BLE001 - raised below, unwrapped
                            failed.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(provide_all)
            async with send:
                for one in _one_blob_each(prepared):
                    if failed:
                        break
                    self._store_blobs(one)
                    await send.send(one)  # also lets other streams run between two blobs
        if failed:
            raise failed[0]
        return self._add_prepared(prepared)

    def _prepare(self, spec: JobSpec) -> _Prepared:
        """The CPU-heavy part of a submit; touches no store (runs in a worker thread)."""
        built = build_job(spec, self._job_rng)
        model_digest = hashlib.sha256(spec.model).digest()
        blobs = {model_digest: bytes(spec.model),
                 hashlib.sha256(built.ka_expected).digest(): built.ka_expected}
        digests = []
        for blob in built.shard_blobs:
            d = hashlib.sha256(blob).digest()
            blobs[d] = blob
            digests.append(d)
        return _Prepared(spec, built, self._job_rng.randbytes(16), self._job_rng.randbytes(32),
                         model_digest, tuple(digests), blobs)

    def _store_blobs(self, p: _Prepared) -> None:
        # content-addressed: a blob stored before a crash and never used is only space
        with self.store.transaction():
            for digest, blob in p.blobs.items():
                self.store.put_blob(digest, blob)

    def _provide_blobs(self, p: _Prepared) -> None:
        """Pin the model (public) and the shard inputs (private) in the blob cache."""
        if self.blobs is None:
            return
        for digest, blob in p.blobs.items():
            if digest == p.model_digest:
                self.blobs.cache.put(digest, blob, public=True, pinned=True)
            elif digest in p.shard_digests and not self.blobs.cache.has(digest):
                self.blobs.cache.put(digest, blob, public=False, pinned=True)

    def _add_prepared(self, p: _Prepared) -> bytes:
        spec, built, job_id, secret = p.spec, p.built, p.job_id, p.secret
        req = spec.requirements
        ort_versions = spec.ort_versions or req.ort_versions
        params = S.JobParams(job_id, secret, built.samples, built.credit, built.known_answer,
                             tuple(len(b) for b in built.shard_blobs), quorum=spec.quorum,
                             max_error=spec.max_error, max_total=spec.max_total,
                             recheck_rate=spec.recheck_rate, budget=spec.budget,
                             audit_rate=spec.audit_rate)
        ka_digest = hashlib.sha256(built.ka_expected).digest()
        meta = {
            "model_digest": p.model_digest.hex(), "model_size": len(spec.model),
            "micro_batch": spec.micro_batch, "opt_level": spec.opt_level,
            "provider": spec.provider, "ort_versions": ort_versions,
            "requirements": [req.min_memory_mb, list(req.providers), req.min_sw_version,
                             ort_versions],
            "credit_rate": spec.credit_rate, "quorum": spec.quorum,
            "output_names": list(built.output_names), "ka_digest": ka_digest.hex(),
            "real_rows": [list(r) for r in built.real_rows],
        }
        shards = list(zip(p.shard_digests, built.shard_ka))
        now = self._now()
        with self.store.transaction():
            self.store.add_job(params, meta, now, shards)
            self._apply(self._handle(S.JobAdded(now, params)))
        self._meta[job_id] = meta
        self._shards[job_id] = shards
        if self._nursery is not None:
            self._nursery.start_soon(self._provide_model, job_id)
        self._announce_now.set()
        return job_id

    def resume(self, job_id: bytes) -> None:
        """Make sure a stored job is served (jobs in the store are resumed by `run` anyway)."""
        if not self._known(job_id):
            raise PublisherError(f"no job {job_id.hex()} in {self.store.path}")
        self._provide(job_id)
        self._announce_now.set()

    def cancel(self, job_id: bytes) -> None:
        """Cancel a live job (an ended one stays as it ended)."""
        self._require(job_id)
        if job_id in self.sched.jobs:  # (a forgotten job has ended: nothing to do)
            self._run_event(S.JobCancelled(self._now(), job_id))
            self._ended_ms.setdefault(job_id, self._now())
            self._done_event(job_id).set()

    def status(self, job_id: bytes) -> JobStatus:
        self._require(job_id)
        sched = self._holder(job_id)
        rec = sched.jobs[job_id]
        c = sched.job_counts(job_id)
        waiting = ""
        if rec.status == "live" and c["exhausted"]:
            waiting = (f"{c['exhausted']} shard(s) wait for an established or trusted worker "
                       f"(the publisher does not compute; nothing left to relax)")
        elif rec.status == "live" and c["stalled"]:
            waiting = (f"{c['stalled']} shard(s) no asking worker may take: resolved after "
                       f"{sched.s.stall_wait_ms / 1000:g} s")
        elif rec.status == "live" and c["live"] == 0 and c["accepted"] + c["failed"] < c["shards"]:
            if rec.job.budget is not None and rec.paid >= rec.job.budget:
                waiting = "credit budget spent"
            else:
                waiting = "no eligible worker has asked for the open shards"
        return JobStatus(job_id, rec.status, c["shards"], c["accepted"], c["failed"], c["leases"],
                         c["live"], c["invalid"], c["workers"], len(self.store.evidence(job_id)),
                         rec.paid, rec.job.budget, waiting, c["self_computed"], c["relaxed"])

    def shard_records(self, job_id: bytes) -> list[S.ShardRec]:
        """The job's shard records, in order (read only: the scheduler's own, or the
        store's for a forgotten job)."""
        self._require(job_id)
        sched = self._holder(job_id)
        return [sched.shards[(job_id, i)] for i in range(len(sched.jobs[job_id].job.samples))]

    def shard_outputs(self, job_id: bytes):
        """Yield (shard, outputs) of accepted shards, known-answer rows removed, in order."""
        records = self.shard_records(job_id)
        for i, (_digest, ka) in enumerate(self._shards[job_id]):
            sh = records[i]
            if sh.status != "accepted":
                continue
            stored = self.store.result(sh.accepted_lease)
            if stored is None or stored[1] is None:
                raise PublisherError(f"job {job_id.hex()} shard {i}: accepted output missing from the store")
            yield i, strip_known_answers(decode_tensors(stored[1]), ka)

    def outputs(self, job_id: bytes) -> dict[str, np.ndarray]:
        """The whole job's outputs, in sample order; PublisherError unless every shard is accepted."""
        st = self.status(job_id)
        if st.accepted != st.shards:
            raise PublisherError(f"job {job_id.hex()}: {st.accepted} of {st.shards} shards accepted "
                                 f"({st.failed} failed); use shard_outputs() for partial results")
        parts = [outs for _i, outs in self.shard_outputs(job_id)]
        return {n: np.concatenate([p[n] for p in parts], axis=0) for n in parts[0]}

    async def wait_done(self, job_id: bytes) -> JobStatus:
        self._require(job_id)
        if job_id in self.sched.jobs and self.sched.jobs[job_id].status == "live":
            await self._done_event(job_id).wait()
        return self.status(job_id)

    def close(self) -> None:
        self._stopped = True
        self.store.close()
        if self._log_file:
            self._log_file.close()

    # --- the service -------------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self._stopped = False
        self.mesh.set_handler("lease", self._on_lease_stream)
        self.mesh.set_handler("report", self._on_report_stream)
        if self.blobs is not None:
            self.blobs.authorize = self._authorize
            self.blobs.recover = self._recover
        for job_id in self._meta:
            self._provide(job_id)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._tick_loop)
                nursery.start_soon(self._announce_loop)
                nursery.start_soon(self._receipt_loop)
                if self.settings.self_audit:
                    nursery.start_soon(audit_loop, self, self.settings.tick_interval_s)
                for job_id, rec in self.sched.jobs.items():
                    if rec.status == "live":
                        nursery.start_soon(self._provide_model, job_id)
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            # Stopped (the mesh may live on): refuse work politely instead of failing on a
            # closed store, which would count against innocent workers.
            self._nursery = None
            self._stopped = True
            self.mesh.set_handler("lease", _not_serving)
            self.mesh.set_handler("report", _not_serving)
            if self.blobs is not None and self.blobs.authorize == self._authorize:
                self.blobs.authorize = self._prev_authorize
            if self.blobs is not None and getattr(self.blobs, "recover", None) == self._recover:
                self.blobs.recover = None

    # --- internals: scheduler plumbing -------------------------------------------------
    def _now(self) -> int:
        """Wall-clock ms (leases outlive restarts), never going back: a clock stepped back
        by NTP must not look like time running backwards to the scheduler."""
        self._last_ms = max(self._last_ms, _now_ms(self.clock))
        return self._last_ms

    def _known(self, job_id: bytes) -> bool:
        return job_id in self.sched.jobs or job_id in self.sched.forgotten

    def _require(self, job_id: bytes) -> None:
        if not self._known(job_id):
            raise PublisherError(f"no job {job_id.hex()}")

    def _holder(self, job_id: bytes) -> S.Scheduler:
        """The scheduler holding the job's records: ours, or for a forgotten job one
        restored from the store with that job alone (kept for the last few asked)."""
        if job_id in self.sched.jobs:
            return self.sched
        view = self._views.pop(job_id, None)
        if view is None:
            view = S.Scheduler(self.sched.s, rng=S.KeyedRandom(bytes(32)))
            view.restore(*self.store.load_records(job_id=job_id))
        self._views[job_id] = view
        while len(self._views) > 4:
            self._views.popitem(last=False)
        return view

    def _forget_ended(self) -> None:
        """Let jobs that ended `forget_ended_after_s` ago go from memory (JobForgotten):
        their records stay in the store, whatever was decided stands."""
        after = self.settings.forget_ended_after_s
        if after is None:
            return
        now = self._now()
        for job_id, ended in list(self._ended_ms.items()):
            if now - ended < after * 1000:
                continue
            del self._ended_ms[job_id]
            self._run_event(S.JobForgotten(now, job_id))
            for kept in (self._meta, self._shards, self._ka_cache, self._done):
                kept.pop(job_id, None)
            waiter = self._changed.pop(job_id, None)
            if waiter is not None:
                waiter.set()
            log.info("job %s ended and is forgotten: its records stay in %s",
                     job_id.hex()[:8], self.store.path)

    def _done_event(self, job_id: bytes) -> trio.Event:
        return self._done.setdefault(job_id, trio.Event())

    def _handle(self, ev: object) -> list:
        """The scheduler's decisions for `ev`, logged with it when an event log is on."""
        effects = self.sched.handle(ev)
        if self._log_file is not None:
            self._log_file.write(eventlog.record(ev, effects) + "\n")
            self._log_file.flush()
        return effects

    def _run_event(self, ev: object) -> list:
        with self.store.transaction():
            effects = self._handle(ev)
            self._apply(effects)
        self._after(effects)
        return effects

    def _apply(self, effects: list) -> None:
        """Inside the transaction: persist records, seal and store receipts and evidence."""
        now = self._now()
        for e in effects:
            if isinstance(e, S.Pay):
                rc = Receipt(e.lease_id, e.job_id, e.shard, e.worker, e.digest, e.credit, now)
                self.store.add_receipt(e.lease_id, e.worker, seal(rc, self.identity, self.network))
            elif isinstance(e, S.Excluded):
                self.store.add_evidence(e.worker, e.job_id, e.claim, self._evidence(e, now), now)
        self.store.save_records(*self.sched.take_changes())

    def changed(self, job_id: bytes) -> trio.Event:
        """Set at the next change of the job's shards (accepted, failed, reopened, done);
        already set for a forgotten job (it changes no more, and is not kept waiting for)."""
        if job_id not in self.sched.jobs:
            ended = trio.Event()
            ended.set()
            return ended
        return self._changed.setdefault(job_id, trio.Event())

    def _after(self, effects: list) -> None:
        """After the commit: send, publish, wake waiters."""
        for e in effects:
            if isinstance(e, (S.ShardAccepted, S.ShardFailed, S.ShardReopened, S.JobDone)):
                waiter = self._changed.pop(e.job_id, None)
                if waiter is not None:
                    waiter.set()
            if isinstance(e, S.CancelLeases) and self._nursery is not None:
                body = Cancel(e.job_id, self._now() + 24 * 3600_000, e.lease_ids, e.reason)
                self._nursery.start_soon(self._notice, e.worker, seal(body, self.identity, self.network))
            elif isinstance(e, S.Pay) and self._nursery is not None:
                self._nursery.start_soon(self._push_receipts, e.worker)
            elif isinstance(e, S.Excluded) and self._nursery is not None:
                self._nursery.start_soon(self._publish_evidence, e.worker, e.job_id)
            elif isinstance(e, S.JobDone):
                self._ended_ms.setdefault(e.job_id, self._now())
                self._done_event(e.job_id).set()
            elif isinstance(e, S.ShardStalled):
                log.warning("job %s shard %d stalled: %s", e.job_id.hex()[:8], e.shard, e.note)
            elif isinstance(e, S.ShardReopened):
                log.warning("job %s shard %d reopened: %s", e.job_id.hex()[:8], e.shard, e.reason)
                self._announce_now.set()

    def _evidence(self, e: S.Excluded, now: int) -> bytes:
        proofs = []
        for lease_id in e.lease_ids:
            stored = self.store.result(lease_id)
            if stored:
                proofs.append(stored[0])
        proofs += self._pending_proofs.pop(e.worker, [])
        expected = None
        if e.claim == "failed_known_answer":
            expected = bytes.fromhex(self._meta[e.job_id]["ka_digest"])
        body = Evidence(e.worker, e.job_id, e.claim, tuple(proofs[:4]) or (b"\x00",), expected,
                        now, e.note[:256])
        return seal(body, self.identity, self.network)

    async def _tick_loop(self) -> None:
        while True:
            await trio.sleep(self.settings.tick_interval_s)
            self._run_event(S.Tick(self._now()))
            self.store.forget_seen(self._now())
            self._forget_ended()

    # --- announcements -----------------------------------------------------------------
    def _addrs(self) -> tuple[str, ...]:
        me = self.mesh.identity.peer_id
        out = []
        for a in self.mesh.listen_addrs():
            out.append(a if "/p2p/" in a else f"{a}/p2p/{me}")
        return tuple(out[:8])

    def announcement(self, job_id: bytes) -> bytes:
        meta = self._meta[job_id]
        c = self.sched.job_counts(job_id)
        now = self._now()
        self._seq = next_sequence(self._seq, now)
        m, p, v, o = meta["requirements"]
        body = JobAnnouncement(
            seq=self._seq, exp=now + self.settings.announce_lifetime_ms, job_id=job_id,
            model_digest=bytes.fromhex(meta["model_digest"]), model_size=meta["model_size"],
            requirements=Requirements(m, tuple(p), v, o), credit_rate=meta["credit_rate"],
            # the agreeing results a shard needs: untrusted work is replicated even at
            # quorum 1 (the scheduler's min_replicas); single copies are secret draws
            quorum=max(meta["quorum"], self.settings.scheduler.min_replicas),
            shards_total=c["shards"],
            shards_left=c["shards"] - c["accepted"] - c["failed"], addrs=self._addrs())
        return seal(body, self.identity, self.network)

    def announce_wait_s(self) -> float:
        """How long a job submitted now would wait for room in this publisher's
        announcement budget (0: it would be announced at once)."""
        validator = getattr(self.mesh, "job_validator", None)
        if validator is None:
            return 0.0
        return validator.rate.wait_s(self.identity.public_key, validator.clock())

    async def _announce_loop(self) -> None:
        """Announce each live job every max(interval, 5 s x live jobs), within the jobs
        topic's budget of a publisher (12 a minute, bursts of 6: core/ratelimit.py, the
        same bucket the mesh checks before publishing). A job not announced yet goes first
        and may take the last token; repeats leave half the burst (3), so a few jobs
        submitted in a row are each heard at once. An ended job is not announced again: the
        budget goes to new jobs, and a worker asking for it is refused once and backs off
        from that job only (core/worker.py)."""
        announced: dict[bytes, float] = {}  # job id -> trio time of its last announcement
        validator = getattr(self.mesh, "job_validator", None)
        me = self.identity.public_key
        urgent = False  # woken by a change (a shard reopened, a job resumed): repeat all now
        # repeats leave half the burst for jobs not announced yet
        reserve = validator.rate.burst // 2 if validator is not None else 0
        while True:
            self._announce_now = trio.Event()
            now = trio.current_time()
            live = [j for j, r in self.sched.jobs.items() if r.status == "live"]
            period = max(self.settings.announce_interval_s, 5.0 * len(live))
            wake = period
            for job_id in sorted(live, key=lambda j: announced.get(j, -math.inf)):
                new = job_id not in announced
                if not new and not urgent and now - announced[job_id] < period:
                    wake = min(wake, announced[job_id] + period - now)
                    continue
                if validator is not None:
                    need = 1.0 if new else 1.0 + reserve
                    tokens = validator.rate.available(me, validator.clock())
                    if tokens < need:
                        wake = min(wake, (need - tokens) / validator.rate.rate)
                        continue
                try:
                    await self.mesh.announce_job(self.announcement(job_id))
                    announced[job_id] = now
                except MeshError as exc:
                    log.info("announcing job %s: %s", job_id.hex()[:8], exc)
                    wake = min(wake, 1.0)
            for job_id in [j for j in announced if j not in live]:
                del announced[job_id]  # ended: its record expires (workers ask once, refused)
            with trio.move_on_after(max(0.05, wake)):
                await self._announce_now.wait()
            urgent = self._announce_now.is_set()

    # --- blobs -------------------------------------------------------------------------
    def _provide(self, job_id: bytes) -> None:
        """Put a job's model and, while it is live, its inputs in the blob cache. An input
        held is not stored again (each start would hash and rewrite every shard's input):
        if a power loss damaged its file, the cache drops it at its first serve and
        `_recover` stores it then."""
        if self.blobs is None:
            return
        meta = self._meta[job_id]
        model_digest = bytes.fromhex(meta["model_digest"])
        self.blobs.cache.put(model_digest, self.store.get_blob(model_digest), public=True, pinned=True)
        rec = self.sched.jobs.get(job_id)  # None: forgotten, so ended
        if rec is None or rec.status != "live":
            return
        for digest, _ka in self._shards[job_id]:
            if not self.blobs.cache.has(digest):
                self.blobs.cache.put(digest, self.store.get_blob(digest), public=False, pinned=True)

    async def _recover(self, peer: str, digest: bytes, token: bytes | None) -> bool:
        """The blob service's `recover` hook: a request found `digest` lost from the cache
        (not held, or dropped as damaged when about to be served). The model of a live job
        (public) or an input asked for with its live lease's token (the `_authorize` rule,
        without the hooks it chains to) is stored again from the job store; anything else
        is not, so a stranger cannot make the publisher read and write its inputs. True if
        the cache holds the blob now."""
        live = [j for j, rec in self.sched.jobs.items() if rec.status == "live"]
        public = any(self._meta[j]["model_digest"] == digest.hex() for j in live)
        if not public and not self._lease_allows(peer, digest, token):
            return False
        async with self._recovering:
            if self.blobs.cache.has(digest):  # stored again by the request before this one
                return True
            data = self.store.get_blob(digest)
            if data is None:
                return False
            # hashed and written in a thread; the store stays on this one
            await trio.to_thread.run_sync(
                lambda: self.blobs.cache.put(digest, data, public=public, pinned=True))
        log.warning("blob %s was lost from the cache (damaged or removed on disk): stored "
                    "again from the job store", digest.hex()[:16])
        return True

    async def _provide_model(self, job_id: bytes) -> None:
        """Announce the model in the DHT, so workers may fetch it from each other."""
        if self.blobs is None or not hasattr(self.blobs, "provide"):
            return
        try:
            await self.blobs.provide(bytes.fromhex(self._meta[job_id]["model_digest"]))
        except Exception as exc:  # noqa: BLE001 - best effort: the publisher serves it anyway
            log.info("announcing the model of job %s as provided: %s", job_id.hex()[:8], exc)

    def token(self, lease: S.LeaseRec, input_digest: bytes) -> bytes:
        """lease id || HMAC(lease id, worker, input digest, expiry)[:16]: 128 bits of MAC."""
        mac = hmac.new(self._token_key, lease.lease_id + lease.worker + input_digest +
                       lease.expires_ms.to_bytes(8, "big"), hashlib.sha256).digest()
        return lease.lease_id + mac[:16]

    def _authorize(self, peer: str, digest: bytes, token: bytes | None) -> bool:
        if self._lease_allows(peer, digest, token):
            return True
        if self._prev_authorize is not None:
            return bool(self._prev_authorize(peer, digest, token))
        return False

    def _lease_allows(self, peer: str, digest: bytes, token: bytes | None) -> bool:
        """`token` is that of a live lease of ours, held by `peer`, whose input is `digest`."""
        if token is None or len(token) != 32:
            return False
        lease = self.sched.leases.get(token[:16])
        if lease is None or lease.state != "live":
            return False
        input_digest = self._shards[lease.job_id][lease.shard][0]
        return (digest == input_digest and peer_id_from_key(lease.worker) == peer and
                hmac.compare_digest(token, self.token(lease, input_digest)) and
                self._now() < lease.expires_ms)

    # --- the lease protocol ------------------------------------------------------------
    async def _on_lease_stream(self, stream: Any) -> None:
        await self._guarded(self._lease_exchange, stream)

    async def _on_report_stream(self, stream: Any) -> None:
        await self._guarded(self._report_exchange, stream)

    async def _guarded(self, exchange: Callable, stream: Any) -> None:
        """Our own failures (a bug, a store closed under us) reset the stream without
        blaming the peer: the mesh's guard would count an escaped exception against it."""
        if self._stopped:
            await streams.reset_quietly(stream)
            return
        try:
            await exchange(stream)
        except trio.Cancelled:
            raise
        except Exception:  # noqa: BLE001
            log.exception("publisher: %s exchange failed on our side", exchange.__name__)
            await streams.reset_quietly(stream)

    async def _lease_exchange(self, stream: Any) -> None:
        peer = streams.remote_peer(stream)
        try:
            raw = await streams.read_envelope(stream, REQUEST_CAP, self.settings.read_timeout_s)
            opened = open_envelope(raw, self.network, now_ms=self._now(),
                                   kinds={"work_request"})
        except (streams.StreamError, WireError) as exc:
            await self._violation(stream, peer, exc, "work request")
            return
        if peer_id_from_key(opened.signer) != str(peer):
            self.mesh.penalize(peer, "invalid-message", "work request signed by another peer")
            await streams.reset_quietly(stream)
            return
        # Remembered only now, from its signer: a copy relayed by another peer first must
        # not make the genuine request a replay. An honest worker draws a fresh req_id for
        # every request, so a replay gets no answer at all (and no penalty).
        if not self.store.remember(opened.msg_id, _keep_until(opened), self._now()):
            log.info("work request from %s refused: %s", peer, Replay(
                "envelope", f"work_request {opened.msg_id.hex()[:16]} was seen before"))
            self.stats["replays"] += 1
            await streams.reset_quietly(stream)
            return
        self.stats["requests"] += 1
        req = opened.body
        now = self._now()
        prefix = S.prefix_of(streams.remote_ip(stream), self.settings.scheduler.prefix_v4,
                             self.settings.scheduler.prefix_v6)
        if _relayed(stream):
            prefix = S.UNKNOWN_PREFIX
        jobs = tuple(j for j, rec in self.sched.jobs.items() if rec.status == "live"
                     and (req.job_id is None or req.job_id == j) and self._meets(j, req))
        ev = S.WorkRequested(now, opened.signer, prefix, req.hw_class, req.bench,
                             req.free_slots, jobs)
        effects = self._run_event(ev)
        answer: bytes
        exp = now + ANSWER_LIFETIME_MS
        grant = next((e for e in effects if isinstance(e, S.Grant)), None)
        if grant is not None:
            leases = tuple(self._lease(g, opened.signer) for g in grant.leases)
            self.mesh.mark_useful(peer)  # a leaseholder is never pruned for a flood's room
            answer = seal(LeaseBatch(req.req_id, exp, opened.signer, leases), self.identity, self.network)
            self.stats["leases_sent"] += len(leases)
        else:
            refuse = next(e for e in effects if isinstance(e, S.Refuse))
            self.stats["refused"] += 1
            answer = seal(NoWork(req.req_id, exp, refuse.reason,
                                 min(refuse.retry_after_ms, 2**32 - 1)), self.identity, self.network)
        try:
            await streams.write_envelope(stream, answer)
        except (trio.TooSlowError, Exception) as exc:  # noqa: BLE001 - the worker went away
            log.info("answering %s: %s (its leases expire and are reissued)", peer, exc)
            await streams.reset_quietly(stream)
            return
        await streams.close_quietly(stream)

    def _meets(self, job_id: bytes, req: Any) -> bool:
        meta = self._meta[job_id]
        min_mem, providers, min_sw, ort_versions = meta["requirements"]
        if req.memory_mb < min_mem:
            return False
        need = set(providers) or {meta["provider"]}  # any one of them (as the worker reads it)
        offered = set(req.providers) or {"CPUExecutionProvider"}
        if not need & offered:
            return False
        try:
            if Version(req.sw_version) < Version(min_sw):
                return False
        except InvalidVersion:
            return False
        return ort_version_allowed(ort_versions, req.ort_version)

    def _lease(self, g: S.LeaseGrant, worker: bytes) -> Lease:
        meta = self._meta[g.job_id]
        rec = self.sched.leases[g.lease_id]
        input_digest, _ka = self._shards[g.job_id][g.shard]
        return Lease(
            lease_id=g.lease_id, job_id=g.job_id, shard=g.shard,
            model_digest=bytes.fromhex(meta["model_digest"]), model_size=meta["model_size"],
            input_digest=input_digest, input_size=self.sched.jobs[g.job_id].job.input_size[g.shard],
            input_sources=(), token=self.token(rec, input_digest), deadline_ms=g.deadline_ms,
            micro_batch=meta["micro_batch"], opt_level=meta["opt_level"], provider=meta["provider"],
            ort_versions=meta["ort_versions"], samples=self.sched.jobs[g.job_id].job.samples[g.shard],
            first_batch=g.first_batch, credit=g.credit)

    # --- the report protocol -----------------------------------------------------------
    async def _report_exchange(self, stream: Any) -> None:
        peer = streams.remote_peer(stream)
        try:
            raw = await streams.read_envelope(stream, REPORT_CAP, self.settings.read_timeout_s)
            opened = open_envelope(raw, self.network, now_ms=self._now(), kinds=REPORT_KINDS)
        except (streams.StreamError, WireError) as exc:
            await self._violation(stream, peer, exc, "report")
            return
        if peer_id_from_key(opened.signer) != str(peer):
            self.mesh.penalize(peer, "invalid-message", f"{opened.kind} signed by another peer")
            await streams.reset_quietly(stream)
            return
        if isinstance(opened.body, ReceiptRequest):
            await self._answer_receipt_request(stream, opened)
            return
        # Reports that change state are remembered once taken (not before: a report not
        # taken, e.g. its outputs blob unreachable, must be taken when resent). A replay is
        # answered as the first time (a clean close, pending receipts), never run again.
        dedup = opened.kind in DEDUP_REPORT_KINDS
        if dedup and self.store.seen(opened.msg_id):
            log.info("%s from %s acknowledged again, not taken again: %s", opened.kind, peer,
                     Replay("envelope", f"{opened.kind} {opened.msg_id.hex()[:16]} was seen before"))
            self.stats["replays"] += 1
        elif opened.msg_id in self._reports_in_flight:
            await streams.reset_quietly(stream)  # a copy is being taken: the worker retries
            return
        else:
            self._reports_in_flight.add(opened.msg_id)
            try:
                await self._report(opened, raw, str(peer))
            except S.PeerViolation as exc:
                self.mesh.penalize(peer, exc.penalty, f"{opened.kind}: {exc.why}")
                await streams.reset_quietly(stream)
                return
            except S.Forgotten as exc:  # late, maybe honest: acknowledged, nothing paid
                log.info("%s from %s: %s", opened.kind, peer, exc)
            except _Unavailable as exc:  # not the worker's fault: it retries later
                log.info("report from %s not taken: %s", peer, exc)
                await streams.reset_quietly(stream)
                return
            finally:
                self._reports_in_flight.discard(opened.msg_id)
            if dedup:
                self.store.remember(opened.msg_id, _keep_until(opened), self._now())
        pending = self.store.pending_receipts(opened.signer, MAX_RECEIPTS_PER_ANSWER)
        await self._send_receipts(stream, pending)

    async def _answer_receipt_request(self, stream: Any, opened: Any) -> None:
        """A worker asks for its receipts (it may never be reachable for a `notice` push):
        those of the leases it names that pay it, or its undelivered ones; at most 64, and
        at most `receipt_requests_per_minute` answers per worker (over it: reset, no
        penalty: a restarted honest worker may ask again at once)."""
        if not self._receipt_asks.allow(opened.signer, self._now() / 1000):
            log.info("receipt request from %s refused: over %s a minute",
                     peer_id_from_key(opened.signer), self.settings.receipt_requests_per_minute)
            await streams.reset_quietly(stream)
            return
        ids = list(opened.body.lease_ids)
        found = (self.store.receipts_for(opened.signer, ids) if ids else
                 self.store.pending_receipts(opened.signer, MAX_RECEIPTS_PER_ANSWER))
        await self._send_receipts(stream, found[:MAX_RECEIPTS_PER_ANSWER])

    async def _send_receipts(self, stream: Any, receipts: list[tuple[bytes, bytes]]) -> None:
        """Write `receipts` and close; they are delivered once the close went through."""
        try:
            for _lease_id, env in receipts:
                await streams.write_envelope(stream, env)
        except (trio.TooSlowError, Exception):  # noqa: BLE001 - worker gone: receipts stay pending
            await streams.reset_quietly(stream)
            return
        await streams.close_quietly(stream)
        if receipts:
            with self.store.transaction():
                self.store.mark_delivered([lid for lid, _ in receipts])

    async def _report(self, opened: Any, raw: bytes, peer: str) -> None:
        body = opened.body
        now = self._now()
        worker = opened.signer
        job_id = self._job_of(body.lease_id, worker)
        if isinstance(body, Progress):  # raises for a stranger's lease
            self.sched.lease_of(body.lease_id, worker, "progress", job_id)
            return
        if isinstance(body, HandBack):
            self._run_event(S.HandedBack(now, body.lease_id, worker, job_id))
            return
        if isinstance(body, FailedResult):
            self._run_event(S.LeaseFailed(now, body.lease_id, worker, body.reason, job_id))
            return
        assert isinstance(body, Result)
        lease = self.sched.lease_of(body.lease_id, worker, "result", job_id)
        stored = self.store.result(body.lease_id)
        if stored is not None and stored[0] == raw:
            return  # the same envelope again: acknowledge again
        if stored is not None and lease.digest == body.output_digest:
            return  # a re-signed copy of the same result
        if stored is not None:
            # a second, different result for one lease: its two envelopes prove it
            self._pending_proofs.setdefault(worker, []).append(raw)
            self._run_event(S.ResultArrived(now, body.lease_id, worker, body.output_digest))
            return
        meta = self._meta[lease.job_id]
        input_digest = self._shards[lease.job_id][lease.shard][0]
        why = ""
        if (body.job_id, body.shard, body.model_digest, body.input_digest) != (
                lease.job_id, lease.shard, bytes.fromhex(meta["model_digest"]), input_digest):
            why = "job, shard, model or input digest is not the lease's"
        elif not ort_version_allowed(meta["ort_versions"], body.ort_version):
            why = f"onnxruntime {body.ort_version} is outside {meta['ort_versions']!r}"
        output = body.output
        if not why and output is None:
            output = await self._fetch_output(body, peer, worker)
            # its job may have been forgotten meanwhile: Forgotten then (acknowledged, unpaid)
            lease = self.sched.lease_of(body.lease_id, worker, "result", lease.job_id)
        self._take_result(lease, body, raw, output, why, peer)

    def _job_of(self, lease_id: bytes, worker: bytes) -> bytes:
        """The job of a lease `worker` holds: from memory, or for a forgotten job's lease
        from the store (b"": no lease of that worker), so a late message about it is
        refused as Forgotten and not taken for a lease never issued."""
        lease = self.sched.leases.get(lease_id)
        if lease is not None:
            return lease.job_id
        return self.store.lease_job(lease_id, worker) or b""

    def take_own_result(self, g: S.LeaseGrant, blob: bytes, batch_digests: tuple[bytes, ...]
                        ) -> None:
        """Take the publisher's own result for an audit lease (publisher/audit.py) through
        the checks any worker's result goes through; the signed envelope is stored as any."""
        import onnxruntime as ort

        lease = self.sched.leases[g.lease_id]
        meta = self._meta[g.job_id]
        body = Result(
            lease_id=g.lease_id, exp=self._now() + 7 * 24 * 3600_000, job_id=g.job_id,
            shard=g.shard, model_digest=bytes.fromhex(meta["model_digest"]),
            input_digest=self._shards[g.job_id][g.shard][0],
            output_digest=hashlib.sha256(blob).digest(), output_size=len(blob),
            batch_digests=batch_digests, hw_class=lease.hw_class, ort_version=ort.__version__,
            elapsed_ms=0, energy_mwh=0, output=None)
        self._take_result(lease, body, seal(body, self.identity, self.network), blob, "", "self")

    def _take_result(self, lease: S.LeaseRec, body: Result, raw: bytes, output: bytes | None,
                     why: str, peer: str) -> None:
        """Check a result's outputs, compare them with the shard's other results, store it
        and hand the outcome to the scheduler, in one transaction."""
        now = self._now()
        self.stats["results"] += 1
        worker = lease.worker
        meta = self._meta[lease.job_id]
        ka = self._shards[lease.job_id][lease.shard][1]
        samples = self.sched.jobs[lease.job_id].job.samples[lease.shard]
        check = None
        if not why:
            check = check_result_outputs(
                output, digest=body.output_digest, size=body.output_size, samples=samples,
                micro_batch=meta["micro_batch"], batch_digests=tuple(body.batch_digests),
                output_names=tuple(meta["output_names"]), ka=ka,
                ka_expected=self._ka_expected(lease.job_id))
            why = check.why if not check.form_ok else ""
        form_ok = not why
        ka_ok = check.known_answer_ok if check is not None and form_ok else None
        if why:
            log.warning("result for lease %s from %s refused: %s", body.lease_id.hex()[:8], peer, why)
            if not form_ok:
                self.mesh.penalize(peer, "invalid-message", f"result: {why}")
        agrees = ()
        if form_ok and ka_ok is not False:
            agrees = self._agreeing(lease, body.output_digest, check.outputs)
        ev = S.ResultArrived(now, body.lease_id, worker, body.output_digest, form_ok, ka_ok, agrees)
        with self.store.transaction():
            self.store.save_result(body.lease_id, raw, output if form_ok else body.output, now)
            effects = self._handle(ev)
            self._apply(effects)
        self._after(effects)
        if form_ok:
            self._decoded[body.output_digest] = check.outputs
            while len(self._decoded) > 256:
                self._decoded.popitem(last=False)

    def _ka_expected(self, job_id: bytes) -> dict:
        if job_id not in self._ka_cache:
            blob = self.store.get_blob(bytes.fromhex(self._meta[job_id]["ka_digest"]))
            self._ka_cache[job_id] = decode_tensors(blob)
        return self._ka_cache[job_id]

    def _outputs_of(self, lease: S.LeaseRec) -> dict | None:
        if lease.digest in self._decoded:
            return self._decoded[lease.digest]
        stored = self.store.result(lease.lease_id)
        if stored is None or stored[1] is None:
            return None
        outs = decode_tensors(stored[1])
        self._decoded[lease.digest] = outs
        return outs

    def _agreeing(self, lease: S.LeaseRec, digest: bytes, outs: dict) -> tuple[bytes, ...]:
        agree = []
        for other in self.sched.returned(lease.job_id, lease.shard):
            if other.digest == digest:
                agree.append(other.lease_id)
                continue
            theirs = self._outputs_of(other)
            if theirs is not None and compare_outputs(outs, theirs).within_tolerance:
                agree.append(other.lease_id)
        return tuple(agree)

    async def _fetch_output(self, body: Result, peer: str, worker: bytes) -> bytes:
        if self.blobs is None:
            raise _Unavailable("the result has no inline output and there is no blob service")
        if body.output_size > self.settings.max_output_bytes:
            raise S.PeerViolation(worker, f"outputs blob of {body.output_size} bytes is over the cap")
        try:
            return await self.blobs.fetch(body.output_digest, body.output_size, [peer],
                                          timeout=self.settings.output_fetch_timeout_s)
        except Exception as exc:  # noqa: BLE001 - BlobError and transport errors
            raise _Unavailable(f"cannot fetch the outputs blob: {exc}") from None

    async def _violation(self, stream: Any, peer: Any, exc: Exception, what: str) -> None:
        if isinstance(exc, streams.StreamClosed):
            await streams.close_quietly(stream)
            return
        offence = None
        if isinstance(exc, streams.StreamError) and exc.offence:
            offence = "invalid-message" if exc.offence == "oversized" else exc.offence
        elif isinstance(exc, WireError) and exc.punish:
            offence = "invalid-message"
        if offence:
            self.mesh.penalize(peer, offence, f"{what}: {exc}")
        await streams.reset_quietly(stream)

    # --- notices and evidence ----------------------------------------------------------
    async def _notice(self, worker: bytes, envelope: bytes) -> bool:
        """Push one cancel or receipt on `notice`; True when the worker acknowledged it."""
        peer = peer_id_from_key(worker)
        if peer not in self.mesh.connected_peers():
            return False  # we only push to workers we are connected to (they dial us)
        try:
            with trio.fail_after(self.settings.notice_timeout_s):
                stream = await self.mesh.open_stream(peer, "notice", self.settings.notice_timeout_s)
                await streams.write_envelope(stream, envelope)
                await stream.close_write()
                try:
                    await streams.read_envelope(stream, 1024, self.settings.notice_timeout_s)
                except streams.StreamClosed:
                    return True  # a clean close (read_envelope reports a reset as an error)
                except streams.StreamError as exc:
                    log.info("notice to %s not acknowledged: %s", peer, exc)
                    return False
                await streams.reset_quietly(stream)
                return False
        except (trio.TooSlowError, MeshError, Exception):  # noqa: BLE001 - best effort
            return False

    async def _push_receipts(self, worker: bytes) -> None:
        lock = self._pushing.setdefault(worker, trio.Lock())
        if lock.locked():
            return  # a push to this worker is under way; the retry loop catches the rest
        async with lock:
            for lease_id, env in self.store.pending_receipts(worker, MAX_RECEIPTS_PER_ANSWER):
                if not await self._notice(worker, env):
                    return
                with self.store.transaction():
                    self.store.mark_delivered([lease_id])

    async def _receipt_loop(self) -> None:
        """Retry pending receipts on `notice` for workers we are connected to."""
        while True:
            await trio.sleep(self.settings.receipt_retry_s)
            for worker in self.store.workers_with_pending_receipts():
                self._nursery.start_soon(self._push_receipts, worker)

    async def _publish_evidence(self, worker: bytes, job_id: bytes) -> None:
        pubsub = self.mesh.pubsub
        for _w, _claim, env in self.store.evidence(job_id):
            if _w != worker:
                continue
            if pubsub is None or len(env) > 60 * 1024:
                log.warning("evidence against %s kept, not published (%d bytes)",
                            peer_id_from_key(worker), len(env))
                continue
            try:
                await pubsub.publish(self.mesh.names.topic("evidence"), env)
            except Exception as exc:  # noqa: BLE001
                log.info("publishing evidence: %s", exc)


async def _not_serving(stream: Any) -> None:
    await streams.reset_quietly(stream)


class _Unavailable(Exception):
    """A report cannot be taken now for a reason that is not the sender's fault."""


def _keep_until(opened: Any) -> int:
    """How long the replay store keeps a message id: until it would be refused as expired."""
    return min(opened.body.exp + MAX_CLOCK_SKEW_MS, KEEP_UNTIL_MAX)


def _relayed(stream: Any) -> bool:
    try:
        return "p2p-circuit" in str(stream.muxed_conn.secured_conn.get_remote_address() or "")
    except Exception:  # noqa: BLE001
        return False


__all__ = ["Publisher", "PublisherSettings", "PublisherError", "JobStatus", "JobSpec",
           "JobSpecError", "BuiltJob"]
