"""The publisher's own audits: it computes the replicas reserved for its trusted machines.

An audited shard (specs/verification.md, section 5) is accepted only by a quorum that holds
a result of one of the publisher's trusted machines. A publisher without other trusted
workers takes those replicas itself: it asks its scheduler for audit replicas only
(`WorkRequested(audit_only=True)` under its own key, rate-limit free, never paid), computes
the shard with onnxruntime on its own machine, micro-batch by micro-batch exactly as a
worker would (the same lease settings, so an honest worker of the same hardware class
agrees bit for bit), and takes the result through the same checks as any worker's.

The model is the publisher's own, so it runs outside any sandbox, as the known answers do
(`publisher/jobs.py`), in a worker thread so the event loop keeps serving.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import trio

from ..core import scheduler as S
from ..exec.outputs import concat_batches, decode_tensors, encode_tensors, tensors_digest
from .jobs import run_locally

log = logging.getLogger(__name__)

OWN_PREFIX = "self"             # the publisher's own machine: a prefix of its own
OWN_CLASS = b"\x00" * 32        # no measured class: audits are compared by tolerance anyway
OWN_BENCH = 100.0               # samples/s assumed for its lease deadline


def compute_shard(model: bytes, inputs_blob: bytes, samples: int, micro_batch: int,
                  opt_level: str, provider: str) -> tuple[bytes, tuple[bytes, ...]]:
    """The outputs blob and batch digests a worker would return for this shard."""
    inputs = decode_tensors(inputs_blob)
    batches = []
    for k in range(math.ceil(samples / micro_batch)):
        part = {n: a[k * micro_batch:(k + 1) * micro_batch] for n, a in inputs.items()}
        batches.append(run_locally(model, part, opt_level, provider))
    return encode_tensors(concat_batches(batches)), tuple(tensors_digest(b) for b in batches)


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
    while True:
        await trio.sleep(interval_s)
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
                await audit_one(pub, g)


async def audit_one(pub: Any, g: S.LeaseGrant) -> None:
    meta = pub._meta[g.job_id]
    input_digest, _ka = pub._shards[g.job_id][g.shard]
    model = pub.store.get_blob(bytes.fromhex(meta["model_digest"]))
    inputs = pub.store.get_blob(input_digest)
    samples = pub.sched.jobs[g.job_id].job.samples[g.shard]
    try:
        blob, digests = await trio.to_thread.run_sync(
            compute_shard, model, inputs, samples, meta["micro_batch"], meta["opt_level"],
            meta["provider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime errors: hand the replica back
        log.warning("audit of job %s shard %d failed: %s", g.job_id.hex()[:8], g.shard, exc)
        pub._run_event(S.HandedBack(pub._now(), g.lease_id, pub.identity.public_key))
        return
    if pub.sched.leases[g.lease_id].state == "live":
        pub.take_own_result(g, blob, digests)


__all__ = ["audit_loop", "audit_one", "compute_shard", "OWN_PREFIX"]
