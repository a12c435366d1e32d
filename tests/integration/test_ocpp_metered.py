"""Metered energy from a charger (issue 17, item 4): the node's real Worker, the real
publisher engine, a real sandbox pool and ledger on real py-libp2p hosts, with the OCPP
provider's meter fed by a simulated charge point over a real websocket.

A reading that arrives while the shard computes with the car full (SuspendedEV) is the
shard's energy in the ledger, marked metered; a shard during which the charger saw nothing
(the car ran the computer from its battery) is estimated. No timing is asserted: the test
sends the reading once the worker says the shard runs, on shards that compute for a while."""

from __future__ import annotations

from contextlib import asynccontextmanager

import numpy as np
import trio

from fleetkit import wait_until
from ocppkit import SimCharger
from p2pfleet.exec.sandbox import SandboxConfig, open_sandbox_pool
from p2pfleet.live.worker import Worker, WorkerSettings
from p2pfleet.net.blobs import BlobService
from p2pfleet.publisher import JobSpec
from p2pfleet.store.blobcache import BlobCache
from p2pfleet.store.ledger import Ledger
from p2pfleet.vehicle.ocpp import OcppProvider, OcppSettings
from p2pfleet.vehicle.providers import StaticProvider
from test_hostile_providers import NETWORK, heard_jobs, meshes, offer, publisher
from workerkit import mlp_model

MiB = 2**20
WAIT_S = 90
# one shard of 2048 samples through a 512-4096-8 MLP computes for a while (~9 GFLOP)
INPUTS = {"x": np.random.default_rng(4).standard_normal((2048, 512)).astype(np.float32)}


@asynccontextmanager
async def metered_worker(mesh, tmp_path, publishers, provider):
    cache = BlobCache(tmp_path / "worker-blobs", 64 * MiB)
    async with open_sandbox_pool(SandboxConfig(memory_mb=1024)) as pool:
        ws = WorkerSettings(network=NETWORK, allow=publishers, retry_base_s=1.0,
                            backoff_base_s=1.0)

        def meter():  # as node.py reads it
            state = provider.state_at(provider.clock())
            return None if state is None else state.charger_energy_wh

        ledger = Ledger(tmp_path / "ledger.sqlite")
        worker = Worker(mesh.identity, ws, ledger, cache, pool, offer=offer, meter=meter,
                        meter_min_share=provider.meter_min_share)
        blobs = BlobService(mesh, cache, authorize=worker.authorize_blob,
                            scores=worker.source_scores)
        blobs.install()
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run, mesh, blobs, heard_jobs(mesh))
            worker.allow(1, 1.0)
            try:
                yield worker, ledger
            finally:
                nursery.cancel_scope.cancel()


def energy(ledger: Ledger, pub_key: bytes) -> tuple[int, int]:
    import time

    (s,) = [s for s in ledger.summary(int(time.time() * 1000)) if s.publisher == pub_key]
    return s.metered_mwh, s.estimated_mwh


async def do(fn, *args, **kw):
    return await trio.to_thread.run_sync(lambda: fn(*args, **kw))


async def test_a_full_cars_draw_during_a_shard_is_its_metered_energy(tmp_path):
    model = mlp_model(seed=6, n_in=512, hidden=4096, n_out=8)
    spec = JobSpec(model=model, inputs=INPUTS, shard_size=2048, micro_batch=256, quorum=1,
                   recheck_rate=0.0, audit_rate=0.0, known_answer_rate=0.0)
    base = StaticProvider.from_config({"charge_limit_pct": 80.0, "metered": False})
    provider = OcppProvider(OcppSettings(charge_point_ids=("CP1",), port=0), base)
    async with trio.open_nursery() as outer:
        host, port = await outer.start(provider.run)
        charger = SimCharger(f"ws://{host}:{port}", "CP1")
        await do(charger.connect)
        tx = await do(charger.start_transaction, 50_000)
        await do(charger.status, "SuspendedEV")
        await do(charger.meter, tx, wh=52_000)            # the first reading while full
        assert provider.state_at(provider.clock()).charger_energy_wh == 0.0
        async with meshes(2) as (pm, wm):
            async with publisher(pm, tmp_path, wm.identity.public_key) as pub, \
                    metered_worker(wm, tmp_path, (pm.identity.public_key,), provider) as (
                        worker, ledger):
                key = pm.identity.public_key
                job = pub.submit(spec)
                await wait_until(lambda: worker.running, timeout=WAIT_S)
                await do(charger.meter, tx, wh=52_007.25)  # the car drew 7.25 Wh meanwhile
                await wait_until(lambda: pub.status(job).accepted == 1, timeout=WAIT_S)
                assert energy(ledger, key) == (7250, 0)

                # the charger sees nothing during the next shard: the computer ran from the
                # battery, so that shard's energy is estimated
                job2 = pub.submit(spec)
                await wait_until(lambda: pub.status(job2).accepted == 1, timeout=WAIT_S)
                metered, estimated = energy(ledger, key)
                assert metered == 7250 and estimated > 0
        await do(charger.close)
        outer.cancel_scope.cancel()
