"""The node's work loop: pull leases from chosen publishers, compute them, report, get paid.

Runs inside a mesh session (`node.py`) while the vehicle policy lets the car compute, and
follows specs/work-and-leases.md from the worker's side:

- choose a publisher and job (`core.worker.choose_job`: allowlist or anyone, requirements,
  unpaid cap from the ledger, `no_work` back-off), send a signed `work_request` on the
  `lease` protocol, check the `lease_batch` (`core.worker.check_lease_batch`) and persist
  it in the ledger before running anything;
- fetch the model by digest (any provider, then the publisher; hash-checked; cached, and
  provided to others once it validated and ran here) and, at the same time, the input from
  the publisher with the lease's token; start the publisher's sandbox child meanwhile;
- pipeline: hold the leases `core.worker.leases_to_request` says (one computing, the next
  ones queued), fetch the next lease's blobs while the current one computes (one lease
  ahead), and ask for more as soon as one starts; a queued lease that is cancelled or
  expires is dropped with its fetched input, a halt hands queued leases back;
- validate the model for the input's concrete shapes, run the shard in the publisher's
  sandbox child, micro-batch by micro-batch, sending `progress` at most every 2 s;
- persist the `result` / `failed` / `hand_back` in the ledger's outbox before sending it on
  the `report` protocol; a clean close is the acknowledgement, receipts come back on the same
  stream (or on `notice`) and go into the ledger; undelivered messages are retried with
  back-off, across restarts, until they expire;
- stop when the policy says so: stop the shard, hand back the finished micro-batches.

The loop itself decides nothing the core does not: it moves bytes and calls the sandbox.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections import deque
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import trio

from .. import __version__
from ..core import energy as energy_rules
from ..core import fetch as fetch_rules
from ..core import worker as rules
from ..identity import Identity, peer_id_from_key
from ..net import streams
from ..net.mesh import Mesh, MeshError
from ..wire import errors as wire_errors
from ..wire.envelope import open_envelope, seal
from ..wire.kinds import (KINDS, Cancel, FailedResult, HandBack, Progress, Receipt,
                         ReceiptRequest, Result, WorkRequest)

log = logging.getLogger(__name__)

KiB = 1024
MAX_INLINE_OUTPUT = 256 * KiB
REQUEST_LIFETIME_MS = 60_000
PROGRESS_EVERY_S = 2.0
PREFETCH_AHEAD = 1  # leases whose blobs are held fetched before they start (memory bound)
RESULT_LIFETIME_MS = 7 * 24 * 3600 * 1000
HAND_BACK_LIFETIME_MS = 24 * 3600 * 1000
FAILED_LIFETIME_MS = 7 * 24 * 3600 * 1000
OUTBOX_POLL_S = 2.0
IDLE_POLL_S = 2.0
REPORT_TIMEOUT_S = 30.0
RECEIPT_ASK_MAX_S = 3600.0  # back-off ceiling while a publisher answers no receipt
FETCH_RETRY_MAX_S = 30.0


def _cap(kind: str) -> int:
    return KINDS[kind].max_body + streams.FRAME_OVERHEAD


@dataclass
class RunningLease:
    lease: Any
    publisher: bytes
    expires_at: float = math.inf     # trio time its deadline passes
    stop: trio.Event = field(default_factory=trio.Event)
    cancelled: bool = False
    hand_back_reason: str = "policy"


@dataclass
class QueuedLease:
    """A lease held and not started yet; its blobs are fetched while another one computes."""

    lease: Any
    publisher: bytes
    expires_at: float                # trio time its deadline passes
    fetched: trio.Event = field(default_factory=trio.Event)  # also set when dropped
    fetching: bool = False
    model: bytes | None = None
    raw_input: Any = None            # the input blob, decoded into a sealed memfd (shm.py)
    error: str | None = None
    fetch_s: float | None = None
    dropped: bool = False
    scope: trio.CancelScope | None = None


@dataclass
class WorkerStats:
    requests: int = 0
    leases: int = 0
    shards_done: int = 0
    shards_failed: int = 0
    hand_backs: int = 0
    receipts: int = 0
    no_work: int = 0
    refused_batches: int = 0
    prefetched: int = 0          # inputs fetched in full while another shard was computing
    waited_for_fetch: int = 0    # shards that could not start at once: their blobs were not in
    dropped: int = 0             # queued leases dropped (cancelled, expired) with their input
    model_reused: int = 0        # leases that took the model held for the one before (no read)


@dataclass(frozen=True)
class WorkerSettings:
    network: str
    allow: tuple[bytes, ...] = ()
    serve_anyone: bool = False
    unpaid_cap: int = 1000
    unpaid_cap_elapsed_ms: int = 4 * 3600 * 1000
    retry_base_s: float = 60.0
    backoff_base_s: float = 60.0
    max_model_bytes: int = 256 * 1024 * 1024
    max_input_bytes: int = 256 * 1024 * 1024
    power_w: float = 60.0
    # ask a publisher for the receipts of results acknowledged this long ago and not paid
    # (its `notice` push may never reach a node behind NAT); doubled while none comes
    receipt_ask_s: float = 60.0
    slots: int = 2  # leases asked for at once, run one after another: fewer round trips,
    # but few enough that one node does not hoard a small job's shards
    cheat: str = ""  # demos and tests of verification only: see p2pfleet/live/cheats.py


class Worker:
    """One node's worker. `run(mesh)` per mesh session; `allow(...)`/`halt(...)` follow the
    policy's StartComputing / StopComputing effects."""

    def __init__(self, identity: Identity, settings: WorkerSettings, ledger: Any, cache: Any,
                 pool: Any, *, offer: Callable[[], dict], clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None,
                 on_energy: Callable[[float], None] | None = None,
                 note: Callable[[str], None] | None = None,
                 meter: Callable[[], float | None] | None = None,
                 meter_min_share: float = 0.0):
        self.identity = identity
        self.settings = settings
        self.ledger = ledger
        self.cache = cache
        self.pool = pool
        self.offer = offer  # -> dict of the work_request's capacity fields
        self.clock = clock
        self.rng = rng or random.Random()
        self.on_energy = on_energy or (lambda wh: None)
        # the provider's energy meter (VehicleState.charger_energy_wh) and how far to trust
        # it (core/energy.py account()); None: no meter, energy is estimated
        self.meter = meter or (lambda: None)
        self.meter_min_share = meter_min_share
        self.note = note or log.info
        self.stats = WorkerStats()
        self.backoff = rules.PublisherBackoff(base_s=settings.backoff_base_s)
        self.source_scores = fetch_rules.SourceScores()  # for the blob service of each session
        self.running: dict[bytes, RunningLease] = {}
        self.queue: list[QueuedLease] = []  # held, not started, in running order
        self._run_wake = trio.Event()  # the queue changed: one event per task that waits on it
        self._fetch_wake = trio.Event()
        self._pace: dict[bytes, dict[str, float]] = {}  # job id -> compute_s, fetch_s, deadline_s
        self._request_gap: dict[bytes, float] = {}  # publisher -> least gap between requests
        self._last_request: dict[bytes, float] = {}  # publisher -> trio time
        self._running_since: dict[bytes, float] = {}
        self.timeline: deque[tuple[float, str, bytes]] = deque(maxlen=256)  # (t, what, lease)
        self.threads = 1
        self.cpu_share = 1.0
        self._allowed = trio.Event()
        self._idle = trio.Event()
        self._idle.set()
        self._outbox_wake = trio.Event()
        self._news = trio.Event()
        self.mesh: Mesh | None = None
        self.blobs: Any = None
        self.jobs: Callable[[], list[rules.HeardJob]] = lambda: []
        self._output_owner: dict[bytes, str] = {}  # outputs blob digest -> publisher peer id
        self._receipt_asks: dict[bytes, tuple[float, float]] = {}  # publisher -> (next, gap) s
        # the model of the leases held, hash-checked once: (digest, bytes)
        self._model_kept: tuple[bytes, bytes] | None = None
        self._nursery: trio.Nursery | None = None
        self._warming: set[bytes] = set()  # publishers whose sandbox child is being started

    def poke(self) -> None:
        """A job announcement was heard: look for work now."""
        self._news.set()

    # --- policy --------------------------------------------------------------------------
    @property
    def computing(self) -> bool:
        return self._allowed.is_set()

    def allow(self, threads: int, cpu_share: float) -> None:
        self.threads, self.cpu_share = max(1, threads), cpu_share
        self._allowed.set()

    async def halt(self, reason: str, *, hand_back: bool = True, timeout: float = 10.0) -> None:
        """Stop asking for work; stop running shards (they hand back what they finished) or,
        with hand_back=False, let them finish; wait until the shards are over."""
        if self._allowed.is_set():
            self._allowed = trio.Event()
        for queued in list(self.queue):  # prefetched or not, unstarted leases go back
            self._drop(queued, None)
            await self._hand_back_unstarted(queued.lease, queued.publisher,
                                            reason if hand_back else "policy")
        if hand_back:
            for running in self.running.values():
                running.hand_back_reason = reason
                running.stop.set()
        with trio.move_on_after(timeout):
            await self._idle.wait()

    # --- the session -----------------------------------------------------------------------
    async def run(self, mesh: Mesh, blobs: Any, jobs: Callable[[], list[rules.HeardJob]], *,
                  task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.mesh, self.blobs, self.jobs = mesh, blobs, jobs
        mesh.set_handler("notice", self._on_notice)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._outbox_loop)
                nursery.start_soon(blobs.run)  # re-announces the models this node provides
                nursery.start_soon(self._work_loop)
                nursery.start_soon(self._run_loop)
                nursery.start_soon(self._prefetch_loop)
                task_status.started()
        finally:
            self.mesh = self.blobs = None
            self._nursery = None

    def authorize_blob(self, peer_id: str, digest: bytes, token: bytes | None) -> bool:
        """Outputs blobs go only to the publisher of their lease (work-and-leases.md, 5)."""
        return self._output_owner.get(digest) == peer_id

    # --- asking for work -------------------------------------------------------------------
    def _over_cap(self, publishers: set[bytes], now_ms: int) -> set[bytes]:
        s = self.settings
        return {p for p in publishers if not self.ledger.may_request(
            p, now_ms, cap_credit=s.unpaid_cap, cap_elapsed_ms=s.unpaid_cap_elapsed_ms)}

    def _held(self, now: float) -> list[rules.HeldLease]:
        """The leases held, running first, as the lease-count rule sees them."""
        out = []
        for lease_id, r in self.running.items():
            est = self._pace.get(r.lease.job_id, {}).get("compute_s")
            if est is not None:
                est = max(0.0, est - (now - self._running_since.get(lease_id, now)))
            out.append(rules.HeldLease(time_left_s=r.expires_at - now, compute_s=est))
        for q in self.queue:
            out.append(rules.HeldLease(time_left_s=q.expires_at - now,
                                       compute_s=self._pace.get(q.lease.job_id, {}).get("compute_s")))
        return out

    def _pace_for(self, job: rules.HeldJob) -> rules.Pace:
        p = self._pace.get(job.job_id, {})
        return rules.Pace(compute_s=p.get("compute_s"), fetch_s=p.get("fetch_s"),
                          request_gap_s=self._request_gap.get(job.publisher, 0.0),
                          deadline_s=p.get("deadline_s"))

    def _touch(self) -> None:
        """The queue or a lease's blobs changed: wake the runner and the prefetcher."""
        self._run_wake.set()
        self._fetch_wake.set()

    def _mark(self, what: str, lease: Any) -> None:
        """A timestamped step of a lease (the overlap and the waits show here)."""
        self.timeline.append((trio.current_time(), what, lease.lease_id))
        # info, not debug: a node at log_level=info shows where a shard's time went (the
        # default level, warning, skips it; debug would also turn on libp2p's own logs)
        log.info("lease %s shard %d: %s", lease.lease_id.hex()[:16], lease.shard, what)

    async def _work_loop(self) -> None:
        """Asks for leases whenever the lease-count rule wants more (the runner and the
        prefetcher take them from the queue)."""
        await self._resume_open_leases()
        while True:
            await self._allowed.wait()
            self._news = trio.Event()  # set by announcements and by leases starting or ending
            now = trio.current_time()
            self._drop_expired(now)
            heard = self.jobs()
            for j in heard:
                self.backoff.heard(j.publisher, j.job_id, j.shards_left)
            over = self._over_cap({j.publisher for j in heard}, int(self.clock() * 1000))
            offer = self.offer()
            job = rules.choose_job(
                heard, rules.Offer(sw_version=__version__, ort_version=offer["ort_version"],
                                   memory_mb=offer["memory_mb"], providers=offer["providers"]),
                allow=self.settings.allow, serve_anyone=self.settings.serve_anyone,
                over_cap=over, backoff=self.backoff, now=now, rng=self.rng)
            want = 0
            if job is not None:
                want = rules.leases_to_request(self._held(now), self._pace_for(job),
                                               slots=self.settings.slots)
            if want == 0:
                # nothing to ask now: look again at news, or when a back-off ends
                wake = IDLE_POLL_S
                ends = [u - now for j in heard
                        if (u := self.backoff.until(j.publisher, j.job_id)) is not None and u > now]
                if ends:
                    wake = min(wake, min(ends) + 0.001)
                for q in self.queue:
                    wake = min(wake, max(0.0, q.expires_at - now))
                with trio.move_on_after(wake):
                    await self._news.wait()
                continue
            # the child this publisher's leases will run in starts during the request too
            self._warm_sandbox(job.publisher)
            for lease, publisher in await self._request(job, offer, want):
                await self._take(lease, publisher, trio.current_time() + lease.deadline_ms / 1000)

    async def _take(self, lease: Any, publisher: bytes, expires_at: float) -> None:
        """Queue a lease just granted (or held from before a restart), or hand it back."""
        s = self.settings
        if self._was_cancelled(lease, publisher):
            self.ledger.set_status(lease.lease_id, "cancelled", int(self.clock() * 1000))
            return
        if not self._allowed.is_set():
            await self._hand_back_unstarted(lease, publisher, "policy")
            return
        why = rules.cannot_run(lease, ort_version=self.offer()["ort_version"],
                               max_model_bytes=s.max_model_bytes, max_input_bytes=s.max_input_bytes)
        if why is not None:
            log.info("handing back lease %s at once: %s", lease.lease_id.hex(), why)
            await self._hand_back_unstarted(lease, publisher, "overloaded")
            return
        self._pace.setdefault(lease.job_id, {})["deadline_s"] = lease.deadline_ms / 1000
        self.queue.append(QueuedLease(lease, publisher, expires_at))
        self._mark("queued", lease)
        self._warm_sandbox(publisher)
        self._touch()

    def _warm_sandbox(self, publisher: bytes) -> None:
        """Start the publisher's sandbox child now (when asking it for work, and when a
        lease of it is queued), while the lease is requested and its blobs are fetched:
        a child takes 0.2-3 s to start (its interpreter and onnxruntime), which a fresh
        node otherwise paid after the fetch, before its first shard. Only the child
        starts: the model is still validated for the input's shapes, then loaded, when
        the shard runs (exec/runner.py). A child started for a publisher that then had
        no work stays in the pool like one that ran (the pool bounds them)."""
        if self._nursery is None or publisher in self._warming:
            return
        self._warming.add(publisher)
        self._nursery.start_soon(self._warm, publisher)

    async def _warm(self, publisher: bytes) -> None:
        try:
            box = await self.pool.get(publisher)
            if not (box.alive and box.hello is not None):
                async with box.lock:  # what run_shard holds while it starts a child
                    await box.start()
        except Exception as exc:  # noqa: BLE001 - the shard starts it again and reports
            log.info("sandbox for %s not started ahead: %s", publisher.hex()[:8], exc)
        finally:
            self._warming.discard(publisher)

    def _drop(self, q: QueuedLease, status: str | None) -> None:
        """Take a queued lease out: stop its fetch, forget its blobs and free the cache space
        of its input (the model stays: other leases and other nodes use it)."""
        if q in self.queue:
            self.queue.remove(q)
        q.dropped = True
        if q.scope is not None:
            q.scope.cancel()
        q.model = q.raw_input = None
        q.fetched.set()
        if status is not None:
            self.ledger.set_status(q.lease.lease_id, status, int(self.clock() * 1000))
            self.stats.dropped += 1
            self._mark(status, q.lease)
        self._release_input(q.lease.input_digest)
        self._touch()
        self._news.set()

    def _release_input(self, digest: bytes) -> None:
        in_use = any(q.lease.input_digest == digest for q in self.queue) or any(
            r.lease.input_digest == digest for r in self.running.values())
        if not in_use and self.cache is not None and self.cache.has(digest):
            self.cache.remove(digest)
        self._forget_model()

    def _drop_expired(self, now: float) -> None:
        for q in list(self.queue):
            if q.expires_at <= now:
                log.info("queued lease %s expired before it could start", q.lease.lease_id.hex()[:16])
                self._drop(q, "expired")

    async def _prefetch_loop(self) -> None:
        """Fetches the blobs of queued leases in order, at most PREFETCH_AHEAD ahead of the
        runner, while the node may compute."""
        while True:
            self._fetch_wake = trio.Event()
            ahead = sum(1 for q in self.queue if q.fetched.is_set())
            nxt = next((q for q in self.queue if not q.fetched.is_set() and not q.fetching), None)
            if nxt is None or ahead >= PREFETCH_AHEAD or not self._allowed.is_set():
                with trio.move_on_after(IDLE_POLL_S):  # the policy may allow computing again
                    await self._fetch_wake.wait()
                continue
            await self._prefetch(nxt)

    async def _prefetch(self, q: QueuedLease) -> None:
        lease, publisher = q.lease, q.publisher
        pub_peer = peer_id_from_key(publisher)
        q.fetching = True
        q.scope = trio.CancelScope()
        started = trio.current_time()
        self._mark("fetch started", lease)
        with q.scope:
            give_up = started + rules.fetch_time_s(lease)
            try:
                t_input = trio.current_time()
                model, raw_input = await self._fetch_both(lease, publisher, pub_peer, give_up)
                # Decoded into the sealed memfd the sandbox child maps (exec/shm.py) here,
                # while the previous shard computes: the copy is off the run's critical path.
                from ..exec.shm import share_blob

                raw_input = await trio.to_thread.run_sync(share_blob, raw_input)
                q.model, q.raw_input = model, raw_input
                q.fetch_s = trio.current_time() - t_input
            except Exception as exc:  # noqa: BLE001 - BlobError, MeshError, timeouts
                log.info("lease %s: fetch failed: %s", lease.lease_id.hex()[:16], exc)
                q.error = str(exc) or type(exc).__name__
        q.fetching = False
        if q.dropped:
            q.model = q.raw_input = None
            return
        if q.fetch_s is not None:
            self._pace.setdefault(lease.job_id, {})["fetch_s"] = q.fetch_s
        while_computing = bool(self.running)
        if while_computing and q.error is None:
            self.stats.prefetched += 1
        self._mark("fetched while computing" if while_computing else "fetched", lease)
        q.fetched.set()
        self._touch()

    async def _fetch_both(self, lease: Any, publisher: bytes, pub_peer: str,
                          give_up: float) -> tuple[bytes, bytes]:
        """The lease's model and input, fetched at the same time (each with its retries):
        one after the other, a fresh node waited for the model's round trips and bytes
        before asking for the input. The first failure cancels the other and is raised."""
        got: dict[str, Any] = {}
        failed: list[Exception] = []

        async def one(what: str, fetch: Callable[[], Any], scope: trio.CancelScope) -> None:
            try:
                got[what] = await self._with_retries(publisher, fetch, give_up)
            except Exception as exc:  # noqa: BLE001 - BlobError, MeshError, timeouts
                failed.append(exc)
                scope.cancel()
                return
            self._mark(f"{what} in", lease)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, "model", lambda: self._fetch_model(lease, pub_peer, give_up),
                               nursery.cancel_scope)
            nursery.start_soon(one, "input", lambda: self._fetch_input(lease, pub_peer, give_up),
                               nursery.cancel_scope)
        if failed:
            raise failed[0]
        return got["model"], got["input"]

    async def _run_loop(self) -> None:
        """Runs the queued leases one after another, each as soon as its blobs are in."""
        while True:
            self._run_wake = trio.Event()
            await self._allowed.wait()
            if not self.queue:
                with trio.move_on_after(IDLE_POLL_S):
                    await self._run_wake.wait()
                continue
            q = self.queue[0]
            if not q.fetched.is_set():
                self.stats.waited_for_fetch += 1
                self._mark("waiting for its blobs", q.lease)
                await q.fetched.wait()
            if q.dropped or q not in self.queue:
                continue
            self.queue.remove(q)
            self._news.set()  # one lease fewer held: the feeder may ask for the next one now
            self._touch()
            if q.expires_at <= trio.current_time():
                self.ledger.set_status(q.lease.lease_id, "expired", int(self.clock() * 1000))
                self._release_input(q.lease.input_digest)
                continue
            if q.error is not None:
                await self._fail(q.lease, q.publisher, "fetch_failed", q.error)
                self._release_input(q.lease.input_digest)
                continue
            model, raw_input = q.model, q.raw_input
            q.model = q.raw_input = None
            await self._run_lease(q.lease, q.publisher, model, raw_input, q.expires_at)
            self._news.set()

    async def _ensure_connected(self, job: rules.HeardJob) -> str:
        peer = peer_id_from_key(job.publisher)
        if not self.mesh.host.get_network().get_connections(_peer_id(peer)):
            await self._dial_announced(job.publisher)  # else maybe the peerstore knows a way
        return peer

    async def _dial_announced(self, publisher: bytes) -> bool:
        """Connect to a publisher at the addresses its newest announcements give."""
        peer = peer_id_from_key(publisher)
        addrs = [a for j in sorted(self.jobs(), key=lambda j: -j.heard_at)
                 if j.publisher == publisher for a in j.addrs]
        for addr in dict.fromkeys(addrs):
            if not addr.endswith("/p2p/" + peer):
                continue  # an address pointing elsewhere is ignored (section 2)
            try:
                await self.mesh.connect(addr)
                return True
            except MeshError as exc:
                log.info("publisher %s not reachable at %s: %s", peer, addr, exc)
        return False

    async def _request(self, job: rules.HeardJob, offer: dict,
                       free_slots: int) -> list[tuple[Any, bytes]]:
        mesh, net = self.mesh, self.settings.network
        now_ms = int(self.clock() * 1000)
        req = WorkRequest(
            req_id=os.urandom(16), exp=now_ms + REQUEST_LIFETIME_MS, job_id=job.job_id,
            hw_class=offer["hw_class"], sw_version=__version__, ort_version=offer["ort_version"],
            bench=offer["bench"], cores=offer["cores"], memory_mb=offer["memory_mb"],
            providers=tuple(offer["providers"]), free_slots=max(1, free_slots))
        self.stats.requests += 1
        asked_at, before = trio.current_time(), self._last_request.get(job.publisher)
        self._last_request[job.publisher] = asked_at
        peer = await self._ensure_connected(job)
        try:
            try:
                stream = await mesh.open_stream(peer, "lease")
            except MeshError:
                if not await self._dial_announced(job.publisher):
                    raise
                stream = await mesh.open_stream(peer, "lease")
        except MeshError as exc:
            log.info("cannot ask %s for work: %s", peer, exc)
            self.backoff.no_work(job.publisher, trio.current_time(), 0, self.rng)
            return []
        try:
            await streams.write_envelope(stream, seal(req, self.identity, net))
            await stream.close_write()
            raw = await streams.read_envelope(stream, max(_cap("lease_batch"), _cap("no_work")))
        except (streams.StreamError, Exception) as exc:  # noqa: BLE001 - any stream failure
            offence = getattr(exc, "offence", None)
            if offence:
                mesh.penalize(peer, offence, f"lease reply: {exc}")
            log.info("no answer from %s to a work request: %s", peer, exc)
            self.backoff.no_work(job.publisher, trio.current_time(), 0, self.rng)
            await streams.reset_quietly(stream)
            return []
        await streams.close_quietly(stream)
        try:
            opened = open_envelope(raw, net, now_ms=int(self.clock() * 1000),
                                   kinds={"lease_batch", "no_work"})
        except wire_errors.WireError as exc:
            if exc.punish:
                mesh.penalize(peer, "invalid-message", f"lease reply: {exc}")
            self.backoff.no_work(job.publisher, trio.current_time(), 0, self.rng)
            return []
        body = opened.body
        if opened.kind == "no_work":
            if opened.signer != job.publisher or body.req_id != req.req_id:
                mesh.penalize(peer, "invalid-message", "no_work for another request or signer")
            self.stats.no_work += 1
            if body.reason == "backoff" and before is not None:
                # the publisher's least gap between requests: hold leases to cover it
                self._request_gap[job.publisher] = asked_at - before + body.retry_after_ms / 1000
            about_job = body.reason in ("no_work", "not_eligible")  # else about this node
            self.backoff.no_work(job.publisher, trio.current_time(), body.retry_after_ms / 1000,
                                 self.rng, exponential=about_job or body.reason == "excluded",
                                 job_id=job.job_id if about_job else None)
            return []
        known = {j.job_id for j in self.jobs() if j.publisher == job.publisher}
        try:
            leases = rules.check_lease_batch(
                opened.signer, body, publisher=job.publisher, req_id=req.req_id,
                own_key=self.identity.public_key, free_slots=req.free_slots, known_jobs=known)
        except rules.LeaseRefused as exc:
            self.stats.refused_batches += 1
            mesh.penalize(peer, "invalid-message", f"lease batch: {exc.reason}")
            return []
        self.backoff.got_work(job.publisher, job.job_id)
        new = set(self.ledger.add_leases(job.publisher, opened, int(self.clock() * 1000)))
        leases = [lease for lease in leases if lease.lease_id in new]  # never run one twice
        self.stats.leases += len(leases)
        return [(lease, job.publisher) for lease in leases]

    async def _resume_open_leases(self) -> None:
        """Leases held when the node stopped: run them again if their time is not up."""
        now_ms = int(self.clock() * 1000)
        for row in self.ledger.open_leases():
            if row.received_ms + row.lease.deadline_ms <= now_ms:
                self.ledger.set_status(row.lease.lease_id, "expired", now_ms)
                continue
            await self._allowed.wait()
            left_s = (row.received_ms + row.lease.deadline_ms - int(self.clock() * 1000)) / 1000
            await self._take(row.lease, row.publisher, trio.current_time() + left_s)

    # --- running a lease -----------------------------------------------------------------
    async def _run_lease(self, lease: Any, publisher: bytes, model: bytes, raw_input: Any,
                         expires_at: float) -> None:
        """Run one lease whose blobs are in, in the publisher's sandbox; report its end."""
        from ..exec.outputs import EncodingError, decode_tensors
        from ..exec.runner import run_shard
        from ..exec.shm import SharedArrays

        s = self.settings
        # a meter reading counts only for a shard that runs alone (no shared draw)
        meter_before = None if self.running else self.meter()
        running = RunningLease(lease, publisher, expires_at=expires_at)
        self.running[lease.lease_id] = running
        self._running_since[lease.lease_id] = trio.current_time()
        self._idle = trio.Event()
        self.ledger.set_status(lease.lease_id, "running", int(self.clock() * 1000))
        self._mark("started", lease)
        try:
            if running.stop.is_set():  # halted or cancelled between the queue and here
                if running.cancelled:
                    self.ledger.set_status(lease.lease_id, "cancelled", int(self.clock() * 1000))
                else:
                    await self._hand_back_unstarted(lease, publisher, running.hand_back_reason)
                return
            try:
                inputs = raw_input if isinstance(raw_input, SharedArrays) else \
                    decode_tensors(raw_input)
            except EncodingError as exc:
                await self._fail(lease, publisher, "input_error", f"input blob: {exc}")
                return
            run_model, run_lease = model, lease
            from .cheats import cheats_now

            if cheats_now(s.cheat, self.stats.shards_done):
                from .cheats import fp16_weights
                run_model = fp16_weights(model)
                run_lease = dataclasses.replace(lease, model_digest=hashlib.sha256(run_model).digest())
            sandbox = await self.pool.get(publisher)
            progress = _ProgressSender(self, lease, publisher)
            started = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(progress.run)
                # validates the model in the child first (its memory limit bounds the cost)
                outcome = await run_shard(sandbox, run_lease, run_model, inputs,
                                          threads=self.threads, on_progress=progress.update,
                                          stop=running.stop)
                nursery.cancel_scope.cancel()
            if outcome.status in ("done", "stopped") and outcome.batch_digests:
                # validated and ran here: only now offered to others. A timeout, a crash,
                # running out of memory or refused inputs leave it private.
                self._keep_model(lease.model_digest, model)
            busy_s = outcome.compute_s or (trio.current_time() - started)
            log.info("lease %s shard %d: run %d ms (validate %.0f ms, load %.0f ms, compute "
                     "%.0f ms)", lease.lease_id.hex()[:16], lease.shard, outcome.elapsed_ms,
                     outcome.validate_ms, outcome.load_ms, outcome.compute_s * 1000)
            energy_mwh = self._account_energy(publisher, busy_s, meter_before)
            self._mark(f"computed ({outcome.status})", lease)
            if outcome.status == "done":
                self._pace.setdefault(lease.job_id, {})["compute_s"] = busy_s
            if running.cancelled:
                self.ledger.set_status(lease.lease_id, "cancelled", int(self.clock() * 1000))
                return
            if outcome.status == "done":
                await self._send_result(lease, publisher, outcome, energy_mwh)
            elif outcome.status == "stopped":
                await self._send_hand_back(lease, publisher, outcome, running.hand_back_reason)
            else:
                await self._fail(lease, publisher, outcome.reason or "internal", outcome.detail)
        finally:
            if isinstance(raw_input, SharedArrays):
                raw_input.close()
            self.running.pop(lease.lease_id, None)
            self._running_since.pop(lease.lease_id, None)
            self._release_input(lease.input_digest)
            if not self.running:
                self._idle.set()

    async def _with_retries(self, publisher: bytes, fetch: Callable[[], Any],
                            give_up_at: float) -> Any:
        """A fetch, retried with back-off until `give_up_at` (trio time): a failed lease
        costs this node its one replica of the shard, and a publisher that restarts or a
        passing network hiccup is no reason to fail it."""
        attempt = 0
        while True:
            try:
                return await fetch()
            except Exception as exc:  # noqa: BLE001 - BlobError, MeshError, timeouts
                delay = min(FETCH_RETRY_MAX_S, 0.5 * 2**attempt)
                if trio.current_time() + delay > give_up_at:
                    raise
                attempt += 1
                log.info("fetch attempt %d failed (%s); retrying in %.1f s", attempt, exc, delay)
                await trio.sleep(delay)
                await self._dial_announced(publisher)

    async def _fetch_model(self, lease: Any, pub_peer: str, give_up: float) -> bytes:
        """The model from the cache, else from its providers and then the publisher, each
        within its share of the lease's fetch time (core.fetch)."""
        kept = self._model_kept
        if kept is not None and kept[0] == lease.model_digest:
            # the bytes checked for an earlier lease of this model, the same object: a
            # 100 MB model was read and hashed from the cache, then hashed again by the
            # sandbox (Sandbox.model_digest remembers objects), for every shard
            self.stats.model_reused += 1
            return kept[1]
        model = self.cache.get(lease.model_digest)
        if model is None:
            model = await self.blobs.fetch(lease.model_digest, lease.model_size, [pub_peer],
                                           public=True, use_providers=True, serve=False,
                                           timeout=max(0.0, give_up - trio.current_time()),
                                           budget_s=rules.fetch_time_s(lease))
        self._model_kept = (lease.model_digest, model)
        return model

    def _forget_model(self) -> None:
        """Let the kept model go once no held lease uses it."""
        kept = self._model_kept
        if kept is not None and not any(
                q.lease.model_digest == kept[0] for q in self.queue) and not any(
                r.lease.model_digest == kept[0] for r in self.running.values()):
            self._model_kept = None

    async def _fetch_input(self, lease: Any, pub_peer: str, give_up: float) -> bytes:
        """The input from the publisher, then the lease's seeders, with the lease's token.
        (This and `_fetch_model` are the worker's only calls of `BlobService.fetch`.)"""
        return await self.blobs.fetch(
            lease.input_digest, lease.input_size, [pub_peer, *lease.input_sources],
            token=lease.token, public=False, timeout=max(0.0, give_up - trio.current_time()),
            budget_s=rules.fetch_time_s(lease))

    def _keep_model(self, digest: bytes, model: bytes) -> None:
        """A model that validated and ran here is cached as public and offered to other
        nodes (models spread car to car, specs/work-and-leases.md, section 5); until then
        it is fetched and cached privately."""
        if not self.cache.publish(digest):
            self.cache.put(digest, model, public=True)
        if self.blobs is not None:
            self._nursery.start_soon(self._provide, digest)

    async def _provide(self, digest: bytes) -> None:
        try:
            await self.blobs.provide(digest)
        except Exception as exc:  # noqa: BLE001 - best effort: the model still works
            log.debug("could not announce model %s: %s", digest.hex()[:16], exc)

    def _account_energy(self, publisher: bytes, busy_s: float,
                        meter_before: float | None = None) -> int:
        meter_after = self.meter() if len(self.running) <= 1 else None
        sample = energy_rules.account(busy_s, power_w=self.settings.power_w,
                                      cpu_share=self.cpu_share, meter_before=meter_before,
                                      meter_after=meter_after,
                                      min_share_of_estimate=self.meter_min_share)
        mwh = int(round(sample.wh * 1000))
        self.ledger.add_energy(publisher, int(self.clock() * 1000), mwh, metered=sample.metered)
        self.on_energy(sample.wh)
        return mwh

    # --- reports ---------------------------------------------------------------------------
    async def _send_result(self, lease: Any, publisher: bytes, outcome: Any, energy_mwh: int) -> None:
        now_ms = int(self.clock() * 1000)
        offer = self.offer()
        body = Result(
            lease_id=lease.lease_id, exp=now_ms + RESULT_LIFETIME_MS, job_id=lease.job_id,
            shard=lease.shard, model_digest=lease.model_digest, input_digest=lease.input_digest,
            output_digest=outcome.output_digest, output_size=outcome.output_size,
            batch_digests=tuple(outcome.batch_digests), hw_class=offer["hw_class"],
            ort_version=outcome.ort_version or offer["ort_version"],
            elapsed_ms=min(outcome.elapsed_ms, 2**32 - 1), energy_mwh=min(energy_mwh, 2**32 - 1),
            output=outcome.outputs if outcome.output_size <= MAX_INLINE_OUTPUT else None)
        try:
            envelope = seal(body, self.identity, self.settings.network)
        except ValueError:  # the body is over the kind's cap: serve the outputs as a blob
            envelope = seal(dataclasses.replace(body, output=None), self.identity,
                            self.settings.network)
        self.cache.put(outcome.output_digest, outcome.outputs, public=False, pinned=True)
        self._output_owner[outcome.output_digest] = peer_id_from_key(publisher)
        self.ledger.enqueue(publisher, lease.lease_id, "result", envelope, body.exp, now_ms,
                            output_digest=outcome.output_digest, elapsed_ms=outcome.elapsed_ms,
                            energy_mwh=energy_mwh)
        self.ledger.set_status(lease.lease_id, "done", now_ms)
        self.stats.shards_done += 1
        self.note(f"shard {lease.shard} of job {lease.job_id.hex()[:8]} done in "
                  f"{outcome.elapsed_ms} ms")
        self._outbox_wake.set()

    async def _send_hand_back(self, lease: Any, publisher: bytes, outcome: Any, reason: str) -> None:
        now_ms = int(self.clock() * 1000)
        body = HandBack(lease_id=lease.lease_id, exp=now_ms + HAND_BACK_LIFETIME_MS,
                        reason=reason if reason in _HAND_BACK_REASONS else "policy",
                        done=outcome.done, batch_digests=tuple(outcome.batch_digests),
                        output_digest=outcome.output_digest)
        if outcome.outputs is not None:
            self.cache.put(outcome.output_digest, outcome.outputs, public=False, pinned=True)
            self._output_owner[outcome.output_digest] = peer_id_from_key(publisher)
        envelope = seal(body, self.identity, self.settings.network)
        self.ledger.enqueue(publisher, lease.lease_id, "hand_back", envelope, body.exp, now_ms,
                            output_digest=outcome.output_digest)
        self.ledger.set_status(lease.lease_id, "handed_back", now_ms)
        self.stats.hand_backs += 1
        self.note(f"handed back shard {lease.shard} ({outcome.done}/{outcome.total} "
                  f"micro-batches done): {reason}")
        await self._deliver_due(deadline_s=3.0)

    async def _hand_back_unstarted(self, lease: Any, publisher: bytes, reason: str) -> None:
        now_ms = int(self.clock() * 1000)
        body = HandBack(lease_id=lease.lease_id, exp=now_ms + HAND_BACK_LIFETIME_MS,
                        reason=reason, done=lease.first_batch, batch_digests=(),
                        output_digest=None)
        self.ledger.enqueue(publisher, lease.lease_id, "hand_back",
                            seal(body, self.identity, self.settings.network), body.exp, now_ms)
        self.ledger.set_status(lease.lease_id, "handed_back", now_ms)
        self.stats.hand_backs += 1
        self._outbox_wake.set()

    async def _fail(self, lease: Any, publisher: bytes, reason: str, detail: str) -> None:
        now_ms = int(self.clock() * 1000)
        body = FailedResult(lease_id=lease.lease_id, exp=now_ms + FAILED_LIFETIME_MS,
                            reason=reason if reason in _FAILED_REASONS else "internal",
                            detail=detail[:240])
        self.ledger.enqueue(publisher, lease.lease_id, "failed",
                            seal(body, self.identity, self.settings.network), body.exp, now_ms)
        self.ledger.set_status(lease.lease_id, "failed", now_ms)
        self.stats.shards_failed += 1
        self.note(f"shard {lease.shard} of job {lease.job_id.hex()[:8]} failed: {reason}: "
                  f"{detail[:120]}")
        self._outbox_wake.set()

    async def send_report(self, publisher: bytes, envelope: bytes) -> list[bytes]:
        """Send one report; returns the receipts answered. Raises on no acknowledgement."""
        if self.mesh is None:
            raise MeshError("the mesh is not running")
        peer = peer_id_from_key(publisher)
        try:
            stream = await self.mesh.open_stream(peer, "report")
        except MeshError:
            # a restarted publisher may listen elsewhere: dial what its announcements say
            if not await self._dial_announced(publisher):
                raise
            stream = await self.mesh.open_stream(peer, "report")
        try:
            await streams.write_envelope(stream, envelope)
            await stream.close_write()
            receipts = await streams.read_all_envelopes(stream, _cap("receipt"), limit=64,
                                                        timeout=REPORT_TIMEOUT_S)
        except BaseException:
            await streams.reset_quietly(stream)
            raise
        await streams.close_quietly(stream)
        return receipts

    async def _outbox_loop(self) -> None:
        while True:
            # a fresh event before delivering: a result queued meanwhile is sent right after
            self._outbox_wake = trio.Event()
            await self._deliver_due()
            await self._ask_receipts()
            with trio.move_on_after(OUTBOX_POLL_S):
                await self._outbox_wake.wait()

    async def _deliver_due(self, deadline_s: float | None = None) -> None:
        with trio.move_on_after(deadline_s if deadline_s is not None else float("inf")):
            for item in self.ledger.due(int(self.clock() * 1000)):
                if self.mesh is None:
                    return
                try:
                    receipts = await self.send_report(item.publisher, item.envelope)
                except Exception as exc:  # noqa: BLE001 - not delivered: retry later
                    at = self.ledger.retry_later(item.id, int(self.clock() * 1000), self.rng,
                                                 base_s=self.settings.retry_base_s)
                    log.info("%s for lease %s not delivered (%s); retrying at %s", item.kind,
                             (item.lease_id or b"").hex()[:16], exc, time.ctime(at / 1000))
                    continue
                self.ledger.delivered(item.id, int(self.clock() * 1000))
                for raw in receipts:
                    self._take_receipt(raw, peer_id_from_key(item.publisher))

    async def _ask_receipts(self) -> None:
        """Ask each publisher for the receipts of results it acknowledged `receipt_ask_s`
        ago without paying (a `receipt_request` on `report`); the gap doubles, up to 1 h,
        while an answer brings nothing new, and is reset when one does."""
        now = self.clock()
        base = self.settings.receipt_ask_s
        waiting = self.ledger.unreceipted(int(now * 1000), int(base * 1000))
        for publisher, lease_ids in waiting.items():
            next_at, gap = self._receipt_asks.get(publisher, (0.0, base))
            if self.mesh is None or now < next_at:
                continue
            body = ReceiptRequest(os.urandom(16), int(now * 1000) + REQUEST_LIFETIME_MS,
                                  tuple(lease_ids))
            before = self.stats.receipts
            try:
                receipts = await self.send_report(
                    publisher, seal(body, self.identity, self.settings.network))
            except Exception as exc:  # noqa: BLE001 - unreachable or refused: ask later
                log.info("asking %s for receipts: %s", peer_id_from_key(publisher), exc)
                receipts = []
            for raw in receipts:
                self._take_receipt(raw, peer_id_from_key(publisher))
            gap = base if self.stats.receipts > before else min(RECEIPT_ASK_MAX_S, gap * 2)
            self._receipt_asks[publisher] = (self.clock() + gap, gap)

    def _take_receipt(self, raw: bytes, sender: str) -> bool:
        from ..store.ledger import ReceiptRejected

        try:
            opened = open_envelope(raw, self.settings.network, now_ms=int(self.clock() * 1000),
                                   kinds={"receipt"})
            outcome = self.ledger.add_receipt(opened, int(self.clock() * 1000))
        except wire_errors.WireError as exc:
            if exc.punish and self.mesh is not None:
                self.mesh.penalize(sender, "invalid-message", f"receipt: {exc}")
            return False
        except ReceiptRejected as exc:
            if self.mesh is not None:
                self.mesh.penalize(sender, "invalid-message", f"receipt: {exc}")
            return False
        if outcome == "new":
            self.stats.receipts += 1
            body: Receipt = opened.body
            self._output_owner.pop(body.output_digest, None)
            if self.cache is not None:
                self.cache.unpin(body.output_digest)
        return True

    # --- notices (publisher -> worker) ------------------------------------------------------
    async def _on_notice(self, stream: Any) -> None:
        peer = str(streams.remote_peer(stream))
        try:
            raw = await streams.read_envelope(stream, max(_cap("cancel"), _cap("receipt")))
            opened = open_envelope(raw, self.settings.network, now_ms=int(self.clock() * 1000),
                                   kinds={"cancel", "receipt"})
        except streams.StreamError as exc:
            if exc.offence and self.mesh is not None:
                self.mesh.penalize(peer, exc.offence, f"notice: {exc}")
            await streams.reset_quietly(stream)
            return
        except wire_errors.WireError as exc:
            if exc.punish and self.mesh is not None:
                self.mesh.penalize(peer, "invalid-message", f"notice: {exc}")
            await streams.reset_quietly(stream)
            return
        if peer_id_from_key(opened.signer) != peer:
            if self.mesh is not None:
                self.mesh.penalize(peer, "invalid-message", "notice signed by another peer")
            await streams.reset_quietly(stream)
            return
        if opened.kind == "receipt":
            ok = self._take_receipt(raw, peer)
        else:
            ok = self._cancel(opened.signer, opened.body, peer)
        if ok:
            await streams.close_quietly(stream)
        else:
            await streams.reset_quietly(stream)

    def _was_cancelled(self, lease: Any, publisher: bytes) -> bool:
        """A queued lease its publisher cancelled before it started (the ledger says so)."""
        row = self.ledger.lease(lease.lease_id)
        return row is not None and row.publisher == publisher and row.status == "cancelled"

    def _cancel(self, signer: bytes, body: Cancel, peer: str) -> bool:
        """Stop the leases `signer` issued to us that the cancel names; False (drop it,
        penalise the peer) if it names none of them. Nothing is kept for a cancel: a queued
        lease is marked in the ledger row it already has, a running one is stopped."""
        try:
            targets = rules.leases_to_cancel(body.job_id, body.lease_ids,
                                             self.ledger.job_leases(signer, body.job_id))
        except rules.CancelRefused as exc:
            if self.mesh is not None:
                self.mesh.penalize(peer, "invalid-message", f"notice: {exc.reason}")
            return False
        now_ms = int(self.clock() * 1000)
        for lease_id in targets:
            running = self.running.get(lease_id)
            if running is not None:
                running.cancelled = True  # _run_lease marks it cancelled when the child stops
                running.stop.set()
            else:
                self.ledger.set_status(lease_id, "cancelled", now_ms)
                for q in [q for q in self.queue if q.lease.lease_id == lease_id]:
                    self._drop(q, "cancelled")  # its prefetched input goes too
            self.note(f"lease {lease_id.hex()[:16]} cancelled by its publisher: {body.reason}")
        return True


_HAND_BACK_REASONS = {"unplugged", "departure", "policy", "shutdown", "overloaded"}
_FAILED_REASONS = {"crash", "out_of_memory", "timeout", "invalid_model", "input_error",
                   "fetch_failed", "internal"}


def _peer_id(peer: str) -> Any:
    from libp2p.peer.id import ID

    return ID.from_base58(peer)


class _ProgressSender:
    """Sends the latest progress of a lease at most every 2 s (best effort, never retried)."""

    def __init__(self, worker: Worker, lease: Any, publisher: bytes):
        self.worker, self.lease, self.publisher = worker, lease, publisher
        self.latest: Any = None
        self.sent: Any = None
        self.changed = trio.Event()

    def update(self, progress: Any) -> None:
        self.latest = progress
        self.changed.set()

    async def run(self) -> None:
        w = self.worker
        while True:
            await self.changed.wait()
            self.changed = trio.Event()
            p = self.latest
            if p is None or p is self.sent:
                continue
            body = Progress(lease_id=self.lease.lease_id,
                            exp=int(w.clock() * 1000) + 3600 * 1000, done=p.done, total=p.total,
                            batch_digests=tuple(p.batch_digests))
            try:
                with trio.move_on_after(5.0):
                    receipts = await w.send_report(self.publisher, seal(body, w.identity,
                                                                        w.settings.network))
                    for raw in receipts:
                        w._take_receipt(raw, peer_id_from_key(self.publisher))
            except Exception as exc:  # noqa: BLE001 - progress is best effort
                log.debug("progress not delivered: %s", exc)
            self.sent = p
            await trio.sleep(PROGRESS_EVERY_S)
