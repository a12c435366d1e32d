"""The SDK's `Job.results()` on an embedded publisher (`sdk.connect`), real hosts and workers:
verified shards stream in input order while the job runs, and a finished job's results come
again, identical, from the store after a restart (its records are no longer in memory:
work-and-leases.md, section 8)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import trio

from p2pfleet.identity import Identity
from p2pfleet.net.mesh import Mesh
from p2pfleet.sdk.client import connect

from fleetkit import NETWORK, settings
from test_publisher import INPUTS, MODEL, assert_matches_local, keep_working, pub_settings
from workerkit import TestWorker


async def test_results_stream_in_input_order_and_again_from_the_store_after_a_restart(tmp_path):
    async with trio.open_nursery() as nursery:
        workers = []
        for i in (1, 2):  # one /24 each: one replica per prefix
            mesh = Mesh(Identity.from_seed(f"sdk-worker-{i}".encode()),
                        settings(i, listen=(f"/ip4/127.0.{i}.1/tcp/0",)))
            await nursery.start(mesh.run)
            workers.append(TestWorker.start(mesh, tmp_path / f"w{i}"))
        trusted = [w.mesh.identity.peer_id for w in workers]
        pub_dir = tmp_path / "pub"
        opts = dict(network=NETWORK, listen=("/ip4/127.0.0.1/tcp/0",), trusted=trusted,
                    settings=replace(pub_settings(), forget_ended_after_s=0.3))
        async with connect(pub_dir, **opts) as client:
            for w in workers:
                await w.mesh.connect(client.listen_addrs()[0])
            job = await client.submit(MODEL, INPUTS, shard_size=30, micro_batch=8, quorum=2,
                                      recheck_rate=0.0, audit_rate=0.0)
            done = job.finished
            async with trio.open_nursery() as work:
                for w in workers:
                    work.start_soon(keep_working, w, client.peer_id, done)
                with trio.fail_after(60):
                    first = [r async for r in job.results()]
            assert [r.shard for r in first] == [0, 1, 2, 3]
            outputs = {"y": np.concatenate([r.outputs["y"] for r in first])}
            assert_matches_local(outputs)
            # once forgotten, the job is read from the store
            await _until(lambda: job.job_id not in client.publisher.sched.jobs)
            again = [r async for r in job.results()]
            assert [(r.shard, r.rows) for r in again] == [(r.shard, r.rows) for r in first]
        async with connect(pub_dir, **opts) as client:
            assert client.publisher.sched.jobs == {}  # a restart loads no ended job
            after = [r async for r in client.job(job.id).results(order="completed")]
            assert [r.shard for r in after] == [0, 1, 2, 3]
            for old, new in zip(first, after):
                assert np.array_equal(old.outputs["y"], new.outputs["y"])
        nursery.cancel_scope.cancel()


async def _until(predicate, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.05)
