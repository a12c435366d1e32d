"""The node's work loop (p2pfleet/live/worker.py) answering `notice` streams on a real mesh.

Issue 12, class 7: a `cancel` or `receipt` from anyone but the publisher of the leases it
names is dropped without an acknowledgement, penalised, and leaves no trace in the node's
state; cancels from the real publisher change only the leases it issued to this node.
The node is a real `Worker` with a real ledger and blob service; the publisher and the
stranger are real meshes that seal real envelopes.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import trio

from p2pfleet.core.reputation import Reputation
from p2pfleet.identity import Identity
from p2pfleet.net import streams
from p2pfleet.net.blobs import BlobService
from p2pfleet.net.mesh import Mesh, MeshError
from p2pfleet.store.blobcache import BlobCache
from p2pfleet.store.ledger import Ledger
from p2pfleet.wire.envelope import open_envelope, seal
from p2pfleet.wire.kinds import Cancel, LeaseBatch, Receipt
from p2pfleet.wire.samples import sample_body
from p2pfleet.live.worker import Worker, WorkerSettings

from fleetkit import NETWORK, fleet

JOB = b"J" * 16
LEDGER_TABLES = ("lease_batches", "leases", "outbox", "receipts", "energy")


def now_ms() -> int:
    return int(time.time() * 1000)


def offer() -> dict:
    return {"hw_class": b"\x11" * 32, "ort_version": "1.0", "bench": 1.0, "cores": 1,
            "memory_mb": 1024, "providers": ("CPUExecutionProvider",)}


def held_state(worker: Worker) -> dict[str, int]:
    """How much the node keeps: the size of every container the worker holds, and the rows
    of every ledger table."""
    sizes = {name: len(value) for name, value in vars(worker).items()
             if isinstance(value, (dict, set, frozenset, list, tuple))}
    for table in LEDGER_TABLES:
        sizes[f"ledger.{table}"] = worker.ledger.conn.execute(
            f"SELECT count(*) FROM {table}").fetchone()[0]
    return sizes


def statuses(ledger: Ledger) -> dict[bytes, str]:
    return {bytes(i): s for i, s in ledger.conn.execute("SELECT lease_id, status FROM leases")}


async def notice(sender: Mesh, to: str, envelope: bytes) -> bool:
    """Send one notice as a publisher does; True if it was acknowledged (a clean close)."""
    try:
        stream = await sender.open_stream(to, "notice", timeout=5.0)
    except MeshError:
        return False  # refused at the door (a banned peer cannot connect)
    try:
        await streams.write_envelope(stream, envelope, timeout=5.0)
        await stream.close_write()
        await streams.read_envelope(stream, 1024, 5.0)
    except streams.StreamClosed:
        return True
    except Exception:  # noqa: BLE001 - a reset or a failed write: not acknowledged
        return False
    await streams.reset_quietly(stream)
    return False


async def run_worker(nursery: trio.Nursery, mesh: Mesh, tmp_path) -> Worker:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    cache = BlobCache(tmp_path / "blobs", 64 * 1024 * 1024)
    worker = Worker(mesh.identity, WorkerSettings(network=NETWORK, serve_anyone=True), ledger,
                    cache, None, offer=offer)
    blobs = BlobService(mesh, cache, authorize=worker.authorize_blob)
    blobs.install()
    await nursery.start(worker.run, mesh, blobs, lambda: [])
    return worker


def hold_leases(ledger: Ledger, publisher: Identity, worker_key: bytes, n: int) -> list[bytes]:
    """The node holds `n` queued leases of JOB from `publisher` (a real signed batch)."""
    base = sample_body("lease_batch").leases[0]
    leases = tuple(dataclasses.replace(base, lease_id=os.urandom(16), job_id=JOB, shard=i)
                   for i in range(n))
    body = LeaseBatch(req_id=os.urandom(16), exp=now_ms() + 60_000, worker=worker_key,
                      leases=leases)
    ledger.add_leases(publisher.public_key, open_envelope(seal(body, publisher, NETWORK), NETWORK),
                      now_ms())
    return [lease.lease_id for lease in leases]


async def test_a_strangers_thousand_cancels_are_refused_penalised_and_keep_nothing(tmp_path):
    async with fleet(3) as (node, stranger, publisher):
        async with trio.open_nursery() as nursery:
            worker = await run_worker(nursery, node, tmp_path)
            held = hold_leases(worker.ledger, publisher.identity, node.identity.public_key, 2)
            before, held_before = held_state(worker), statuses(worker.ledger)
            # No ban at 100 points: every one of the 1000 must reach the node's handler.
            node.reputation = Reputation(ban_threshold=float("inf"))
            acked = 0
            for i in range(1000):
                if i % 10 == 9:  # a receipt now and then, for a lease the node holds
                    body: Any = Receipt(held[0], JOB, 0, node.identity.public_key, b"d" * 32,
                                        10**6, now_ms())
                elif i % 10 == 8:  # the real lease ids, the real job: still not its leases
                    body = Cancel(JOB, now_ms() + 60_000, tuple(held), "stranger")
                else:
                    body = Cancel(os.urandom(16), now_ms() + 60_000,
                                  tuple(os.urandom(16) for _ in range(256)), "stranger")
                acked += await notice(stranger, node.identity.peer_id,
                                      seal(body, stranger.identity, NETWORK))
            assert acked == 0, f"{acked} of 1000 notices from a stranger were acknowledged"
            assert held_state(worker) == before
            assert statuses(worker.ledger) == held_before  # its leases still run
            # each one cost it `invalid-message` (10 points; half-life 10 min)
            assert node.reputation.penalty(stranger.identity.peer_id, node.clock()) > 5000
            nursery.cancel_scope.cancel()
        worker.ledger.close()


async def test_the_publishers_cancels_touch_only_the_leases_it_issued(tmp_path):
    async with fleet(3) as (node, other, publisher):
        async with trio.open_nursery() as nursery:
            worker = await run_worker(nursery, node, tmp_path)
            pub = publisher.identity
            mine = hold_leases(worker.ledger, pub, node.identity.public_key, 3)
            theirs = hold_leases(worker.ledger, other.identity, node.identity.public_key, 1)
            worker.ledger.set_status(mine[2], "done", now_ms())
            before = held_state(worker)
            # many cancels naming one of its leases among 255 it never issued to us
            for _ in range(300):
                junk = tuple(os.urandom(16) for _ in range(255))
                body = Cancel(JOB, now_ms() + 60_000, (mine[0], *junk), "shard decided")
                assert await notice(publisher, node.identity.peer_id, seal(body, pub, NETWORK))
            assert held_state(worker) == before
            got = statuses(worker.ledger)
            assert got[mine[0]] == "cancelled" and got[mine[1]] == "queued"
            # a finished lease stays finished; the cancel is acknowledged all the same
            assert await notice(publisher, node.identity.peer_id,
                                seal(Cancel(JOB, now_ms() + 60_000, (mine[2],), "late"), pub,
                                     NETWORK))
            # the whole job: its queued leases only, not another publisher's lease of it
            assert await notice(publisher, node.identity.peer_id,
                                seal(Cancel(JOB, now_ms() + 60_000, (), "job cancelled"), pub,
                                     NETWORK))
            got = statuses(worker.ledger)
            assert [got[i] for i in mine] == ["cancelled", "cancelled", "done"]
            assert got[theirs[0]] == "queued"
            assert held_state(worker) == before
            assert node.reputation.penalty(publisher.identity.peer_id, node.clock()) == 0
            nursery.cancel_scope.cancel()
        worker.ledger.close()
