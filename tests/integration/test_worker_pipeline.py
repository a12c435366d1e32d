"""The worker pipelines (issue 13, item 3): the node's real Worker, the real publisher engine
and a real sandbox pool on real py-libp2p hosts.

While one shard computes the worker already holds the next lease and fetches its blobs (its
timeline and stats say so); a queued lease its publisher cancels is dropped with its fetched
input, and a halt hands queued, unstarted leases back with the running one. No timing is
asserted: only the order of the worker's own steps, with shards that compute for a while."""

from __future__ import annotations

import numpy as np

from p2pfleet.publisher import JobSpec

from fleetkit import wait_until
from test_hostile_providers import meshes, node_worker, publisher
from workerkit import mlp_model

WAIT_S = 90
# 4 shards of 2048 samples through a 512-4096-8 MLP: each shard computes for a while (about
# 9 GFLOP), longer than its 4 MiB input takes over loopback
INPUTS = {"x": np.random.default_rng(3).standard_normal((4 * 2048, 512)).astype(np.float32)}


def spec(model: bytes) -> JobSpec:
    return JobSpec(model=model, inputs=INPUTS, shard_size=2048, micro_batch=256, quorum=1,
                   recheck_rate=0.0, audit_rate=0.0, known_answer_rate=0.0)


def steps(worker, what: str) -> dict[bytes, float]:
    """lease id -> when the worker first marked `what` for it."""
    out: dict[bytes, float] = {}
    for t, w, lease_id in worker.timeline:
        if w.startswith(what):
            out.setdefault(lease_id, t)
    return out


async def test_the_next_input_is_fetched_while_the_current_shard_computes(tmp_path):
    model = mlp_model(seed=5, n_in=512, hidden=4096, n_out=8)
    async with meshes(2) as (pm, wm):
        async with publisher(pm, tmp_path, wm.identity.public_key) as pub, \
                node_worker(wm, tmp_path, (pm.identity.public_key,)) as (worker, _blobs):
            job = pub.submit(spec(model))
            await wait_until(lambda: pub.status(job).accepted == 4, timeout=WAIT_S)
            started, computed = steps(worker, "started"), steps(worker, "computed")
            fetch_started, fetched = steps(worker, "fetch started"), steps(worker, "fetched")
            order = sorted(started, key=started.get)
            assert len(order) == 4, worker.timeline
            # the second lease was held and its fetch under way before the first one ended
            # (later ones too when a shard computes for longer than a request takes)
            assert fetch_started[order[1]] < computed[order[0]], worker.timeline
            # and for some shard its blobs were all in before the shard before it finished
            assert any(fetched[nxt] < computed[cur] for cur, nxt in zip(order, order[1:])), \
                worker.timeline
            assert worker.stats.prefetched >= 1
            assert worker.stats.shards_done == 4
            # a prefetched lease of the same model takes the bytes already checked
            assert worker.stats.model_reused >= 1
            # the publisher's sandbox child, started ahead while the first blobs were
            # fetched, is the one every shard ran in (never a second start beside it)
            assert (await worker.pool.get(pm.identity.public_key)).starts == 1


async def test_a_cancelled_queued_lease_drops_its_input_and_a_halt_hands_queued_leases_back(
        tmp_path):
    model = mlp_model(seed=6, n_in=512, hidden=4096, n_out=8)
    async with meshes(2) as (pm, wm):
        async with publisher(pm, tmp_path, wm.identity.public_key) as pub, \
                node_worker(wm, tmp_path, (pm.identity.public_key,)) as (worker, _blobs):
            cache = worker.cache
            job = pub.submit(spec(model))
            # one shard computing, the next one's input fetched and waiting
            await wait_until(lambda: worker.running and worker.queue and
                             worker.queue[0].fetched.is_set(), timeout=WAIT_S)
            queued = worker.queue[0].lease
            assert cache.has(queued.input_digest)
            pub.cancel(job)
            await wait_until(lambda: worker.stats.dropped >= 1, timeout=WAIT_S)
            assert not cache.has(queued.input_digest)  # the space is free again
            assert worker.ledger.lease(queued.lease_id).status == "cancelled"
            await wait_until(lambda: not worker.running, timeout=WAIT_S)

            second = pub.submit(spec(model))
            await wait_until(lambda: worker.running and worker.queue, timeout=WAIT_S)
            queued = [q.lease for q in worker.queue]
            running = list(worker.running)
            await worker.halt("unplugged", hand_back=True)
            assert not worker.queue and not worker.running
            for lease in queued:
                assert worker.ledger.lease(lease.lease_id).status == "handed_back"
                assert not cache.has(lease.input_digest)
            for lease_id in running:
                assert worker.ledger.lease(lease_id).status in ("handed_back", "done")
            # the publisher gets them back (the outbox delivers hand-backs at once)
            await wait_until(lambda: pub.status(second).live == 0, timeout=WAIT_S)
