#!/usr/bin/env python3
"""Benchmark the explorer's crawl of a loopback fleet of real node processes.

Starts N `p2pfleet node start` processes (default 20, `p2pfleet.live.localfleet.LocalFleet`),
waits until a crawl finds every node `available`, then measures:

1. cold crawls: each with a fresh `Crawler` (new identity, no connections, nothing
   remembered) started in this process: the time of `Crawler.crawl()` (discovery, record
   walks with signature checks, node_info or ping of every live peer), and the time from
   starting the light client to the finished crawl;
2. warm crawls: repeated crawls of one running crawler (what `--watch` and `--serve` do);
3. one `p2pfleet explore --json` process end to end (Python start-up and imports included).

JSON on stdout (and --out FILE); progress on stderr.

    tools/bench_crawl.py                 # 20 nodes
    tools/bench_crawl.py --nodes 5 --crawls 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tools"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import benchlib as B  # noqa: E402
import trio  # noqa: E402

from p2pfleet.explorer.crawler import CrawlSettings, Crawler  # noqa: E402
from p2pfleet.live.localfleet import P2PFLEET, LocalFleet  # noqa: E402

NETWORK = "benchcrawl"


def log(msg: str) -> None:
    print(f"[bench_crawl] {msg}", file=sys.stderr, flush=True)


async def cold_crawl(bootstrap: str, seed: int) -> dict:
    t0 = trio.current_time()
    crawler = Crawler(CrawlSettings(network=NETWORK, bootstrap=(bootstrap,), timeout_s=60,
                                    seed=seed))
    async with trio.open_nursery() as nursery:
        await nursery.start(crawler.run)
        snap = await crawler.crawl()
        total = trio.current_time() - t0
        nursery.cancel_scope.cancel()
    return {"crawl_s": snap.duration_s, "start_to_done_s": total, "snapshot": snap}


async def warm_crawls(bootstrap: str, n: int) -> list[float]:
    crawler = Crawler(CrawlSettings(network=NETWORK, bootstrap=(bootstrap,), timeout_s=60, seed=99))
    out = []
    async with trio.open_nursery() as nursery:
        await nursery.start(crawler.run)
        await crawler.crawl()
        for _ in range(n):
            out.append((await crawler.crawl()).duration_s)
        nursery.cancel_scope.cancel()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument("--crawls", type=int, default=5, help="cold and warm crawls each")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--keep", action="store_true", help="keep the fleet's data dirs")
    args = ap.parse_args(argv)
    import logging
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)  # peers refusing `info` is normal
    if args.nodes < 2 or args.crawls < 1:
        ap.error("--nodes must be at least 2 and --crawls at least 1")
    root = Path(tempfile.mkdtemp(prefix="bench_crawl-"))
    fleet = LocalFleet(root / "fleet", args.nodes, network=NETWORK)
    result: dict = {"benchmark": "crawl", "nodes": args.nodes, "machine": B.machine_info()}
    try:
        t = time.monotonic()
        fleet.start(timeout=120)
        result["fleet_start_s"] = round(time.monotonic() - t, 2)
        bootstrap = fleet.nodes[0].addr
        ids = {n.peer_id for n in fleet.nodes}
        log(f"{args.nodes} nodes up in {result['fleet_start_s']} s; waiting for every record")
        deadline = time.monotonic() + 120
        while True:
            snap = trio.run(cold_crawl, bootstrap, 0)["snapshot"]
            ready = {p.peer_id for p in snap.peers if p.state == "available"}
            log(f"warm-up crawl: {len(ids & ready)}/{len(ids)} available, "
                f"{snap.discovered} discovered, phases {snap.phases}")
            if ids <= ready:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"only {len(ids & ready)} of {len(ids)} records found in 120 s")
            time.sleep(1.0)
        cold = []
        for i in range(args.crawls):
            r = trio.run(cold_crawl, bootstrap, i + 1)
            found = {p.peer_id for p in r["snapshot"].peers if p.state == "available"}
            cold.append({"crawl_s": round(r["crawl_s"], 3), "phases": r["snapshot"].phases,
                         "start_to_done_s": round(r["start_to_done_s"], 3),
                         "found_available": len(found & ids)})
            log(f"cold crawl {i + 1}: {r['crawl_s']:.2f} s, {len(found & ids)}/{len(ids)} found")
        warm = trio.run(warm_crawls, bootstrap, args.crawls)
        t = time.monotonic()
        proc = subprocess.run([*P2PFLEET, "--data-dir", str(root / "explorer"), "explore",
                               "--json", "--network", NETWORK, "--bootstrap", bootstrap],
                              capture_output=True, text=True, timeout=180)
        cli_s = time.monotonic() - t
        doc = json.loads(proc.stdout) if proc.returncode == 0 else {}
        result.update({
            "method": "LocalFleet of real node processes on 127.0.0.x; crawler in this process "
                      "(trio.current_time around Crawler.crawl); CLI timed with time.monotonic",
            "cold_crawl_s": B.summary([c["crawl_s"] for c in cold], 3),
            "cold_start_to_done_s": B.summary([c["start_to_done_s"] for c in cold], 3),
            "cold_crawls": cold,
            "cold_found_all": all(c["found_available"] == len(ids) for c in cold),
            "warm_crawl_s": B.summary(warm, 3),
            "cli_explore_json_s": round(cli_s, 2),
            "cli_found_available": sum(1 for p in doc.get("peers", []) if p["state"] == "available"),
            "cli_reported_crawl_s": doc.get("duration_s"),
        })
    finally:
        fleet.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
