#!/usr/bin/env python3
"""What a DHT host costs in CPU: seconds per join and idle share of a core per host.

For each variant, a fresh worker process starts H real `Mesh` hosts (py-libp2p over TCP,
host j on 127.0.<variant+1>.<j+1>), the first alone and every other one through it at once,
as a fleet starting together. The worker reads its own CPU time (user + system, rusage)
around two phases:

1. joining: from the first host's start until every host's routing table was filled
   (`Mesh.table_ready`); CPU seconds / H is the CPU per join (both ends of every request,
   the identify, GossipSub and Noise handshakes included, as they all run in this process);
2. idle: the next --idle seconds, nothing asked of the hosts; CPU seconds / seconds / H is
   the share of a core one idle host costs (routing-table refreshes, GossipSub heartbeats,
   pings), also for the second half alone (after the first refreshes);
3. requests, in a second process of 2 hosts only (so no other host's refreshes are counted):
   --requests GET_VALUE requests, one after the other, from host 1 to host 0 (for keys
   nobody holds); CPU per request, both ends together;
4. connections, in the same pair: --connections cycles of closing the connection and dialling
   again, each followed by CONNECTION_SETTLE_S for what a new connection starts (security and
   muxer negotiation, identify both ways, GossipSub and DHT streams); CPU per connection,
   both ends together, the pair's idle CPU included (it is small: `idle` above).

The variants: `lean` (the mesh as it is: fix 18 in net/dht_refresh.py, fix 19 in
net/dht_streams.py), `refresh` (fix 18 only) and `old` (`MeshSettings.dht_lean_refresh=False`
and `dht_reuse_streams=False`: every bucket walked to its k closest at every refresh,
"sooner" refreshes for as long as the table is smaller than k, a put reaching few peers
re-triggering a full refresh every 15 s, a new stream for every DHT request). They run one after the other in the same
invocation, so the ratio old / lean is measured on the same machine state. JSON to stdout
and tools/bench_dht_cpu.last.json (--out to change); progress to stderr.

    tools/bench_dht_cpu.py                       # 20 hosts, 60 s idle, every variant
    tools/bench_dht_cpu.py --hosts 40 --idle 120
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tools"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import benchlib as B  # noqa: E402

NETWORK = "benchdhtcpu"
VARIANTS = ("lean", "refresh", "old")
CONNECTION_SETTLE_S = 1.0
_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[bench_dht_cpu {time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def cpu_s() -> float:
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def worker(args: argparse.Namespace) -> dict[str, Any]:
    import logging

    import trio

    from p2pfleet.identity import Identity
    from p2pfleet.net.mesh import Mesh, MeshSettings

    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    index = VARIANTS.index(args.variant)
    meshes: list[Mesh] = []
    out: dict[str, Any] = {"variant": args.variant}
    async with trio.open_nursery() as nursery:
        t0, c0 = time.monotonic(), cpu_s()
        bootstrap: tuple[str, ...] = ()
        for j in range(args.hosts):
            mesh = Mesh(Identity.from_seed(f"bench-dht-cpu-{args.seed}-{j}".encode()),
                        MeshSettings(network=NETWORK, seed=j, bootstrap=bootstrap,
                                     listen=(f"/ip4/127.0.{index + 1}.{j + 1}/tcp/0",),
                                     dht_mode="server", dht_k=args.k,
                                     dht_lean_refresh=args.variant != "old",
                                     dht_reuse_streams=args.variant == "lean"))
            await nursery.start(mesh.run)
            meshes.append(mesh)
            if j == 0:
                bootstrap = tuple(mesh.listen_addrs()[:1])
        with trio.move_on_after(args.join_timeout) as scope:
            for mesh in meshes[1:]:
                await mesh.table_ready.wait()
        c1, t1 = cpu_s(), time.monotonic()
        out["join"] = {"all_ready": not scope.cancelled_caught, "wall_s": round(t1 - t0, 1),
                       "cpu_s": round(c1 - c0, 2),
                       "cpu_s_per_join": round((c1 - c0) / args.hosts, 3),
                       "table": B.summary([m.dht.routing_table.size() for m in meshes], 1)}
        refreshes = sum(m.refreshes for m in meshes)
        if args.requests_only:
            out.pop("join")
            await trio.sleep(2.0)  # the first refresh's answers written
            await requests(meshes, args, out)
            nursery.cancel_scope.cancel()
            return out
        await trio.sleep(args.idle / 2)
        c_half, t_half = cpu_s(), time.monotonic()
        await trio.sleep(args.idle / 2)
        c2, t2 = cpu_s(), time.monotonic()
        out["idle"] = {"wall_s": round(t2 - t1, 1), "cpu_s": round(c2 - c1, 2),
                       "core_share_per_host": round((c2 - c1) / (t2 - t1) / args.hosts, 4),
                       "second_half_core_share_per_host":
                           round((c2 - c_half) / (t2 - t_half) / args.hosts, 4),
                       "refreshes": sum(m.refreshes for m in meshes) - refreshes,
                       "table": B.summary([m.dht.routing_table.size() for m in meshes], 1),
                       "connections": B.summary([len(m.connected_peers()) for m in meshes], 1)}
        nursery.cancel_scope.cancel()
    return out


async def requests(meshes: list[Any], args: argparse.Namespace, out: dict[str, Any]) -> None:
    """Back-to-back GET_VALUE requests from host 1 to host 0 (both ends in this process),
    then connect/disconnect cycles between them."""
    import trio

    asker, answerer = meshes[1], meshes[0].host.get_id()
    c0, t0 = cpu_s(), time.monotonic()
    for i in range(args.requests):
        await asker.dht.value_store._get_from_peer(
            answerer, f"/p2pfleet/{NETWORK}/node/1/absent-{i}".encode(),
            return_record=True, return_closer_peers=True)
    c1, t1 = cpu_s(), time.monotonic()
    n = max(1, args.requests)
    out["requests"] = {"n": args.requests,
                       "cpu_ms_per_request": round((c1 - c0) / n * 1000, 2),
                       "wall_ms_per_request": round((t1 - t0) / n * 1000, 2)}
    # a connection's whole life: dial, security, muxer, identify, GossipSub and DHT streams
    # opened by either end, then the close (both ends; the 2 hosts' idle CPU is included)
    answerer_addr = meshes[0].listen_addrs()[0]
    c0, t0 = cpu_s(), time.monotonic()
    for _ in range(args.connections):
        await asker.host.disconnect(answerer)
        await trio.sleep(0.2)
        await asker.connect(answerer_addr)
        await trio.sleep(CONNECTION_SETTLE_S)
    c1, t1 = cpu_s(), time.monotonic()
    n = max(1, args.connections)
    out["connections"] = {"n": args.connections,
                          "cpu_ms_per_connection": round((c1 - c0) / n * 1000, 1),
                          "wall_s_per_cycle": round((t1 - t0) / n, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=20, help="hosts in the process (default 20)")
    ap.add_argument("--idle", type=float, default=60.0, help="idle seconds measured (default 60)")
    ap.add_argument("--k", type=int, default=20, help="DHT bucket size and replication")
    ap.add_argument("--requests", type=int, default=300, help="back-to-back DHT requests")
    ap.add_argument("--connections", type=int, default=30,
                    help="connect/disconnect cycles between the pair (default 30)")
    ap.add_argument("--join-timeout", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma-separated, run in this order (default lean,refresh,old)")
    ap.add_argument("--out", type=Path, default=ROOT / "tools" / "bench_dht_cpu.last.json")
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # worker mode
    ap.add_argument("--requests-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.variant is not None:
        import trio
        print(json.dumps(trio.run(worker, args)))
        return 0
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        ap.error(f"--variants takes some of {','.join(VARIANTS)}, got {args.variants!r}")
    if not 2 <= args.hosts <= 250 or args.idle <= 0 or args.k < 1 or args.requests < 0:
        ap.error("need 2 <= --hosts <= 250, --idle > 0, --k >= 1 and --requests >= 0")
    result: dict[str, Any] = {
        "tool": "tools/bench_dht_cpu.py",
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": B.machine_info(),
        "config": {"hosts": args.hosts, "idle_s": args.idle, "k": args.k, "seed": args.seed,
                   "variants": variants, "connections": args.connections,
                   "transport": "TCP on loopback, one process"},
        "method": "per variant a fresh process of H meshes joining at once through the first; "
                  "its rusage CPU from the first start until every table_ready (per join: "
                  "/ H), then over the idle window (per host: / seconds / H), then over "
                  "back-to-back GET_VALUE requests host 1 -> host 0 (per request), then over "
                  "close-and-redial cycles of the same pair, each settling "
                  f"{CONNECTION_SETTLE_S:g} s (per connection)",
        "errors": [], "runs": {},
    }
    for variant in variants:
        log(f"{variant}: {args.hosts} hosts, load {os.getloadavg()[0]:.2f}")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--variant", variant,
               "--idle", str(args.idle), "--k", str(args.k), "--seed", str(args.seed),
               "--join-timeout", str(args.join_timeout), "--requests", str(args.requests),
               "--connections", str(args.connections)]
        load_before = [round(x, 2) for x in os.getloadavg()]
        main_run = subprocess.run(cmd + ["--hosts", str(args.hosts)], capture_output=True,
                                  text=True)
        pair = subprocess.run(cmd + ["--hosts", "2", "--requests-only"], capture_output=True,
                              text=True)
        failed = [p for p in (main_run, pair) if p.returncode != 0]
        if failed:
            result["errors"].append(f"{variant}: exit {failed[0].returncode}: "
                                    f"{failed[0].stderr[-500:]}")
            continue
        run = json.loads(main_run.stdout.strip().splitlines()[-1])
        pair_out = json.loads(pair.stdout.strip().splitlines()[-1])
        run["requests"], run["connections"] = pair_out["requests"], pair_out["connections"]
        run["loadavg_before"] = load_before
        result["runs"][variant] = run
        log(f"{variant}: {json.dumps(run)}")
    runs = result["runs"]
    if "lean" in runs and "old" in runs:
        def ratio(a: float, b: float) -> float | None:
            return round(a / b, 2) if b else None
        result["old_over_lean"] = {
            "cpu_per_join": ratio(runs["old"]["join"]["cpu_s_per_join"],
                                  runs["lean"]["join"]["cpu_s_per_join"]),
            "idle_per_host": ratio(runs["old"]["idle"]["core_share_per_host"],
                                   runs["lean"]["idle"]["core_share_per_host"]),
            "cpu_per_request": ratio(runs["old"]["requests"]["cpu_ms_per_request"],
                                     runs["lean"]["requests"]["cpu_ms_per_request"]),
            "join_plus_idle_cpu": ratio(
                runs["old"]["join"]["cpu_s"] + runs["old"]["idle"]["cpu_s"],
                runs["lean"]["join"]["cpu_s"] + runs["lean"]["idle"]["cpu_s"]),
        }
    result["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(result, indent=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
