#!/usr/bin/env python3
"""Publisher capacity: lease grants and verified results per second per core of one publisher.

One real `Publisher` (p2pfleet/publisher/engine.py: scheduler, SQLite job store, result
checks, quorum comparison, receipts, self-audit) on a real libp2p host in this process, and
simulated workers in --procs child processes, each running --hosts real libp2p hosts (one
Ed25519 identity each, on its own 127.x.y.1 address, so every identity is its own /24
prefix as cars on different networks are). Each identity loops: signed work_request on
`lease` (free_slots = --slots) -> the lease batch -> for every lease a signed `result` on
`report` with the right outputs inline -> the receipts in the answer. The outputs are
precomputed once with onnxruntime from the job's stored shard inputs (known-answer rows
included), so the workers spend no time computing and the publisher is the bottleneck.
Workers neither fetch the model nor the inputs (blob serving is measured by bench_blob.py).

The publisher's cost is its process's CPU time (resource.getrusage of this process, where
only the publisher, its host and the bench's bookkeeping run) between the moment every
worker is connected and the job's last shard accepted. Reported: leases granted and results
verified (every result taken: checked, compared with the shard's other results, stored,
receipted) per wall second and per CPU second of the publisher; their ratio to the need of
a 10,000-car fleet with 10-minute shards (10,000 / 600 s = 16.7 results/s). --profile runs
cProfile on the publisher and lists where its time goes.

Settings: quorum 2 (every shard computed by two identities, compared, both paid), the
default recheck and audit rates; every identity counts as established (established_age_ms
0 and established_accepted 0) and workers ask again at once (request_interval_ms 0), so the
bench exercises the steady state of a large fleet, not the warm-up of a fresh one; one
hardware class (cross_class_rate 0).

    .venv/bin/python tools/bench_publisher.py             # ~1 min: 4000 shards, 2 x 20 workers
    .venv/bin/python tools/bench_publisher.py --quick     # a smoke run (~20 s)
    .venv/bin/python tools/bench_publisher.py --profile   # plus the publisher's cProfile top
    .venv/bin/python tools/bench_publisher.py --event-log # twice: without, then with the
                                                          # event log (specs/event-log.md)
JSON on stdout and in tools/bench_publisher.last.json (--out FILE); progress on stderr.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import multiprocessing as mp
import os
import pickle
import pstats
import resource
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import trio  # noqa: E402

from p2pfleet.core import scheduler as S  # noqa: E402
from p2pfleet.core import trust as T  # noqa: E402
from p2pfleet.exec.outputs import concat_batches, decode_tensors, encode_tensors, tensors_digest  # noqa: E402
from p2pfleet.identity import Identity, peer_id_from_key  # noqa: E402
from p2pfleet.net import streams  # noqa: E402
from p2pfleet.net.mesh import Mesh, MeshSettings  # noqa: E402
from p2pfleet.publisher.jobs import JobSpec, run_locally  # noqa: E402

NETWORK = "benchpub"
OUT = Path(__file__).with_suffix(".last.json")
NEED_RESULTS_PER_S = 10_000 / 600  # 10,000 cars, one 10-minute shard each
HW_CLASS = b"\x22" * 32


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def mesh_settings(addr: str) -> MeshSettings:
    return MeshSettings(network=NETWORK, listen=(f"/ip4/{addr}/tcp/0",), heartbeat_s=1.0,
                        dht_idle_timeout_s=5.0, max_connections=1024, seed=0)


def model_and_inputs(name: str, samples: int) -> tuple[bytes, str, np.ndarray]:
    from p2pfleet.zoo import MODELS

    model, input_name, gen = MODELS[name]()
    return model, input_name, gen(samples)


def precompute(pub: Any, job_id: bytes, model: bytes, micro: int) -> dict[bytes, tuple[bytes, tuple]]:
    """input digest -> (canonical outputs blob, batch digests) of every shard, computed once
    with onnxruntime as an honest worker would (micro-batch by micro-batch)."""
    out: dict[bytes, tuple[bytes, tuple]] = {}
    meta = pub._meta[job_id]
    for digest, _ka in pub._shards[job_id]:
        inputs = decode_tensors(pub.store.get_blob(digest))
        n = len(next(iter(inputs.values())))
        batches = [run_locally(model, {k: v[a:a + micro] for k, v in inputs.items()}, meta["opt_level"])
                   for a in range(0, n, micro)]
        blob = encode_tensors(concat_batches(batches))
        out[digest] = (blob, tuple(tensors_digest(b) for b in batches))
    return out


# --- the simulated workers (child processes) --------------------------------------------------
class SimWorker:
    """One worker identity on its own host: asks, reports precomputed outputs, counts."""

    def __init__(self, mesh: Mesh, publisher: str, answers: dict, slots: int):
        from p2pfleet.wire.envelope import open_envelope, seal
        from p2pfleet.wire.kinds import KINDS, LeaseBatch, Result, WorkRequest

        self.mesh, self.publisher, self.answers, self.slots = mesh, publisher, answers, slots
        self._open, self._seal, self._kinds = open_envelope, seal, KINDS
        self._LeaseBatch, self._Result, self._WorkRequest = LeaseBatch, Result, WorkRequest
        self.n = 0
        self.counts = {"requests": 0, "leases": 0, "no_work": 0, "reports": 0, "receipts": 0,
                       "errors": 0}
        self.last_error = ""
        import onnxruntime

        self.ort_version = onnxruntime.__version__

    def now_ms(self) -> int:
        return int(time.time() * 1000)

    async def request(self) -> Any:
        self.n += 1
        body = self._WorkRequest(req_id=self.n.to_bytes(16, "big"), exp=self.now_ms() + 60_000,
                                 job_id=None, hw_class=HW_CLASS, sw_version="0.1.0",
                                 ort_version=self.ort_version, bench=10_000.0, cores=2,
                                 memory_mb=4096, providers=("CPUExecutionProvider",),
                                 free_slots=self.slots)
        stream = await self.mesh.open_stream(self.publisher, "lease")
        await streams.write_envelope(stream, self._seal(body, self.mesh.identity, NETWORK))
        await stream.close_write()
        raw = await streams.read_envelope(stream, self._kinds["lease_batch"].max_body + 256, 30)
        self.counts["requests"] += 1
        return self._open(raw, NETWORK, now_ms=self.now_ms(), kinds={"lease_batch", "no_work"}).body

    async def report(self, lease: Any) -> None:
        blob, batch_digests = self.answers[lease.input_digest]
        body = self._Result(
            lease_id=lease.lease_id, exp=self.now_ms() + 3600_000, job_id=lease.job_id,
            shard=lease.shard, model_digest=lease.model_digest, input_digest=lease.input_digest,
            output_digest=hashlib.sha256(blob).digest(), output_size=len(blob),
            batch_digests=batch_digests, hw_class=HW_CLASS, ort_version=self.ort_version,
            elapsed_ms=1, energy_mwh=0, output=blob)
        stream = await self.mesh.open_stream(self.publisher, "report")
        await streams.write_envelope(stream, self._seal(body, self.mesh.identity, NETWORK))
        await stream.close_write()
        got = await streams.read_all_envelopes(stream, 2048, 64, 30)
        self.counts["reports"] += 1
        self.counts["receipts"] += len(got)

    async def loop(self, stop: trio.Event) -> None:
        while not stop.is_set():
            try:
                answer = await self.request()
                if not isinstance(answer, self._LeaseBatch):
                    self.counts["no_work"] += 1
                    key = f"no_work_{answer.reason}"
                    self.counts[key] = self.counts.get(key, 0) + 1
                    await trio.sleep(min(0.5, max(0.02, answer.retry_after_ms / 1000)))
                    continue
                self.counts["leases"] += len(answer.leases)
                async with trio.open_nursery() as n:
                    for lease in answer.leases:
                        n.start_soon(self.report, lease)
            except Exception as exc:  # noqa: BLE001 - counted and reported; the loop goes on
                self.counts["errors"] += 1
                self.last_error = repr(exc)[:200]
                await trio.sleep(0.1)


async def _on_notice(stream: Any) -> None:
    """Receipts and cancels pushed by the publisher: read and acknowledge (counted above)."""
    try:
        await streams.read_envelope(stream, 16 * 1024, 10)
    except Exception:  # noqa: BLE001
        await streams.reset_quietly(stream)
        return
    await streams.close_quietly(stream)


async def worker_process_main(proc: int, hosts: int, slots: int, pub_addr: str, pub_peer: str,
                              answers_path: str, conn: Any) -> None:
    answers = pickle.loads(Path(answers_path).read_bytes())
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        workers = []
        for i in range(hosts):
            mesh = Mesh(Identity.from_seed(f"benchpub-{proc}-{i}".encode()),
                        mesh_settings(f"127.{proc + 1}.{i + 1}.1"))
            await nursery.start(mesh.run)
            mesh.set_handler("notice", _on_notice)
            await mesh.connect(pub_addr)
            workers.append(SimWorker(mesh, pub_peer, answers, slots))
        conn.send("ready")
        await trio.to_thread.run_sync(conn.recv)  # "go"
        async with trio.open_nursery() as loops:
            for w in workers:
                loops.start_soon(w.loop, stop)
            await trio.to_thread.run_sync(conn.recv)  # "stop"
            stop.set()
            loops.cancel_scope.deadline = trio.current_time() + 5
        totals: dict[str, int] = {}
        for w in workers:
            for k, v in w.counts.items():
                totals[k] = totals.get(k, 0) + v
        totals["last_error"] = next((w.last_error for w in workers if w.last_error), "")
        conn.send(totals)
        nursery.cancel_scope.cancel()


def worker_process(*args: Any) -> None:
    trio.run(worker_process_main, *args)


# --- the publisher (this process) -------------------------------------------------------------
async def run_bench(args: argparse.Namespace, workdir: Path) -> dict:
    from p2pfleet.net.blobs import BlobService
    from p2pfleet.publisher.engine import Publisher, PublisherSettings
    from p2pfleet.store.blobcache import BlobCache

    samples = args.shards * args.shard_size
    model, input_name, x = model_and_inputs(args.model, samples)
    sched = S.SchedulerSettings(
        request_interval_ms=0, no_work_retry_ms=500, cross_class_rate=0.0, recheck_cross_rate=0.0,
        prefix_cap=10**6, max_batch=max(64, args.slots),
        trust=T.TrustSettings(established_accepted=0, established_age_ms=0,
                              established_cap=max(16, args.slots)))
    settings = PublisherSettings(scheduler=sched, announce_interval_s=5.0, tick_interval_s=1.0,
                                 event_log=workdir / "events.jsonl" if args.logging else None)
    report: dict = {}
    async with trio.open_nursery() as nursery:
        identity = Identity.from_seed(b"benchpub-publisher")
        mesh = Mesh(identity, mesh_settings("127.0.0.1"))
        await nursery.start(mesh.run)
        blobs = BlobService(mesh, BlobCache(workdir / "blobs", 256 * 1024 * 1024))
        blobs.install()
        pub = Publisher(identity, mesh, workdir / "jobs.sqlite", blobs, settings=settings)
        t0 = time.perf_counter()
        job_id = pub.submit(JobSpec(model=model, inputs={input_name: x}, shard_size=args.shard_size,
                                    micro_batch=args.micro_batch, quorum=2))
        report["submit_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        answers = precompute(pub, job_id, model, args.micro_batch)
        report["precompute_s"] = round(time.perf_counter() - t0, 2)
        answers_path = workdir / "answers.pickle"
        answers_path.write_bytes(pickle.dumps(answers))
        report["output_bytes_per_result"] = round(sum(len(b) for b, _ in answers.values()) / len(answers))

        ctx = mp.get_context("spawn")
        pub_addr = mesh.listen_addrs()[0]
        pub_peer = peer_id_from_key(identity.public_key)
        procs, conns = [], []
        for p in range(args.procs):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_process, daemon=True,
                               args=(p, args.hosts, args.slots, pub_addr, pub_peer, str(answers_path), child))
            proc.start()
            procs.append(proc)
            conns.append(parent)
        await nursery.start(pub.run)
        for c in conns:  # every worker host started and connected
            msg = await trio.to_thread.run_sync(c.recv)
            assert msg == "ready", msg
        log(f"{args.procs * args.hosts} workers connected; measuring")
        prof = cProfile.Profile(time.process_time) if args.profile else None  # CPU, not wall
        spy = None
        if args.py_spy:
            from benchlib import py_spy_record

            spy = py_spy_record(args.py_spy, os.getpid(), args.timeout, workdir / "spy.txt", rate=100)
        t0, c0 = time.perf_counter(), cpu_s()
        if prof:
            prof.enable()
        for c in conns:
            c.send("go")
        timed_out = False
        with trio.move_on_after(args.timeout) as scope:
            await pub.wait_done(job_id)
        timed_out = scope.cancelled_caught
        if prof:
            prof.disable()
        wall, cpu = time.perf_counter() - t0, cpu_s() - c0
        if spy:
            spy.send_signal(2)  # SIGINT: py-spy writes what it has sampled
            await trio.to_thread.run_sync(spy.wait)
        for c in conns:
            c.send("stop")
        worker_totals = [await trio.to_thread.run_sync(c.recv) for c in conns]
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
        st = pub.status(job_id)
        counts = pub.sched.job_counts(job_id)
        counts["worker_prefixes"] = len({l.prefix for l in pub.sched.leases.values()})
        nursery.cancel_scope.cancel()
    pub.close()
    db = sqlite3.connect(workdir / "jobs.sqlite")
    results = db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    receipts = db.execute("SELECT COUNT(*) FROM receipts").fetchone()[0]
    db.close()
    leases = pub.stats["leases_sent"]
    per_s = results / wall
    per_cpu_s = results / cpu if cpu > 0 else None
    report.update({
        "completed": st.state == "done" and not timed_out, "timed_out": timed_out,
        "shards": st.shards, "accepted": st.accepted, "failed": st.failed,
        "wall_s": round(wall, 2), "publisher_cpu_s": round(cpu, 2),
        "publisher_cpu_share": round(cpu / wall, 3),
        "leases_granted": leases, "results_verified": results, "receipts": receipts,
        "work_requests": pub.stats["requests"], "no_work_answers": pub.stats["refused"],
        "self_computed_or_audited": results - sum(w.get("reports", 0) for w in worker_totals),
        "lease_grants_per_s": round(leases / wall, 1),
        "lease_grants_per_cpu_s": round(leases / cpu, 1) if cpu > 0 else None,
        "results_per_s": round(per_s, 1),
        "results_per_cpu_s": round(per_cpu_s, 1) if per_cpu_s else None,
        "need_results_per_s": round(NEED_RESULTS_PER_S, 1),
        "ratio_vs_need_per_cpu_s": round(per_cpu_s / NEED_RESULTS_PER_S, 2) if per_cpu_s else None,
        "ratio_vs_need_wall": round(per_s / NEED_RESULTS_PER_S, 2),
        "target_ratio": 10.0,
        "met": bool(per_cpu_s and per_cpu_s >= 10 * NEED_RESULTS_PER_S),
        "scheduler_counts": counts, "workers": worker_totals,
    })
    if prof:
        buf = io.StringIO()
        ps = pstats.Stats(prof, stream=buf)
        ps.sort_stats("tottime").print_stats(25)
        report["profile_tottime_top25"] = _profile_rows(ps, "tottime", 25)
        report["profile_cumulative_top25"] = _profile_rows(ps, "cumulative", 25)
        (workdir / "profile.txt").write_text(buf.getvalue())
    if args.py_spy and (workdir / "spy.txt").exists():
        from benchlib import py_spy_summary

        report["py_spy"] = py_spy_summary(workdir / "spy.txt", rate=100, top=25)
    return report


def _profile_rows(ps: pstats.Stats, key: str, n: int) -> list[dict]:
    rows = []
    stats = ps.stats  # type: ignore[attr-defined]
    idx = {"tottime": 2, "cumulative": 3}[key]
    for (path, line, fn), (_cc, ncalls, tt, ct, _callers) in sorted(
            stats.items(), key=lambda kv: kv[1][idx], reverse=True)[:n]:
        short = path.split("site-packages/")[-1].split("/main/")[-1]
        rows.append({"fn": f"{short}:{line}:{fn}", "calls": ncalls, "tottime_s": round(tt, 3),
                     "cumtime_s": round(ct, 3)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: 600 shards, 2 x 10 workers")
    ap.add_argument("--model", default="small", help="zoo model (default: small, 32-64-10)")
    ap.add_argument("--shards", type=int, default=4000)
    ap.add_argument("--shard-size", type=int, default=8, help="samples per shard")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--procs", type=int, default=2, help="worker processes")
    ap.add_argument("--hosts", type=int, default=20, help="worker hosts (identities) per process")
    ap.add_argument("--slots", type=int, default=4, help="free_slots per work request")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--profile", action="store_true",
                    help="cProfile the publisher (CPU time; slows it about 3x)")
    ap.add_argument("--py-spy", default=None, metavar="PATH",
                    help="sample the publisher with this py-spy (little overhead)")
    ap.add_argument("--event-log", action="store_true",
                    help="run twice, without and then with the publisher's event log, and "
                         "report the ratio of results per publisher CPU second")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    args.logging = False
    if args.quick:
        args.shards, args.hosts = min(args.shards, 600), min(args.hosts, 10)
    from benchlib import machine_info  # tools/benchlib.py

    result: dict = {"benchmark": "publisher", "quick": args.quick, "machine": machine_info(),
                    "load_avg_1m_before": round(os.getloadavg()[0], 2),
                    "config": {k: v for k, v in vars(args).items() if k != "out"} | {"out": str(args.out)},
                    "method": __doc__.split("\n\n")[1].replace("\n", " ")}
    with tempfile.TemporaryDirectory(prefix="bench-publisher-") as d:
        result.update(trio.run(run_bench, args, Path(d)))
    if args.event_log:  # the baseline above, then the same run with the log on
        with tempfile.TemporaryDirectory(prefix="bench-publisher-") as d:
            args.logging = True
            logged = trio.run(run_bench, args, Path(d))
            events = Path(d) / "events.jsonl"
            off, on = result["results_per_cpu_s"], logged["results_per_cpu_s"]
            result["event_log"] = {
                "results_per_cpu_s_without": off, "results_per_cpu_s_with": on,
                "ratio_with_to_without": round(on / off, 3) if off else None,
                "completed": logged["completed"], "lines": sum(1 for _ in events.open()),
                "bytes": events.stat().st_size}
    result["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    text = json.dumps(result, indent=1, default=str)
    print(text)
    args.out.write_text(text + "\n")
    log(f"results/s {result['results_per_s']} wall, {result['results_per_cpu_s']} per publisher CPU s "
        f"({result['ratio_vs_need_per_cpu_s']}x the 16.7/s need); lease grants/s per CPU s "
        f"{result['lease_grants_per_cpu_s']}")
    return 0 if result["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
