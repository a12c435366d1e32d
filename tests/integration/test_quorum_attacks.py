"""Attacks on the quorum from specs/ alone, against a real publisher on real libp2p hosts.

Issue 12, classes 1 and 2, written as an attacker reads specs/work-and-leases.md, section 4:
the replica rules (one replica per peer and per /24, at most one non-established identity)
are promises about the *quorum*, so a cheap adversary plays the gaps between issue time and
result time:

- lease-expiry game: A1, a fresh key, takes a replica, fetches its input and stays silent
  until its lease expires; A2, another fresh key on the same /24, asks for the reissued
  replica; both report the same wrong output (A1's late). Nothing wrong may be accepted,
  and the honest worker's trust is never reset by them;
- throwaway identities: ten fresh keys on one address take leases and report `failed`, to
  push shards over `max_error`. The job must still complete.

Each host listens on its own loopback address; the attackers share 127.0.9.0/24 (seed:
fixed identities from `Identity.from_seed`, job inputs from numpy seed 5).
"""

from __future__ import annotations

import numpy as np
import trio

from p2pfleet.net.blobs import BlobService
from p2pfleet.net.mesh import Mesh
from p2pfleet.publisher import Publisher
from p2pfleet.store.blobcache import BlobCache
from p2pfleet.wire.envelope import seal
from p2pfleet.wire.kinds import FailedResult, LeaseBatch

from fleetkit import NETWORK, hosts, wait_until
from test_publisher import assert_matches_local, finish, keep_working, pub_settings, spec
from workerkit import TestWorker

ATTACKER_NET = "127.0.9"


def quorum_hosts(addresses: list[str]):
    return hosts(addresses, "quorum-attack")


def publisher(pm: Mesh, tmp_path, trusted, **sched) -> Publisher:
    blobs = BlobService(pm, BlobCache(tmp_path / "pub-blobs", 64 * 1024 * 1024))
    blobs.install()
    return Publisher(pm.identity, pm, tmp_path / "jobs.sqlite", blobs,
                     settings=pub_settings(trusted, **sched))


async def test_lease_expiry_game_in_one_prefix_gets_nothing_wrong_accepted(tmp_path):
    addrs = ["127.0.0.1", "127.0.1.1", "127.0.2.1", f"{ATTACKER_NET}.1", f"{ATTACKER_NET}.2"]
    async with quorum_hosts(addrs) as (pm, tm, hm, a1m, a2m):
        honest = TestWorker.start(tm, tmp_path / "t")
        second = TestWorker.start(hm, tmp_path / "h")
        a1 = TestWorker.start(a1m, tmp_path / "a1", cheat="fp16")
        a2 = TestWorker.start(a2m, tmp_path / "a2", cheat="fp16")
        # Known answers off, so only the quorum rules stand between the attackers and the
        # user (a wrong row escapes one known-answer row with probability 30/31 anyway).
        pub = publisher(pm, tmp_path, {tm.identity.public_key, hm.identity.public_key},
                        min_deadline_ms=1500, grace_min_ms=500, fresh_need_known_answer=False)
        pid = pm.identity.peer_id
        async with trio.open_nursery() as nursery:
            await nursery.start(pub.run)
            job = pub.submit(spec(inputs={"x": spec().inputs["x"][:30]}, known_answer_rate=0.0,
                                  recheck_rate=0.0, audit_rate=0.0))
            first = await a1.request(pid)
            assert isinstance(first, LeaseBatch)
            [lease1] = first.leases
            late = await a1.compute(pid, lease1)   # input fetched while the lease is live
            [lease_t] = (await honest.request(pid)).leases
            await honest.report(pid, await honest.compute(pid, lease_t))
            await wait_until(lambda: pub.sched.leases[lease1.lease_id].state == "expired",
                             timeout=20)
            answer = await a2.request(pid)
            if isinstance(answer, LeaseBatch):     # the old publisher gave A2 the replica
                for lease in answer.leases:
                    await a2.report(pid, await a2.compute(pid, lease))
            await a1.report(pid, late)
            done = lambda: pub.status(job).state != "live"  # noqa: E731
            nursery.start_soon(keep_working, second, pid, done)
            st = await finish(pub, job, [honest, second])
            assert st.accepted == 1
            assert_matches_local_rows(pub.outputs(job))
            attackers = {a1m.identity.public_key, a2m.identity.public_key}
            leases = pub.sched.shard_leases(job, 0)
            assert not [l for l in leases if l.worker in attackers and l.verdict == "valid"]
            assert not [r for w in (a1, a2) for r in w.receipts]  # nothing paid to them
            t = pub.sched.trust_of(tm.identity.public_key)
            assert t.reset_ms is None and t.streak >= 1   # the honest result was not outvoted
            nursery.cancel_scope.cancel()
        pub.close()


def assert_matches_local_rows(outputs: dict) -> None:
    from p2pfleet.publisher.jobs import run_locally
    from test_publisher import MODEL

    ref = run_locally(MODEL, {"x": spec().inputs["x"][:30]}, "all")["y"]
    assert outputs["y"].shape == ref.shape
    assert np.array_equal(outputs["y"], ref)  # the honest class's exact output


async def test_throwaway_identities_on_one_address_cannot_fail_a_job(tmp_path):
    addrs = ["127.0.0.1", "127.0.1.1", "127.0.2.1"] + [f"{ATTACKER_NET}.1"] * 10
    async with quorum_hosts(addrs) as (pm, tm, hm, *swarm):
        workers = [TestWorker.start(tm, tmp_path / "t"), TestWorker.start(hm, tmp_path / "h")]
        pub = publisher(pm, tmp_path, {tm.identity.public_key, hm.identity.public_key})
        pid = pm.identity.peer_id
        async with trio.open_nursery() as nursery:
            await nursery.start(pub.run)
            job = pub.submit(spec(recheck_rate=0.0, audit_rate=0.0))  # 4 shards, max_error 3
            failed = 0
            for round_ in range(3):
                for i, m in enumerate(swarm):
                    w = TestWorker(m, None)
                    answer = await w.request(pid, free_slots=2)
                    if not isinstance(answer, LeaseBatch):
                        continue
                    for lease in answer.leases:
                        env = seal(FailedResult(lease.lease_id, w.now_ms() + 60_000, "crash",
                                                "throwaway"), m.identity, NETWORK)
                        await w.report(pid, env)
                        failed += 1
            assert failed >= 1  # the attack did run
            assert all(sh.errors <= 1 and sh.status == "open" for sh in pub.sched.shards.values())
            done = lambda: pub.status(job).state != "live"  # noqa: E731
            for w in workers:
                nursery.start_soon(keep_working, w, pid, done)
            st = await finish(pub, job, workers)
            assert st.accepted == 4 and st.failed == 0
            assert_matches_local(pub.outputs(job))
            nursery.cancel_scope.cancel()
        pub.close()


async def test_colluding_established_identities_are_caught_by_the_publishers_own_audits(tmp_path):
    """Issue 12, class 4: two colluders in two /24s, established, report the same wrong
    outputs (fp16 weights) on every shard; the publisher has no trusted workers and audits
    shards itself (every shard here, so the test does not depend on which shards the
    colluders draw; reopening after an exclusion and the audit rate are covered by
    tests/unit/test_scheduler.py and the scheduler simulation). Nothing wrong is accepted,
    both are excluded with `wrong_result` evidence, and the job completes with the honest
    outputs. Fails on a publisher without audits: the colluders' quorum is accepted."""
    import random

    from p2pfleet.core import trust as T
    from p2pfleet.wire.envelope import open_envelope

    addrs = ["127.0.0.1", "127.0.1.1", "127.0.2.1", "127.0.3.1", "127.0.4.1"]
    async with quorum_hosts(addrs) as (pm, h1m, h2m, c1m, c2m):
        honest = [TestWorker.start(h1m, tmp_path / "h1"), TestWorker.start(h2m, tmp_path / "h2")]
        colluders = [TestWorker.start(c1m, tmp_path / "c1", cheat="fp16"),
                     TestWorker.start(c2m, tmp_path / "c2", cheat="fp16")]
        blobs = BlobService(pm, BlobCache(tmp_path / "pub-blobs", 64 * 1024 * 1024))
        blobs.install()
        settings = pub_settings()
        quick = T.TrustSettings(established_accepted=0, established_age_ms=0)  # demo settings
        settings = type(settings)(**{**settings.__dict__, "scheduler": type(settings.scheduler)(
            **{**settings.scheduler.__dict__, "trust": quick})})
        pub = Publisher(pm.identity, pm, tmp_path / "jobs.sqlite", blobs, settings=settings,
                        rng=random.Random(12))
        pid = pm.identity.peer_id
        async with trio.open_nursery() as nursery:
            await nursery.start(pub.run)
            job = pub.submit(spec(known_answer_rate=0.0, recheck_rate=0.0, audit_rate=1.0))
            done = lambda: pub.status(job).state != "live"  # noqa: E731
            for w in colluders:  # the colluders ask first and get the first replicas
                nursery.start_soon(keep_working, w, pid, done)
            await wait_until(lambda: all(w.results for w in colluders), timeout=20)
            for w in honest:
                nursery.start_soon(keep_working, w, pid, done)
            st = await finish(pub, job, honest + colluders, timeout=60)
            assert st.accepted == 4 and st.failed == 0
            assert_matches_local(pub.outputs(job))
            bad = {c1m.identity.public_key, c2m.identity.public_key}
            claims = {accused: claim for accused, claim, _env in pub.store.evidence(job)}
            assert claims == {k: "wrong_result" for k in bad}
            for accused, _claim, env in pub.store.evidence(job):
                proof = open_envelope(open_envelope(env, NETWORK).body.proofs[0], NETWORK)
                assert proof.signer == accused and proof.kind == "result"
            for i in range(4):  # every accepted shard's quorum holds the publisher's audit
                accepted = pub.sched.leases[pub.sched.shards[(job, i)].accepted_lease]
                assert accepted.worker not in bad
            nursery.cancel_scope.cancel()
        pub.close()
