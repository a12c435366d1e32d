#!/usr/bin/env python3
"""Benchmark the DHT at more hosts than k: many real mesh hosts per process, on loopback.

The controller starts P worker processes of H `Mesh` hosts each (default 10 x 20 = 200;
py-libp2p hosts over TCP, host j of worker w listens on 127.0.<w+1>.<j+1>), after
--bootstrap workers of one bootstrap host each (the first alone, each next one through the
ones before it), as bootstrap nodes run on machines of their own. Every other host joins
through them at once, as a fleet starting together. Each host
publishes its signed capacity record as soon as it joined (its routing table filled:
`Mesh.table_ready`). Then it measures, from outside the hosts' code paths:

1. joining: time to the first peer and to `table_ready`, copies stored by the put at join,
   routing-table size, hosts that had no peer after 30 s;
2. lookups with all hosts up: a seeded random sample of (reader, target) pairs, each a
   `Mesh.get_capacity` walk: success (the target's record found and verified), rounds
   (hops), RPCs, latency p50/p99;
3. the same after killing --kill-share of the non-bootstrap hosts (their meshes cancelled,
   connections closed, nothing said): survivors look up every host's record, the killed
   ones' included (they live on replicas).

JSON goes to stdout and tools/bench_dht.last.json (--out to change), with the load average
at each step (a shared 2-core machine is noisy); progress to stderr.

Diagnostics (environment): BENCH_DHT_DIALS=1 adds, per phase, new dials and connection ends
by cause (`dials_by_caller`), GET_VALUE requests by outcome, by where a timeout caught them
(getting a stream, negotiating it, waiting for the answer) and by whether a connection was
open, pooled or dialled (`get_value_s`: count, p50, p90, p99 s), where the workers' tasks
were suspended at the phase's end (`task_waits`; whole chains go to the worker logs) and
the yamux stream slots left per connection. BENCH_DHT_GC=freeze makes each worker collect
and freeze its heap at every status (gc.freeze): 20 hosts share one process here, so a full
collection walks 20 hosts' objects at once (3-5 s pauses on a starved core), which a car
running one host never does.

    tools/bench_dht.py                          # 10 x 20 hosts
    tools/bench_dht.py --procs 4 --hosts 10 --lookups 200   # a smaller run
    tools/bench_dht.py --fixes old              # without fixes 18 and 19, as a baseline
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tools"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import benchlib as B  # noqa: E402

NETWORK = "benchdht"
TARGET_ALL_UP = 1.0
TARGET_KILLED = 0.99
_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[bench_dht {time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --- worker: H meshes in one trio process, driven by JSON lines on stdin ---------------------
async def worker(args: argparse.Namespace) -> None:
    import trio

    from p2pfleet.identity import Identity
    from p2pfleet.net.mesh import Mesh, MeshSettings
    from p2pfleet.wire.envelope import seal
    from p2pfleet.wire.kinds import Capacity

    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    logging.getLogger("p2pfleet").setLevel(logging.WARNING)  # bans, into the worker's log
    if os.environ.get("BENCH_DHT_DEBUG"):
        for entry in os.environ["BENCH_DHT_DEBUG"].split(","):  # logger[:LEVEL]
            name, _, level = entry.partition(":")
            logging.getLogger(name).setLevel(level.upper() or logging.DEBUG)
    w = args.worker_index
    hosts: list[dict[str, Any]] = []
    dialled: Counter[str] = Counter()  # BENCH_DHT_DIALS: who dials new connections
    rpc_times: dict[str, list[float]] = {}  # BENCH_DHT_DIALS: GET_VALUE durations by outcome
    if os.environ.get("BENCH_DHT_DIALS"):
        import traceback

        from libp2p.network.swarm import Swarm
        dial = Swarm.dial_peer

        def callers() -> str:  # the last 4 frames of ours or py-libp2p's, innermost first
            frames = [f"{Path(f.filename).name}:{f.name}" for f in traceback.extract_stack()[:-2]
                      if "p2pfleet" in f.filename or "/libp2p/" in f.filename][-4:]
            return " < ".join(reversed(frames))

        async def counted_dial(self: Any, peer_id: Any) -> Any:
            if not self.get_connections(peer_id):
                dialled["" + callers()] += 1
            return await dial(self, peer_id)
        Swarm.dial_peer = counted_dial

        from libp2p.network.connection.swarm_connection import SwarmConn
        close = SwarmConn.close

        async def counted_close(self: Any) -> None:  # who closes connections (not a dial)
            if not self.event_closed.is_set():
                dialled["close: " + callers()] += 1
            return await close(self)
        SwarmConn.close = counted_close

        import sys as _sys

        from libp2p.stream_muxer.yamux.yamux import Yamux
        on_error, ymx_close = Yamux._cleanup_on_error, Yamux.close

        ymx_start = Yamux.start

        async def timed_start(self: Any) -> None:
            self._bench_started = time.monotonic()
            return await ymx_start(self)

        async def counted_error(self: Any) -> None:  # the muxer ends on its own: where, why
            exc = _sys.exc_info()[1]
            age = time.monotonic() - getattr(self, "_bench_started", time.monotonic())
            why = type(exc).__name__ + (f" clean={exc.is_clean_close}" if hasattr(exc, "is_clean_close") else "")
            dialled[f"yamux ends at line {_sys._getframe(1).f_lineno} ({why}, age "
                    f"{'<10' if age < 10 else '<60' if age < 60 else '>=60'} s)"] += 1
            return await on_error(self)
        Yamux.start = timed_start

        async def counted_ymx_close(self: Any, *a: Any, **kw: Any) -> None:
            if not self.event_shutting_down.is_set():
                dialled["yamux close: " + callers()] += 1
            return await ymx_close(self, *a, **kw)
        Yamux._cleanup_on_error, Yamux.close = counted_error, counted_ymx_close

        # where a GET_VALUE request's time goes: getting a stream (a dial if not connected)
        # or waiting for the answer; and in which of the two a timeout caught it
        import contextvars

        from libp2p.host.basic_host import BasicHost
        from libp2p.kad_dht.value_store import ValueStore
        rpc_phase: contextvars.ContextVar[dict | None] = contextvars.ContextVar("rpc", default=None)
        get_from_peer, host_new_stream = ValueStore._get_from_peer, BasicHost.new_stream

        def marks(upstream: Any, mark: str) -> Any:  # `upstream`, noting when it returned
            async def timed(self: Any, *a: Any, **kw: Any) -> Any:
                out = await upstream(self, *a, **kw)
                phase = rpc_phase.get()
                if phase is not None:
                    phase[mark] = time.monotonic() - phase["t0"]
                return out
            return timed

        async def timed_get(self: Any, peer_id: Any, *a: Any, **kw: Any) -> Any:
            phase = {"t0": time.monotonic(),
                     "conn": bool(self.host.get_network().get_connections(peer_id))}
            rpc_phase.set(phase)
            how = "error"
            try:
                out = await get_from_peer(self, peer_id, *a, **kw)
                how = "ok"
                return out
            except trio.Cancelled:
                how = "cancelled"
                raise
            finally:
                took = time.monotonic() - phase["t0"]
                where = ("answer" if "stream_s" in phase else
                         "negotiation" if "swarm_s" in phase else "stream")
                how_stream = {True: "connected", False: "dialled"}.get(phase["conn"], phase["conn"])
                key = f"get {how} in {where} ({how_stream})"
                dialled[key] += 1
                rpc_times.setdefault(key, []).append(round(took, 2))
        BasicHost.new_stream = marks(host_new_stream, "stream_s")  # negotiated
        Swarm.new_stream = marks(Swarm.new_stream, "swarm_s")  # a muxed stream, not negotiated
        ValueStore._get_from_peer = timed_get

        from p2pfleet.net.dht_streams import DhtStreamPool
        pool_take = DhtStreamPool.take

        def timed_take(self: Any, peer: Any) -> Any:
            out = pool_take(self, peer)
            phase = rpc_phase.get()
            if out is not None and phase is not None:
                phase["stream_s"], phase["conn"] = 0.0, "reused"
            return out
        DhtStreamPool.take = timed_take
    t0 = time.monotonic()

    def record(mesh: Mesh) -> bytes:
        now = int(time.time() * 1000)
        body = Capacity(seq=now, exp=now + 3_600_000, sw_version="0.1.0", state="available",
                        hw_class=b"\x07" * 32, cores=2, memory_mb=1024, bench=50.0,
                        providers=("CPUExecutionProvider",), ort_version="1.32.0", slots=1,
                        addrs=())
        return seal(body, mesh.identity, NETWORK)

    async def host(j: int, bootstrap: tuple[str, ...], task_status: Any) -> None:
        mesh = Mesh(Identity.from_seed(f"bench-dht-{args.seed}-{w}-{j}".encode()),
                    MeshSettings(network=NETWORK, listen=(f"/ip4/127.0.{w + 1}.{j + 1}/tcp/0",),
                                 bootstrap=bootstrap, seed=w * 1000 + j,
                                 dht_mode="client" if j in args.client_hosts else "server",
                                 dht_lean_refresh=args.fixes != "old",
                                 dht_reuse_streams=args.fixes == "all",
                                 **_connection_limits(args)))
        entry: dict[str, Any] = {"j": j, "mesh": mesh, "alive": True}
        hosts.append(entry)
        with trio.CancelScope() as scope:
            entry["scope"] = scope
            async with trio.open_nursery() as nursery:
                await nursery.start(mesh.run)
                task_status.started()
                await mesh.first_peer.wait()
                entry["first_peer_s"] = time.monotonic() - t0
                await mesh.table_ready.wait()
                entry["ready_s"] = time.monotonic() - t0
                await mesh.put_capacity(record(mesh))
                entry["put_peers"] = mesh.last_put_peers
                put = mesh.last_put
                entry["put_stats"] = {"rpcs": put.rpcs, "accepted": put.responses,
                                      "timeouts": put.timeouts, "errors": dict(put.errors)}
                entry["published_s"] = time.monotonic() - t0
        entry["alive"] = False

    lags: list[float] = []  # how late the worker's event loop woke a 50 ms sleep (s)
    gc_pauses: list[float] = []  # the garbage collector's pauses since the last status (s)
    gc_full: list[float] = []  # the full (generation 2) collections' pauses among them
    gc_started = [0.0, 0.0]  # wall and CPU clocks at the collection's start
    gc_cpu = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gc_started[:] = [time.perf_counter(), time.thread_time()]
        else:
            gc_pauses.append(time.perf_counter() - gc_started[0])
            gc_cpu[0] += time.thread_time() - gc_started[1]
            if info["generation"] == 2:
                gc_full.append(gc_pauses[-1])
    gc.callbacks.append(on_gc)

    async def watch_lag() -> None:
        while True:
            before = trio.current_time()
            await trio.sleep(0.05)
            lags.append(trio.current_time() - before - 0.05)
            del lags[:-2000]

    def status() -> dict:
        out = []
        for e in sorted(hosts, key=lambda e: e["j"]):
            m = e["mesh"]
            out.append({"j": e["j"], "peer": m.identity.peer_id, "alive": e["alive"],
                        "addr": (m.listen_addrs() or [None])[0],
                        "first_peer_s": e.get("first_peer_s"), "ready_s": e.get("ready_s"),
                        "published_s": e.get("published_s"), "put_peers": e.get("put_peers"),
                        "put_stats": e.get("put_stats"),
                        "last_put_peers": m.last_put_peers if e.get("put_stats") else None,
                        "puts": m.puts,
                        "table": m.dht.routing_table.size() if m.dht else None,
                        "connections": len(m.connected_peers()),
                        "bans": len(m.stats.bans), "violations": dict(m.stats.violations),
                        "opened": m.stats.connections_opened,
                        "closed": m.stats.connections_closed,
                        "refreshes": m.refreshes, "trims": m.stats.trims,
                        "backlog_free": sorted(
                            c.muxed_conn.stream_backlog_semaphore.value
                            for conns in m.host.get_network().connections.values()
                            for c in (conns if isinstance(conns, list) else [conns])
                            if hasattr(c.muxed_conn, "stream_backlog_semaphore"))
                        if e["alive"] and m.host is not None else []})
        ordered = sorted(lags)
        lag = {"p50_ms": round(ordered[len(ordered) // 2] * 1000, 1) if ordered else None,
               "max_ms": round(ordered[-1] * 1000, 1) if ordered else None,
               "gc_max_ms": round(max(gc_pauses, default=0.0) * 1000, 1),
               "gc_total_ms": round(sum(gc_pauses) * 1000, 1),
               "gc_cpu_ms": round(gc_cpu[0] * 1000, 1), "gc_full": len(gc_full),
               "gc_objects": len(gc.get_objects()),
               "rss_mb": round(int(Path("/proc/self/statm").read_text().split()[1])
                               * os.sysconf("SC_PAGE_SIZE") / 2**20)}
        lags.clear()
        gc_pauses.clear()
        gc_full.clear()
        gc_cpu[0] = 0.0
        if os.environ.get("BENCH_DHT_GC") == "freeze":
            gc.collect()
            gc.freeze()
        times = dict(rpc_times)
        waits: Counter[str] = Counter()  # BENCH_DHT_DIALS: where the tasks are suspended
        waits_full: Counter[str] = Counter()  # ... whole chains, into the worker's log
        if os.environ.get("BENCH_DHT_DIALS"):
            todo = [trio.lowlevel.current_root_task()]
            while todo:
                task = todo.pop()
                for child in task.child_nurseries:
                    todo.extend(child.child_tasks)
                chain, coro = [], task.coro
                while coro is not None and len(chain) < 40:
                    frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None) \
                        or getattr(coro, "gi_frame", None)
                    if frame is None:
                        break
                    if "/trio/" not in frame.f_code.co_filename:
                        chain.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
                    coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None) \
                        or getattr(coro, "ag_await", None)
                if chain:
                    waits[f"{chain[0]} ... {' < '.join(reversed(chain[-3:]))}"] += 1
                    waits_full[" > ".join(chain)] += 1
            print(json.dumps({"t": round(time.monotonic() - t0, 1),
                              "waits": dict(waits_full.most_common())}),
                  file=sys.stderr, flush=True)
        rpc_times.clear()
        return {"hosts": out, "cpu_s": time.process_time(), "loop_lag": lag,
                "dials": dict(dialled), "rpc_times": times,
                "waits": dict(waits.most_common(25))}

    async def lookups(pairs: list[list], parallel: int) -> dict:
        by_j = {e["j"]: e for e in hosts}
        results: list[dict] = []
        limiter = trio.CapacityLimiter(parallel)
        busy: dict[int, trio.Lock] = {j: trio.Lock() for j in by_j}

        async def one(j: int, target: str) -> None:
            mesh = by_j[j]["mesh"]
            async with limiter, busy[j]:  # a mesh keeps one lookup's stats at a time
                start = time.monotonic()
                try:
                    opened = await mesh.get_capacity(target)
                    ok = opened is not None
                    err = None
                except Exception as exc:  # noqa: BLE001 - reported, not fatal
                    ok, err = False, f"{type(exc).__name__}: {exc}"
                stats = mesh.last_lookup
                results.append({"reader": f"{w}/{j}", "target": target, "ok": ok,
                                "ms": round((time.monotonic() - start) * 1000, 1),
                                "rounds": stats.rounds, "rpcs": stats.rpcs,
                                "responses": stats.responses, "timeouts": stats.timeouts,
                                "rpc_errors": dict(stats.errors), "error": err})

        async with trio.open_nursery() as nursery:
            for j, target in pairs:
                nursery.start_soon(one, j, target)
        return {"results": results}

    stdin = trio.lowlevel.FdStream(os.dup(0))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_lag)
        boot = tuple(a for a in args.boot_addrs.split(",") if a)
        for j in range(args.hosts):  # a bootstrap worker's one host joins the ones before it
            await nursery.start(host, j, boot)
        print(json.dumps(status()), flush=True)
        buf = b""
        while True:
            chunk = await stdin.receive_some(65536)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                cmd = json.loads(line)
                if cmd["cmd"] == "status":
                    reply = status()
                elif cmd["cmd"] == "lookups":
                    reply = await lookups(cmd["pairs"], cmd.get("parallel", 4))
                elif cmd["cmd"] == "kill":
                    for e in hosts:
                        if e["j"] in cmd["hosts"]:
                            e["scope"].cancel()
                    reply = {"killed": len(cmd["hosts"])}
                else:
                    reply = {"quit": True}
                print(json.dumps(reply), flush=True)
                if cmd["cmd"] == "quit":
                    nursery.cancel_scope.cancel()
                    return


# --- controller ---------------------------------------------------------------------------
WORKERS: list["Worker"] = []  # every worker started, for the loop lag in `activity`


class Worker:
    def __init__(self, index: int, args: argparse.Namespace, bootstrap: list[str], logdir: Path,
                 clients: list[int], hosts: int):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker-index", str(index),
               "--hosts", str(hosts),
               "--boot-addrs", ",".join(bootstrap), "--seed", str(args.seed),
               "--client-hosts", ",".join(map(str, clients)), "--fixes", args.fixes,
               *(("--max-connections", str(args.max_connections))
                 if args.max_connections is not None else ())]
        self.index = index
        self.lag: dict[str, Any] = {}
        self.dials: dict[str, int] = {}  # with BENCH_DHT_DIALS: new dials by caller, so far
        self.dials_reported: Counter[str] = Counter()  # ... as of the last `activity`
        self.rpc_times: dict[str, list[float]] = {}  # ... GET_VALUE durations since then
        self.waits: dict[str, int] = {}  # ... where its tasks were suspended, last status
        WORKERS.append(self)
        self.err = open(logdir / f"worker-{index}.log", "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, text=True, bufsize=1)
        self.lock = threading.Lock()

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.index} ended (see its log)")
        return json.loads(line)

    def ask(self, cmd: dict) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def stop(self) -> None:
        try:
            self.ask({"cmd": "quit"})
        except Exception:  # noqa: BLE001 - it may be gone already
            pass
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.err.close()


def ask_all(workers: list[Worker], cmds: list[dict]) -> list[dict]:
    out: list[dict | None] = [None] * len(workers)

    def run(i: int) -> None:
        out[i] = workers[i].ask(cmds[i])
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out  # type: ignore[return-value]


def all_hosts(workers: list[Worker]) -> list[dict]:
    return snapshot(workers)[0]


def snapshot(workers: list[Worker]) -> tuple[list[dict], float]:
    """Every host's status, and the CPU seconds the workers used so far (all together)."""
    hosts, cpu = [], 0.0
    for w, reply in zip(workers, ask_all(workers, [{"cmd": "status"}] * len(workers))):
        cpu += reply["cpu_s"]
        w.lag = reply["loop_lag"]
        w.dials = reply.get("dials") or {}
        w.waits = reply.get("waits") or {}
        for key, took in (reply.get("rpc_times") or {}).items():
            w.rpc_times.setdefault(key, []).extend(took)
        for h in reply["hosts"]:
            hosts.append({**h, "w": w.index})
    return hosts, cpu


def activity(before: tuple[list[dict], float, float], after: tuple[list[dict], float, float]) -> dict:
    """What the fleet did between two snapshots (hosts, CPU s, wall s): CPU in cores, and
    connections opened and closed per host per minute (the churn that costs CPU at rest)."""
    (h0, cpu0, t0), (h1, cpu1, t1) = before, after
    wall = max(t1 - t0, 1e-9)
    alive = [h for h in h1 if h.get("alive")]
    old = {h["peer"]: h for h in h0}

    def per_host_min(name: str) -> float:
        n = sum(h.get(name, 0) - old.get(h["peer"], {}).get(name, 0) for h in alive)
        return round(n / max(len(alive), 1) / wall * 60, 2)
    return {"wall_s": round(wall, 1), "cpu_cores": round((cpu1 - cpu0) / wall, 2),
            # per worker, since the last snapshot: how late its event loop ran (p50, max), the
            # longest and total garbage-collector pause (ms), and its resident memory (MB)
            "loop_lag_ms": {str(w.index): [w.lag["p50_ms"], w.lag["max_ms"], w.lag["gc_max_ms"],
                                           w.lag["gc_total_ms"], w.lag["rss_mb"], w.lag["gc_cpu_ms"],
                                           w.lag["gc_full"], w.lag["gc_objects"]] for w in WORKERS},
            "opened_per_host_min": per_host_min("opened"),
            "closed_per_host_min": per_host_min("closed"),
            # what makes walks at rest: routing-table refreshes and puts (republishing)
            "refreshes_per_host_min": per_host_min("refreshes"),
            "puts_per_host_min": per_host_min("puts"),
            "trims_per_host_min": per_host_min("trims"),
            **({"dials_by_caller": dict(_new_dials().most_common(20)),
                "get_value_s": _rpc_times(),
                # where the workers' tasks were suspended at the phase's end, all together
                "task_waits": dict(sum((Counter(w.waits) for w in WORKERS), Counter())
                                   .most_common(25))}
               if any(w.dials for w in WORKERS) else {})}


def _rpc_times() -> dict[str, list]:
    """GET_VALUE requests since the last call (BENCH_DHT_DIALS) by outcome, where a
    timeout caught them and whether a connection existed: [count, p50, p90, p99 seconds]."""
    merged: dict[str, list[float]] = {}
    for w in WORKERS:
        for key, took in w.rpc_times.items():
            merged.setdefault(key, []).extend(took)
        w.rpc_times = {}
    return {k: [len(v), *(sorted(v)[int(q * (len(v) - 1))] for q in (0.5, 0.9, 0.99))]
            for k, v in sorted(merged.items(), key=lambda kv: -len(kv[1]))}


def _new_dials() -> Counter[str]:
    """New dials by caller since the last call (BENCH_DHT_DIALS), all workers together."""
    new: Counter[str] = Counter()
    for w in WORKERS:
        now = Counter(w.dials)
        new += now - w.dials_reported
        w.dials_reported = now
    return new


def run_lookups(workers: list[Worker], pairs: list[tuple[dict, dict]], parallel: int) -> dict:
    cmds = [{"cmd": "lookups", "parallel": parallel,
             "pairs": [[r["j"], t["peer"]] for r, t in pairs if r["w"] == w.index]}
            for w in workers]
    started = time.monotonic()
    results = [r for reply in ask_all(workers, cmds) for r in reply["results"]]
    ok = [r for r in results if r["ok"]]
    return {
        "lookups": len(results), "found": len(ok), "success": B.rate(len(ok), len(results)),
        "latency_ms": B.summary([r["ms"] for r in results]),
        "latency_ms_found": B.summary([r["ms"] for r in ok]),
        "rounds": B.summary([r["rounds"] for r in results]),
        "rpcs": B.summary([r["rpcs"] for r in results]),
        "wall_s": round(time.monotonic() - started, 1), "loadavg": load(),
        "rpcs_total": sum(r["rpcs"] for r in results),
        "responses_total": sum(r["responses"] for r in results),
        "timeouts_total": sum(r.get("timeouts", 0) for r in results),
        "rpc_errors_total": dict(sum((Counter(r.get("rpc_errors", {})) for r in results),
                                     Counter())),
        "success_by_reader_process": {
            str(w): B.rate(sum(1 for r in ok if r["reader"].split("/")[0] == str(w)),
                           sum(1 for r in results if r["reader"].split("/")[0] == str(w)))
            for w in sorted({int(r["reader"].split("/")[0]) for r in results})},
        "failed_examples": [r for r in results if not r["ok"]][:5],
    }


def join_summary(hosts: list[dict]) -> dict:
    def vals(name: str) -> list[float]:
        return [h[name] for h in hosts if h.get(name) is not None]
    return {
        "hosts": len(hosts),
        "published": sum(1 for h in hosts if h.get("published_s") is not None),
        "no_peer_after_30s": sum(1 for h in hosts
                                 if h.get("first_peer_s") is None or h["first_peer_s"] > 30),
        "first_peer_s": B.summary(vals("first_peer_s")),
        "table_ready_s": B.summary(vals("ready_s")),
        "published_s": B.summary(vals("published_s")),
        "copies_stored_at_join": B.summary(vals("put_peers")),
        "copies_stored_at_last_put": B.summary(vals("last_put_peers")),  # republished since
        "puts_per_host": B.summary(vals("puts")),
        "put_requests_at_join": {  # PUT_VALUE requests of the join's puts, and their fate
            name: sum((h.get("put_stats") or {}).get(name, 0) for h in hosts)
            for name in ("rpcs", "accepted", "timeouts")},
        "put_errors_at_join": dict(sum((Counter((h.get("put_stats") or {}).get("errors", {}))
                                        for h in hosts), Counter())),
        "routing_table_size": B.summary(vals("table")),
        "connections": B.summary(vals("connections")),
        **({"yamux_backlog_free": {  # outbound stream slots left per connection (256 each)
            "connections": len(free := [f for h in hosts for f in h.get("backlog_free", [])]),
            "below_128": sum(f < 128 for f in free), "zero": sum(f == 0 for f in free),
            "min": min(free, default=None)}}
           if any("backlog_free" in h for h in hosts) else {}),
        # peers banned and stream violations seen (honest hosts only here: any is a false alarm)
        "bans_total": sum(vals("bans")),
        "violations_total": dict(sum((Counter(h.get("violations") or {}) for h in hosts),
                                     Counter())),
        "loadavg": load(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", type=int, default=10, help="worker processes (default 10)")
    ap.add_argument("--hosts", type=int, default=20, help="hosts per process (default 20)")
    ap.add_argument("--bootstrap", type=int, default=3, help="bootstrap hosts (default 3)")
    ap.add_argument("--lookups", type=int, default=1000, help="lookups per phase (default 1000)")
    ap.add_argument("--parallel", type=int, default=4, help="lookups at once per process")
    ap.add_argument("--kill-share", type=float, default=0.3)
    ap.add_argument("--client-share", type=float, default=0.0,
                    help="share of the non-bootstrap hosts running the DHT as clients")
    ap.add_argument("--settle", type=float, default=60.0,
                    help="seconds to wait after every host published, before the lookups "
                         "(default 60; 0: none)")
    ap.add_argument("--join-timeout", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--fixes", choices=("all", "refresh", "old"), default="all",
                    help="the DHT's CPU fixes: all (the mesh as it is), refresh (fix 18 only), "
                         "old (neither fix 18's lean refresh nor fix 19's stream reuse)")
    ap.add_argument("--max-connections", type=int, default=None,
                    help="each host's MeshSettings.max_connections (default: the mesh's, "
                         "128); its watermarks follow it (high 0.75x, low 2 x min, min 1/16)")
    ap.add_argument("--out", type=Path, default=ROOT / "tools" / "bench_dht.last.json")
    # worker mode (internal)
    ap.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--client-hosts", default="", help=argparse.SUPPRESS)
    ap.add_argument("--boot-addrs", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker_index is not None:
        import trio
        args.client_hosts = {int(x) for x in args.client_hosts.split(",") if x}
        trio.run(worker, args)
        return 0
    if args.max_connections is not None and args.max_connections < 16:
        ap.error("--max-connections must be at least 16")
    if args.procs < 1 or args.hosts < 1 or args.bootstrap < 1:
        ap.error("need --procs >= 1, --hosts >= 1 and --bootstrap >= 1")
    if not 0 <= args.kill_share < 1 or not 0 <= args.client_share < 1:
        ap.error("--kill-share and --client-share must be in [0, 1)")
    return controller(args)


def _connection_limits(args: argparse.Namespace) -> dict[str, int]:
    """MeshSettings overrides for --max-connections: min_connections at a sixteenth (the
    mesh's default ratio, 8 of 128), so the low watermark stays below the high one."""
    if args.max_connections is None:
        return {}
    return {"max_connections": args.max_connections,
            "min_connections": max(2, args.max_connections // 16)}


def controller(args: argparse.Namespace) -> int:
    from p2pfleet.net import dht_lookup
    from p2pfleet.net.mesh import MeshSettings

    rng = random.Random(args.seed)
    logdir = Path(tempfile.mkdtemp(prefix="bench_dht-"))
    defaults = MeshSettings(network=NETWORK)
    started = time.monotonic()
    result: dict[str, Any] = {
        "tool": "tools/bench_dht.py",
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": B.machine_info(),
        "config": {"procs": args.procs, "hosts_per_proc": args.hosts,
                   "hosts": args.procs * args.hosts + args.bootstrap,
                   "bootstrap_hosts": args.bootstrap,
                   "lookups_per_phase": args.lookups, "settle_s": args.settle,
                   "environment": {k: os.environ[k] for k in ("BENCH_DHT_DIALS", "BENCH_DHT_GC")
                                   if k in os.environ},
                   "parallel_per_proc": args.parallel,
                   "kill_share": args.kill_share, "client_share": args.client_share,
                   "fixes": args.fixes,
                   "seed": args.seed, "k": defaults.dht_k, "alpha": dht_lookup.ALPHA,
                   "query_timeout_s": dht_lookup.QUERY_TIMEOUT_S,
                   "max_connections": _connection_limits(args).get(
                       "max_connections", defaults.max_connections),
                   "min_connections": _connection_limits(args).get(
                       "min_connections", defaults.min_connections),
                   "transport": "TCP on loopback, host j of process w on 127.0.<w+1>.<j+1>"},
        "method": "every host starts at once and publishes its capacity record once its "
                  "routing table is filled (Mesh.table_ready: a first peer, then a self-lookup "
                  "and a walk per bucket); once all have published, --settle seconds pass "
                  "(tables, connections and republishing go on) before the lookups; a lookup is Mesh.get_capacity from a random reader "
                  "for a random other host's record, timed in the reader's process; success "
                  "means the record was found and verified. Killed hosts' meshes are cancelled "
                  "(connections closed) without a leaving record.",
        "errors": [],
    }
    workers: list[Worker] = []
    try:
        n_clients = int(args.client_share * args.procs * args.hosts)
        first_worker = args.bootstrap  # workers 0 .. bootstrap - 1 hold one bootstrap host each
        candidates = [(w, j) for w in range(first_worker, first_worker + args.procs)
                      for j in range(args.hosts)]
        clients = set(rng.sample(candidates, n_clients))
        # each bootstrap host runs in a process of its own, as bootstrap nodes run on
        # machines of their own: 20 hosts sharing one core with them starved their service,
        # and so did 3 bootstrap hosts sharing one (event loop 170-360 ms late, p50)
        log(f"starting {args.bootstrap} bootstrap workers (one host each)")
        boot: list[str] = []
        for w in range(args.bootstrap):
            workers.append(Worker(w, args, list(boot), logdir, [], 1))
            boot.append(workers[-1].read()["hosts"][0]["addr"])
        for w in range(first_worker, first_worker + args.procs):
            workers.append(Worker(w, args, boot, logdir, [j for v, j in clients if v == w],
                                  args.hosts))
        for w in workers[first_worker:]:
            w.read()
        log(f"{args.procs * args.hosts + args.bootstrap} hosts started; waiting for every record to be published")
        deadline = time.monotonic() + args.join_timeout
        start = ([], 0.0, started)
        while True:
            hosts, cpu = snapshot(workers)
            published = sum(1 for h in hosts if h.get("published_s") is not None)
            if published == len(hosts) or time.monotonic() > deadline:
                break
            log(f"  {published}/{len(hosts)} published")
            time.sleep(5)
        joined = (hosts, cpu, time.monotonic())
        result["join"] = {**join_summary(hosts), "activity": activity(start, joined)}
        log(f"join: {json.dumps(result['join'])}")
        if args.settle > 0:  # a fleet that joined all at once keeps refreshing a while
            time.sleep(args.settle)
            hosts, cpu = snapshot(workers)
            settled = (hosts, cpu, time.monotonic())
            result["settled"] = {**join_summary(hosts), "activity": activity(joined, settled)}
            log(f"after {args.settle:g} s more: {json.dumps(result['settled'])}")

        def sample(readers: list[dict], targets: list[dict]) -> list[tuple[dict, dict]]:
            pairs = []
            while len(pairs) < args.lookups:
                r, t = rng.choice(readers), rng.choice(targets)
                if r["peer"] != t["peer"]:
                    pairs.append((r, t))
            return pairs

        published = [h for h in hosts if h.get("published_s") is not None]
        log("lookups with all hosts up")
        before = (*snapshot(workers), time.monotonic())
        result["all_up"] = run_lookups(workers, sample(hosts, published), args.parallel)
        result["all_up"]["activity"] = activity(before, (*snapshot(workers), time.monotonic()))
        log(f"all up: success {result['all_up']['success']}")
        if args.kill_share > 0:
            victims = rng.sample([h for h in hosts if h["w"] >= first_worker],
                                 int(args.kill_share * len(hosts)))
            ask_all(workers, [{"cmd": "kill", "hosts": [v["j"] for v in victims if v["w"] == w.index]}
                              for w in workers])
            dead = {v["peer"] for v in victims}
            survivors = [h for h in hosts if h["peer"] not in dead]
            log(f"killed {len(victims)} hosts; lookups from survivors")
            before = (*snapshot(workers), time.monotonic())
            phase = run_lookups(workers, sample(survivors, published), args.parallel)
            phase["activity"] = activity(before, (*snapshot(workers), time.monotonic()))
            phase["killed"] = len(victims)
            result["after_kill"] = phase
            log(f"after kill: success {phase['success']}")
    except Exception as exc:  # noqa: BLE001 - reported in the JSON
        result["errors"].append(f"{type(exc).__name__}: {exc}")
    finally:
        for w in workers:
            w.stop()
    result["loadavg_at_end"] = load()
    result["worker_logs"] = "worker-<i>.log in a temp dir (not kept in the JSON)"
    result["targets"] = [
        {"name": "lookups with all hosts up", "target": ">= 1.0",
         "measured": result.get("all_up", {}).get("success"),
         "met": (result.get("all_up", {}).get("success") or 0) >= TARGET_ALL_UP},
        {"name": f"lookups after {args.kill_share:.0%} killed", "target": ">= 0.99",
         "measured": result.get("after_kill", {}).get("success"),
         "met": (result.get("after_kill", {}).get("success") or 0) >= TARGET_KILLED},
    ]
    text = json.dumps(result, indent=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
