"""The publisher's own audits: it computes the replicas reserved for its trusted machines.

An audited shard (specs/verification.md, section 5) is accepted only by a quorum that holds
a result of one of the publisher's trusted machines. A publisher without other trusted
workers takes those replicas itself: it asks its scheduler for audit replicas only
(`WorkRequested(audit_only=True)` under its own key, rate-limit free, never paid), computes
the shard with onnxruntime on its own machine, micro-batch by micro-batch exactly as a
worker would (the same lease settings, so an honest worker of the same hardware class
agrees bit for bit), and takes the result through the same checks as any worker's.

The model is the publisher's own, so it runs outside any sandbox, as the known answers do
(`publisher/jobs.py`), in a worker thread so the event loop keeps serving. Its onnxruntime
session is kept for the next audit of the same model (`SessionCache`): creating one costs
~0.2-0.5 s for ResNet-50, and it used to be created for every micro-batch.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from typing import Any

import trio

from ..core import scheduler as S
from ..exec.outputs import concat_batches, decode_tensors, encode_tensors, tensors_digest
from .jobs import local_session, run_session

log = logging.getLogger(__name__)

OWN_PREFIX = "self"             # the publisher's own machine: a prefix of its own
OWN_CLASS = b"\x00" * 32        # no measured class: audits are compared by tolerance anyway
OWN_BENCH = 100.0               # samples/s assumed for its lease deadline


class SessionCache:
    """The audits' onnxruntime sessions by (model digest, opt level, provider), the
    `size` used last: a job's audits share one session instead of one per micro-batch."""

    def __init__(self, size: int = 2):
        self.size = size
        self.created = 0  # sessions made so far (tests and profiles read it)
        self._sessions: OrderedDict[tuple[bytes, str, str], Any] = OrderedDict()
        self._lock = threading.Lock()  # audits run in worker threads

    def has(self, key: tuple[bytes, str, str]) -> bool:
        with self._lock:
            return key in self._sessions

    def get(self, key: tuple[bytes, str, str], model: bytes | None) -> Any:
        """The session for `key`, made from `model` if none is kept (KeyError if none is
        kept and `model` is None)."""
        with self._lock:
            if key in self._sessions:
                self._sessions.move_to_end(key)
                return self._sessions[key]
        if model is None:
            raise KeyError(f"no session kept for model {key[0].hex()[:16]}")
        sess = local_session(model, key[1], key[2])
        with self._lock:
            self._sessions[key] = sess
            self.created += 1
            while len(self._sessions) > self.size:
                self._sessions.popitem(last=False)
        return sess

    def keep_only(self, models: set[bytes]) -> None:
        """Drop the sessions of models no live job uses (a ResNet-50 one holds ~100 MB)."""
        with self._lock:
            for key in [k for k in self._sessions if k[0] not in models]:
                del self._sessions[key]


def compute_shard(sess: Any, inputs_blob: bytes, samples: int,
                  micro_batch: int) -> tuple[bytes, tuple[bytes, ...]]:
    """The outputs blob and batch digests a worker would return for this shard."""
    inputs = decode_tensors(inputs_blob)
    batches = []
    for k in range(math.ceil(samples / micro_batch)):
        part = {n: a[k * micro_batch:(k + 1) * micro_batch] for n, a in inputs.items()}
        batches.append(run_session(sess, part))
    return encode_tensors(concat_batches(batches)), tuple(tensors_digest(b) for b in batches)


def _compute(sessions: SessionCache, key: tuple[bytes, str, str], model: bytes | None,
             inputs_blob: bytes, samples: int, micro_batch: int) -> tuple[bytes, tuple[bytes, ...]]:
    return compute_shard(sessions.get(key, model), inputs_blob, samples, micro_batch)


#: Audit replicas taken per request. One per tick capped the publisher at one audit a
#: second: with audit_rate 0.05 that is 20 shards/s, and audited shards queued behind it
#: (tools/bench_publisher.py: the last 20 s of a 600-shard job were spent on 30 audits).
#: At most AUDIT_ROUNDS batches a tick, so a shard that keeps failing is retried at that pace.
AUDIT_BATCH = 8
AUDIT_ROUNDS = 16


async def audit_loop(pub: Any, interval_s: float) -> None:
    """Take and compute audit replicas while the publisher runs: every tick, as many as
    are waiting, AUDIT_BATCH at a time."""
    own = pub.identity.public_key
    sessions = SessionCache()
    while True:
        await trio.sleep(interval_s)
        sessions.keep_only({bytes.fromhex(pub._meta[j]["model_digest"])
                            for j, rec in pub.sched.jobs.items() if rec.status == "live"})
        for _round in range(AUDIT_ROUNDS):
            if not pub.sched.audits_waiting():
                break
            live = tuple(j for j, rec in pub.sched.jobs.items() if rec.status == "live")
            effects = pub._run_event(S.WorkRequested(pub._now(), own, OWN_PREFIX, OWN_CLASS,
                                                     OWN_BENCH, AUDIT_BATCH, live, audit_only=True))
            grants = [g for e in effects if isinstance(e, S.Grant) for g in e.leases]
            if not grants:
                break
            for g in grants:
                await audit_one(pub, g, sessions)


async def audit_one(pub: Any, g: S.LeaseGrant, sessions: SessionCache | None = None) -> None:
    sessions = sessions if sessions is not None else SessionCache(1)
    meta = pub._meta[g.job_id]
    input_digest, _ka = pub._shards[g.job_id][g.shard]
    key = (bytes.fromhex(meta["model_digest"]), meta["opt_level"], meta["provider"])
    # the model's 100 MB come out of the store only when no session of it is kept
    model = None if sessions.has(key) else pub.store.get_blob(key[0])
    inputs = pub.store.get_blob(input_digest)
    samples = pub.sched.jobs[g.job_id].job.samples[g.shard]
    try:
        blob, digests = await trio.to_thread.run_sync(
            _compute, sessions, key, model, inputs, samples, meta["micro_batch"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime errors: hand the replica back
        log.warning("audit of job %s shard %d failed: %s", g.job_id.hex()[:8], g.shard, exc)
        pub._run_event(S.HandedBack(pub._now(), g.lease_id, pub.identity.public_key))
        return
    if pub.sched.leases[g.lease_id].state == "live":
        pub.take_own_result(g, blob, digests)


__all__ = ["audit_loop", "audit_one", "compute_shard", "SessionCache", "OWN_PREFIX"]
