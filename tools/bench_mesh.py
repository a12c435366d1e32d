#!/usr/bin/env python3
"""Benchmark the mesh: a fleet of real `p2pfleet node start` processes on loopback.

One run launches N node processes (default 20) with `p2pfleet.live.localfleet.LocalFleet`
and measures, talking to each node over its control socket:

1. DHT lookups: every node looks up every other node's capacity record (or a random
   sample, --lookups): success rate, latency (raw control round trip and minus the
   reader's `status` round trip), rounds (hops), RPCs and responses per lookup.
2. The same after SIGKILLing a share of the nodes (--kill-share, no leaving record):
   survivors' records from survivors, killed nodes' records from survivors, and both from
   "fresh" readers that joined after every record was stored (so they hold no copy of
   their own and must get it from a replica).
3. Job announcement delivery: K signed announcements gossiped from one node, >= 0.5 s
   apart; delivery ratio and latency heard_at (receiver) - sent_at (this process).
4. How long a node that joins a running fleet takes until another node finds its record.
5. Idle CPU (% of one core) and RSS of every node process after the fleet settles.

Every section carries a "method" string; "targets" lists each target with the measured
value and whether it was met; "node_requests" says what the node lacks for a cleaner
measurement. JSON goes to stdout (and --out FILE); progress goes to stderr.

    tools/bench_mesh.py                       # 20 nodes, a few minutes
    tools/bench_mesh.py --quick               # 5 nodes, a smoke run (< 1 min)
    tools/bench_mesh.py --nodes 30 --lookups 200 --seed 7 --out out/bench_mesh.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tools"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import benchlib as B  # noqa: E402
from p2pfleet.identity import Identity  # noqa: E402
from p2pfleet.live.localfleet import FleetError, LocalFleet, LocalNode, wait_for  # noqa: E402
from p2pfleet.net import dht_lookup  # noqa: E402
from p2pfleet.wire.envelope import seal  # noqa: E402
from p2pfleet.wire.kinds import JobAnnouncement, Requirements  # noqa: E402

NETWORK = "benchmesh"

# Targets of the Mesh issue.
TARGET_SURVIVOR_SUCCESS = 0.99
TARGET_ANNOUNCE_P99_MS = 150.0
TARGET_IDLE_CPU_PCT = 1.0
TARGET_RSS_MB = 150.0

# The capacity record is put once at join (after the first peer) and then every
# records.republish_s. A long republish period keeps periodic puts out of the idle
# window and means every copy a reader finds was stored by the initial put.
BENCH_SETTINGS = {
    "records.capacity_lifetime_s": "3600",
    "records.republish_s": "1800",
    "node.log_level": "warning",
}

_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[bench_mesh {time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def ms(seconds: float) -> float:
    return round(seconds * 1000.0, 2)


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.rng = random.Random(args.seed)
        self.root = Path(tempfile.mkdtemp(prefix="bench_mesh-", dir=args.workdir))
        self.fleet = LocalFleet(self.root / "fleet", args.nodes, network=NETWORK,
                                settings=BENCH_SETTINGS)
        self.original: list[LocalNode] = list(self.fleet.nodes)
        self.killed: list[LocalNode] = []
        self.joiner: LocalNode | None = None
        self.late_reader: LocalNode | None = None
        self.baseline_s: dict[int, float] = {}
        self.result: dict[str, Any] = {
            "tool": "tools/bench_mesh.py",
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": B.machine_info(),
            "config": {
                "nodes": args.nodes, "kill_share": args.kill_share,
                "announcements": args.announcements, "announce_spacing_s": args.spacing,
                "lookups": args.lookups or "all pairs", "seed": args.seed,
                "idle_window_s": args.idle_s, "settle_s": args.settle_s, "quick": args.quick,
                "start_batch": args.start_batch,
                "network": NETWORK, "transport": "TCP on loopback, node i on 127.0.<i+1>.1",
                "dht": {"k": dht_lookup.K, "alpha": dht_lookup.ALPHA,
                        "query_timeout_s": dht_lookup.QUERY_TIMEOUT_S},
                "node_settings": {**self.fleet.nodes[0].settings},
                "why_settings": "FAST_TEST_SETTINGS (start at once, publish loopback addrs) "
                                "plus a 1800 s republish period and 3600 s record lifetime, "
                                "so no periodic republish falls into the run: every copy "
                                "found was stored by the node's put at join, and the idle "
                                "window holds no put; log level warning (less log I/O).",
            },
        }
        self.errors: list[dict] = []
        self.raw: dict[str, list] = {}
        self.py_spy = B.find_py_spy(args.py_spy) if args.profile else None
        if args.profile and not self.py_spy:
            log("--profile: py-spy not found (pip install py-spy, or --py-spy PATH); no profiles")

    # --- plumbing ------------------------------------------------------------------------
    def section(self, name: str, fn: Callable[[], dict]) -> dict | None:
        log(f"{name} ...")
        start = time.monotonic()
        sys0, fleet0 = B.system_cpu(), self.fleet_cpu()
        try:
            out = fn()
        except Exception as exc:  # noqa: BLE001 - one broken section must not lose the rest
            tb = traceback.format_exc(limit=4)
            log(f"{name} FAILED: {exc}")
            self.errors.append({"section": name, "error": f"{type(exc).__name__}: {exc}",
                                "traceback": tb})
            self.result[name] = {"error": f"{type(exc).__name__}: {exc}"}
            return None
        wall = time.monotonic() - start
        out["section_s"] = round(wall, 1)
        sys1, fleet1 = B.system_cpu(), self.fleet_cpu()
        busy = (sys1[0] - sys0[0]) / max(1e-9, sys1[1] - sys0[1]) * 100.0
        fleet = sum(fleet1[i] - fleet0.get(i, 0.0) for i in fleet1) / wall * 100.0
        cores = self.result["machine"]["cpus_usable"] or 1
        out["machine_load"] = {
            "busy_pct_of_all_cores": round(busy, 1),
            "fleet_cpu_pct_of_one_core": round(fleet, 1),
            "other_cpu_pct_of_one_core": round(max(0.0, busy * cores - fleet), 1),
            "note": "/proc/stat over the section; 'other' = machine busy - node processes "
                    "(this process, and anything else running on the machine); nodes killed "
                    "during the section are not counted as fleet",
        }
        self.result[name] = out
        log(f"{name} done in {out['section_s']} s")
        return out

    def fleet_cpu(self) -> dict[int, float]:
        """CPU seconds so far of every live node process, by node index."""
        out = {}
        for node in self.fleet.nodes:
            if node.alive():
                value = B.cpu_seconds([node.proc.pid])
                if value is not None:
                    out[node.index] = value
        return out

    def profile_start(self, node: LocalNode, seconds: float, name: str) -> tuple | None:
        if not self.py_spy:
            return None
        out = self.root / f"py-spy-{name}-node{node.index}.txt"
        return B.py_spy_record(self.py_spy, node.proc.pid, seconds, out), out, node.index

    @staticmethod
    def profile_finish(started: tuple | None) -> dict | None:
        if started is None:
            return None
        proc, out, index = started
        try:
            _, err = proc.communicate(timeout=120)
        except Exception:  # noqa: BLE001
            proc.kill()
            return {"error": "py-spy did not finish"}
        if not out.exists():
            return {"error": (err or b"").decode(errors="replace")[-500:]}
        return {"node": index, "tool": "py-spy record --nonblocking --rate 200", **B.py_spy_summary(out)}

    def inbound(self) -> dict:
        """Accepted connections per node and the source addresses they come from."""
        per_node, sources = [], set()
        for node in self.live():
            try:
                port = int(node.addr.split("/tcp/")[1].split("/")[0])
            except (IndexError, ValueError):
                continue
            src = B.inbound_sources(node.proc.pid, port)
            per_node.append(len(src))
            sources.update(src)
        return {"per_node": B.summary(per_node, 1), "distinct_source_ips": sorted(sources),
                "method": "/proc/<pid>/net/tcp: ESTABLISHED sockets of the node process on "
                          "its listen port; remote IPv4 address of each"}

    def live(self) -> list[LocalNode]:
        return [n for n in self.original if n.alive()]

    def baseline(self, nodes: list[LocalNode], repeat: int = 10) -> dict:
        """Median `status` round trip per node: the control-socket cost we subtract."""
        all_rtts: list[float] = []
        for node in nodes:
            rtts = []
            for _ in range(repeat):
                reply, _err, rtt = B.timed_ask(node, "status")
                if reply is not None:
                    rtts.append(rtt)
            if rtts:
                self.baseline_s[node.index] = B.percentile(rtts, 50)
                all_rtts += rtts
        return {"status_rtt_ms": B.summary([ms(x) for x in all_rtts], 3),
                "per_node_median_ms": {str(i): ms(v) for i, v in sorted(self.baseline_s.items())
                                       if any(n.index == i for n in nodes)}}

    def run_lookups(self, pairs: list[tuple[LocalNode, LocalNode]],
                    name: str) -> tuple[dict, list[dict]]:
        records = []
        seen_readers: set[int] = set()
        for reader, target in pairs:
            first = reader.index not in seen_readers
            seen_readers.add(reader.index)
            reply, err, rtt = B.timed_ask(reader, "lookup", timeout=25.0, peer_id=target.peer_id)
            rec: dict[str, Any] = {"reader": reader.index, "target": target.index,
                                   "raw_ms": ms(rtt), "first_of_reader": first}
            base = self.baseline_s.get(reader.index)
            if base is not None:
                rec["net_ms"] = ms(rtt - base)
            if reply is None:
                rec.update(found=False, error=err)
            else:
                cost = reply.get("lookup", {})
                rec.update(found=bool(reply.get("found")), rounds=cost.get("rounds"),
                           rpcs=cost.get("rpcs"), responses=cost.get("responses"))
                for extra in ("elapsed_ms", "values", "local"):  # if the node reports them
                    if extra in cost:
                        rec[extra] = cost[extra]
                if reply.get("found"):
                    rec["state"] = reply["record"]["state"]
            records.append(rec)
        if self.args.raw:
            self.raw[name] = records
        return self.lookup_summary(records), records

    @staticmethod
    def lookup_summary(records: list[dict]) -> dict:
        found = [r for r in records if r["found"]]
        answered = [r for r in records if "error" not in r]
        out: dict[str, Any] = {
            "lookups": len(records), "found": len(found),
            "success_rate": B.rate(len(found), len(records)),
            "control_errors": len(records) - len(answered),
            "latency_raw_ms": B.summary([r["raw_ms"] for r in found]),
            "latency_minus_status_rtt_ms": B.summary([r["net_ms"] for r in found if "net_ms" in r]),
            "rounds": B.summary([r["rounds"] for r in answered if r.get("rounds") is not None]),
            "rpcs": B.summary([r["rpcs"] for r in answered if r.get("rpcs") is not None]),
            "responses": B.summary([r["responses"] for r in answered
                                    if r.get("responses") is not None]),
            "states_found": sorted({r.get("state") for r in found if r.get("state")}),
        }
        if any("elapsed_ms" in r for r in found):
            out["latency_in_node_ms"] = B.summary([r["elapsed_ms"] for r in found
                                                   if "elapsed_ms" in r])
        if any("values" in r for r in found):
            out["found_from_network"] = sum(1 for r in found if r.get("values"))
        out["latency_raw_first_lookup_per_reader_ms"] = B.summary(
            [r["raw_ms"] for r in found if r["first_of_reader"]])
        out["latency_raw_later_lookups_ms"] = B.summary(
            [r["raw_ms"] for r in found if not r["first_of_reader"]])
        out["slowest"] = sorted(records, key=lambda r: -r["raw_ms"])[:5]
        misses = [r for r in records if not r["found"]]
        if misses:
            out["misses"] = misses[:50]
        return out

    # --- sections ------------------------------------------------------------------------
    def launch(self) -> str:
        """Start the fleet's processes; returns how (for the method string)."""
        batch = self.args.start_batch
        if batch <= 0:
            self.fleet.start(timeout=120.0)
            return ("LocalFleet.start(): node 0 first, then all others at once, each "
                    "bootstrapping from node 0")
        fleet = self.fleet
        fleet.init()
        first = fleet.nodes[0]
        first.start(NETWORK, [])
        first.addr = fleet.wait_addr(first, 60.0)
        up = [first]
        rest = fleet.nodes[1:]
        for at in range(0, len(rest), batch):
            group = rest[at:at + batch]
            for node in group:
                extra = self.rng.sample(up[1:], min(2, len(up) - 1))
                node.start(NETWORK, [first.addr] + [n.addr for n in extra])
            for node in group:
                node.addr = fleet.wait_addr(node, 60.0)
            try:
                wait_for(lambda: all((s := n.try_ask("status")) and s["peers"] >= 1
                                     for n in group), 20.0, "a peer", interval=0.1)
            except FleetError:
                pass  # the readiness check below says which node is alone
            up += group
        return (f"LocalFleet's nodes started in groups of {batch} (node 0 first); a group "
                "starts once the previous one has a peer each; each node bootstraps from "
                "node 0 and 2 random earlier nodes (not LocalFleet.start(), which starts "
                "all at once from node 0: see reasons.fleet_start)")

    def start_fleet(self) -> dict:
        start = time.monotonic()
        how = self.launch()
        started = time.monotonic() - start

        unready: dict[int, Any] = {}

        def ready() -> bool:
            unready.clear()
            for node in self.fleet.nodes:
                LocalFleet._check_alive(node)
                s = node.try_ask("status")
                if not s or not s["in_mesh"] or s["peers"] < 1 or s["record_seq"] is None:
                    unready[node.index] = s and {k: s.get(k) for k in (
                        "in_mesh", "peers", "record_seq", "last_error", "why")}
            return not unready
        try:
            wait_for(ready, 60.0, "every node in the mesh with a peer and a record",
                     interval=0.5)
        except FleetError as exc:
            detail = {i: {"status": st, "log_tail": self.fleet.nodes[i].output()[-800:]}
                      for i, st in list(unready.items())[:3]}
            raise FleetError(f"{exc}; not ready: {sorted(unready)}; "
                             f"{json.dumps(detail)[:4000]}") from None
        ready_s = time.monotonic() - start
        time.sleep(self.args.settle_s)
        peers = [n.ask("status")["peers"] for n in self.fleet.nodes]
        return {
            "method": f"{how}; then wait until every node's status says in_mesh, >= 1 "
                      "peer and a record sequence, then settle "
                      f"{self.args.settle_s} s before measuring.",
            "start_s": round(started, 1), "ready_s": round(ready_s, 1),
            "peers_per_node": B.summary(peers, 1),
            "pids": {str(n.index): n.proc.pid for n in self.fleet.nodes},
        }

    def pairs(self, readers: list[LocalNode], targets: list[LocalNode],
              sample: int | None) -> list[tuple[LocalNode, LocalNode]]:
        pairs = [(r, t) for r in readers for t in targets if r is not t]
        self.rng.shuffle(pairs)
        return pairs[:sample] if sample else pairs

    def lookups_full(self) -> dict:
        nodes = self.live()
        base = self.baseline(nodes)
        pairs = self.pairs(nodes, nodes, self.args.lookups)
        summary, _records = self.run_lookups(pairs, "lookups_full")
        summary["inbound_connections"] = self.inbound()
        return {
            "method": "For each (reader, target) pair, in a seeded random order, one control "
                      "'lookup' of the target's capacity record, one at a time. latency_raw_ms "
                      "is the control round trip (connect, request, the node's DHT walk, "
                      "JSON reply) of found lookups; latency_minus_status_rtt_ms subtracts the "
                      "reader's median 'status' round trip (10 samples, control_baseline). "
                      "rounds = iterative walk rounds (hops, alpha=3 GET_VALUE in parallel "
                      "per round), rpcs = GET_VALUE requests sent, responses = peers that "
                      "answered, as the node reports them. Note: with N <= k+1 every node "
                      "holds every record (each put goes to the k=20 closest peers), so "
                      "'found' may come from the reader's own copy; the walk runs anyway.",
            "control_baseline": base, **summary,
        }

    def announcements(self) -> dict:
        nodes = self.live()
        publisher_node = self.rng.choice(nodes)
        receivers = [n for n in nodes if n is not publisher_node]
        nonce = os.urandom(4).hex()
        sent: list[dict] = []
        k = self.args.announcements
        profiled = self.profile_start(self.rng.choice(receivers), k * self.args.spacing + 1.0,
                                      "announcements")
        cpu0, t_first = self.fleet_cpu(), time.monotonic()
        next_at = time.monotonic()
        for i in range(k):
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            next_at = time.monotonic() + self.args.spacing
            publisher = Identity.from_seed(f"bench_mesh {nonce} publisher {i}".encode())
            job_id = self.rng.randbytes(16)
            now_ms = int(time.time() * 1000)
            body = JobAnnouncement(
                seq=now_ms, exp=now_ms + 600_000, job_id=job_id, model_digest=b"b" * 32,
                model_size=1000,
                requirements=Requirements(min_memory_mb=128, providers=(),
                                          min_sw_version="0.1.0", ort_versions=">=1.19"),
                credit_rate=1, quorum=2, shards_total=10, shards_left=10, addrs=())
            envelope = seal(body, publisher, NETWORK).hex()
            sent_at = time.time()
            reply, err, rtt = B.timed_ask(publisher_node, "announce", envelope_hex=envelope)
            sent.append({"job_id": job_id.hex(), "sent_at": sent_at, "rtt_ms": ms(rtt),
                         "node_sent_at": reply.get("sent_at") if reply else None, "error": err})
        time.sleep(max(0.0, next_at - time.monotonic()))  # one more spacing: the last one spreads
        cpu1, send_window = self.fleet_cpu(), time.monotonic() - t_first
        fleet_cpu_s = sum(cpu1[i] - cpu0[i] for i in cpu1 if i in cpu0)
        ok = [s for s in sent if s["error"] is None]
        want = {s["job_id"] for s in ok}
        heard: dict[int, dict[str, float]] = {}
        deadline = time.monotonic() + self.args.collect_s
        while True:
            for node in nodes:
                reply = node.try_ask("jobs")
                if reply:
                    heard[node.index] = {j["job_id"]: j["heard_at"] for j in reply["jobs"]
                                         if j["job_id"] in want}
            if all(len(heard.get(n.index, {})) == len(want) for n in nodes):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        lat, lat_node, missing = [], [], []
        for node in receivers:
            got = heard.get(node.index, {})
            for s in ok:
                at = got.get(s["job_id"])
                if at is None:
                    missing.append({"node": node.index, "job_id": s["job_id"]})
                    continue
                lat.append(ms(at - s["sent_at"]))
                if s["node_sent_at"] is not None:
                    lat_node.append(ms(at - s["node_sent_at"]))
        self_heard = heard.get(publisher_node.index, {})
        self_lat = [ms(self_heard[s["job_id"]] - s["sent_at"]) for s in ok
                    if s["job_id"] in self_heard]
        per_job_max = []
        for s in ok:
            ats = [heard.get(n.index, {}).get(s["job_id"]) for n in receivers]
            ats = [a for a in ats if a is not None]
            if ats:
                per_job_max.append(ms(max(ats) - s["sent_at"]))
        expected = len(receivers) * len(ok)
        delivered = expected - len(missing)
        return {
            "method": f"{k} job announcements, each signed by its own fresh publisher identity "
                      "(the jobs topic allows 12/min per publisher), distinct job ids, sent "
                      f"through node {publisher_node.index}'s control 'announce' command "
                      f"{self.args.spacing} s apart. sent_at = this process's time.time() just "
                      "before the control request; heard_at = the receiver's time.time() when "
                      "its node took the validated message off the topic (control 'jobs'). "
                      "All processes share one wall clock. latency_ms = heard_at - sent_at "
                      "over (receiver, announcement) pairs, publisher excluded; it includes "
                      "the control request to the publisher (see announce_rtt_ms). "
                      "latency_from_node_sent_at_ms uses the publisher node's own sent_at "
                      "(taken after pubsub.publish returned): a lower bound. "
                      f"Collected by polling 'jobs' for up to {self.args.collect_s} s.",
            "publisher_node": publisher_node.index, "receivers": len(receivers),
            "sent": len(sent), "send_errors": [s for s in sent if s["error"]],
            "deliveries_expected": expected, "delivered": delivered,
            "delivery_ratio": B.rate(delivered, expected),
            "latency_ms": B.summary(lat),
            "latency_from_node_sent_at_ms": B.summary(lat_node),
            "last_receiver_per_announcement_ms": B.summary(per_job_max),
            "publisher_self_delivery_ms": B.summary(self_lat),
            "announce_rtt_ms": B.summary([s["rtt_ms"] for s in sent]),
            "missing": missing[:50],
            "fleet_cpu_during_sends": {
                "window_s": round(send_window, 2), "cpu_s": round(fleet_cpu_s, 3),
                "cpu_ms_per_announcement": round(fleet_cpu_s / max(1, len(ok)) * 1000, 1),
                "note": "utime+stime of all node processes from the first send to one spacing "
                        "after the last (before 'jobs' polling), idle background included; "
                        "see reasons.announcement_latency for the net figure",
            },
            "profile": self.profile_finish(profiled),
        }

    def idle(self) -> dict:
        nodes = self.live()
        time.sleep(self.args.idle_settle_s)
        trees = {n.index: B.process_tree(n.proc.pid) for n in nodes}
        me = B.process_tree(os.getpid())
        me = [p for p in me if p not in {q for t in trees.values() for q in t}]
        samples: list[tuple[float, dict[int, float | None]]] = []
        profiled = self.profile_start(self.rng.choice(nodes), self.args.idle_s, "idle")
        sys0 = B.system_cpu()
        me0 = B.cpu_seconds([os.getpid()])
        end = time.monotonic() + self.args.idle_s
        while True:
            now = time.monotonic()
            samples.append((now, {i: B.cpu_seconds(t) for i, t in trees.items()}))
            if now >= end:
                break
            time.sleep(min(1.0, end - now))
        sys1 = B.system_cpu()
        me1 = B.cpu_seconds([os.getpid()])
        (t0, c0), (t1, c1) = samples[0], samples[-1]
        window = t1 - t0
        per_node: dict[str, dict] = {}
        for n in nodes:
            i = n.index
            if c0[i] is None or c1[i] is None:
                continue
            pct = (c1[i] - c0[i]) / window * 100.0
            # the busiest 5 s stretch, to show periodic work
            peak = 0.0
            for a in range(len(samples)):
                for b in range(a + 1, len(samples)):
                    if samples[b][0] - samples[a][0] >= 5.0 - 1e-6:
                        ca, cb = samples[a][1][i], samples[b][1][i]
                        if ca is not None and cb is not None:
                            peak = max(peak, (cb - ca) / (samples[b][0] - samples[a][0]) * 100)
                        break
            mem = B.memory_kb(trees[i])
            per_node[str(i)] = {"pid": n.proc.pid, "cpu_pct": round(pct, 3),
                                "cpu_pct_peak_5s": round(peak, 2),
                                "rss_mb": round(mem["VmRSS"] / 1024, 1),
                                "peak_rss_mb": round(mem["VmHWM"] / 1024, 1),
                                "threads": B.threads(n.proc.pid),
                                "processes": len(trees[i])}
        cpu = [v["cpu_pct"] for v in per_node.values()]
        rss = [v["rss_mb"] for v in per_node.values()]
        busy = (sys1[0] - sys0[0]) / max(1e-9, sys1[1] - sys0[1]) * 100.0
        return {
            "method": f"After the lookups and announcements, wait {self.args.idle_settle_s} s, "
                      f"then read utime+stime from /proc/<pid>/stat of every node process (and "
                      f"any children) every 1 s for {self.args.idle_s} s; cpu_pct = CPU seconds "
                      "/ wall seconds * 100 (% of one core), tick "
                      f"{1000 // B.CLK_TCK} ms. cpu_pct_peak_5s = the busiest 5 s stretch. "
                      "rss_mb = VmRSS from /proc/<pid>/status at the end, peak_rss_mb = VmHWM. "
                      "Nothing is asked of the nodes during the window.",
            "window_s": round(window, 1), "nodes": len(per_node),
            "cpu_pct_of_one_core": B.summary(cpu, 3),
            "rss_mb": B.summary(rss, 1),
            "fleet_total_cpu_pct_of_one_core": round(sum(cpu), 2),
            "machine_busy_pct_all_cores": round(busy, 1),
            "bench_process_cpu_pct": round((me1 - me0) / window * 100.0, 3)
            if me0 is not None and me1 is not None else None,
            "per_node": per_node,
            "profile": self.profile_finish(profiled),
        }

    def joiner_section(self) -> dict:
        boots = self.rng.sample([n for n in self.live() if n.addr], min(3, len(self.live())))
        observer = self.rng.choice([n for n in self.live() if n not in boots] or boots)
        node = B.add_node(self.fleet)
        self.joiner = node
        marks: dict[str, float] = {}
        tries = {"lookups": 0}
        stop = threading.Event()
        timeout = self.args.join_timeout_s

        def watch_status() -> None:
            while not stop.is_set() and time.monotonic() - t_spawn < timeout:
                s = node.try_ask("status")
                now = time.monotonic()
                if s is not None:
                    marks.setdefault("control_up", now)
                    if s["in_mesh"]:
                        marks.setdefault("in_mesh", now)
                    if s["in_mesh"] and s["peers"] >= 1:
                        marks.setdefault("first_peer", now)
                        return
                time.sleep(0.02)

        def watch_lookup() -> None:
            while not stop.is_set() and time.monotonic() - t_spawn < timeout:
                sent = time.monotonic()
                reply, _err, _rtt = B.timed_ask(observer, "lookup", peer_id=node.peer_id)
                tries["lookups"] += 1
                if reply and reply.get("found"):
                    marks["found_request_sent"] = sent
                    marks["found"] = time.monotonic()
                    return
                time.sleep(0.05)

        t_spawn = time.monotonic()
        marks["spawn"] = t_spawn
        node.start(NETWORK, [b.addr for b in boots])
        threads = [threading.Thread(target=watch_status, daemon=True),
                   threading.Thread(target=watch_lookup, daemon=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout + 5)
        stop.set()
        if not node.alive():
            raise RuntimeError(f"the joining node exited:\n{node.output()[-1500:]}")
        node.addr = (node.try_ask("status") or {}).get("listen_addrs", [""])[0]

        def since(a: str, b: str) -> float | None:
            return round(marks[b] - marks[a], 3) if a in marks and b in marks else None
        out: dict[str, Any] = {
            "method": f"Start node {node.index} (bootstrap: 3 random nodes) into the running "
                      f"fleet. t=0 when this process spawns it. A thread polls its control "
                      "'status' every 20 ms (control_up: first answer; in_mesh; first_peer: "
                      f"in_mesh with >= 1 peer); another has node {observer.index} look up its "
                      "record back to back (50 ms pause) until found. found_s = when the "
                      "successful lookup's reply came, found_request_sent_s = when it was sent. "
                      "Then every other original node looks it up once (sweep).",
            "node": node.index, "observer": observer.index,
            "bootstrap": [b.index for b in boots],
            "control_up_s": since("spawn", "control_up"),
            "in_mesh_s": since("spawn", "in_mesh"),
            "first_peer_s": since("spawn", "first_peer"),
            "found_s": since("spawn", "found"),
            "found_request_sent_s": since("spawn", "found_request_sent"),
            "found_after_in_mesh_s": since("in_mesh", "found"),
            "observer_lookups": tries["lookups"],
        }
        if "first_peer" not in marks:
            out["no_peer"] = ("the new node got no peer within "
                              f"{timeout:.0f} s; its log: " + node.output()[-1200:])
        if "found" in marks:
            sweep_start = time.monotonic()
            others = [n for n in self.live() if n is not observer]
            summary, _ = self.run_lookups([(r, node) for r in others], "new_node_sweep")
            out["sweep"] = {"started_s": round(sweep_start - t_spawn, 2),
                            "success_rate": summary["success_rate"],
                            "lookups": summary["lookups"], "misses": summary.get("misses", [])}
        return out

    def after_kill(self) -> dict:
        nodes = self.live()
        n_kill = max(1, round(self.args.kill_share * len(self.original))) \
            if self.args.kill_share > 0 else 0
        n_kill = min(n_kill, len(nodes) - 2)
        self.killed = self.rng.sample(nodes, n_kill)
        kill_t = time.monotonic()
        for node in self.killed:
            node.proc.send_signal(signal.SIGKILL)
        for node in self.killed:
            node.proc.wait(10)
        survivors = [n for n in self.original if n not in self.killed]
        time.sleep(self.args.after_kill_wait_s)
        # a reader that joins after the kill: it holds no copy of any record
        boots = self.rng.sample([n for n in survivors if n.addr], min(3, len(survivors)))
        late = B.add_node(self.fleet)
        self.late_reader = late
        late.start(NETWORK, [b.addr for b in boots])
        late_note = None
        try:
            wait_for(lambda: LocalFleet._check_alive(late) and (s := late.try_ask("status"))
                     and s["in_mesh"] and s["peers"] >= 1, 45.0, "the late reader to join")
        except FleetError as exc:
            late_note = f"{exc}; its log: {late.output()[-1200:]}"
        time.sleep(2.0)
        self.baseline(survivors + [late] + ([self.joiner] if self.joiner else []))
        started = time.monotonic() - kill_t

        surv_summary, _ = self.run_lookups(self.pairs(survivors, survivors, self.args.lookups),
                                           "survivors_from_survivors")
        dead_summary, _ = self.run_lookups(self.pairs(survivors, self.killed, self.args.lookups),
                                           "killed_from_survivors")
        fresh = [late] + ([self.joiner] if self.joiner and self.joiner.alive() else [])
        fresh_surv, _ = self.run_lookups([(r, t) for r in fresh for t in survivors],
                                         "survivors_from_fresh_readers")
        fresh_dead, _ = self.run_lookups([(r, t) for r in fresh for t in self.killed],
                                         "killed_from_fresh_readers")
        return {
            "method": f"SIGKILL {n_kill} of {len(self.original)} original nodes (a seeded random "
                      "choice; no leaving record), wait "
                      f"{self.args.after_kill_wait_s} s, start one more node (late reader, "
                      "bootstrapping from 3 random survivors), then look up records as in "
                      "lookups_full. Survivors' lookups of killed nodes' records can be "
                      "answered by the reader's own copy (every node got every record at "
                      "put time when N <= k+1); the fresh readers (the node started in "
                      "new_node_record, and the late reader) joined after all records were put "
                      "and republish is 1800 s, so what they find came from replicas over the "
                      "network. On loopback a killed peer's port refuses at once (RST): no "
                      "dial timeouts as with a car that vanished from a real network.",
            "killed": sorted(n.index for n in self.killed),
            "survivors": len(survivors), "fresh_readers": [n.index for n in fresh],
            "late_reader_ready_s": round(started, 1),
            "late_reader_problem": late_note,
            "fresh_readers_without_peers": [
                n.index for n in fresh if not ((n.try_ask("status") or {}).get("peers"))],
            "survivors_from_survivors": surv_summary,
            "killed_from_survivors": dead_summary,
            "survivors_from_fresh_readers": fresh_surv,
            "killed_from_fresh_readers": fresh_dead,
        }

    # --- verdicts ------------------------------------------------------------------------
    def get(self, *path: str) -> Any:
        cur: Any = self.result
        for p in path:
            if not isinstance(cur, dict) or p not in cur:
                return None
            cur = cur[p]
        return cur

    def targets(self, reasons: dict[str, str]) -> list[dict]:
        out = []
        get = self.get

        def target(name: str, want: str, value: Any, met: bool, why: str = "") -> None:
            entry = {"name": name, "target": want, "measured": value,
                     "met": met if value is not None else None}
            if why and value is not None and not met:
                entry["reason"] = why
            out.append(entry)

        for key, label in (("survivors_from_survivors", "from surviving nodes"),
                           ("survivors_from_fresh_readers", "from fresh readers")):
            v = get("lookups_after_kill", key, "success_rate")
            target(f"lookup success after SIGKILL of {self.args.kill_share:.0%} of the nodes: "
                   f"surviving nodes' records, {label}", f">= {TARGET_SURVIVOR_SUCCESS:.0%}", v,
                   v is not None and v >= TARGET_SURVIVOR_SUCCESS,
                   reasons.get("fresh_readers", "") if "fresh" in key and
                   reasons.get("fresh_readers") else f"see lookups_after_kill.{key}.misses")
        v = get("announcements", "latency_ms", "p99")
        dr = get("announcements", "delivery_ratio")
        target("announcement latency p99 (heard_at - sent_at, all receivers)",
               f"<= {TARGET_ANNOUNCE_P99_MS:g} ms", v,
               v is not None and v <= TARGET_ANNOUNCE_P99_MS and dr == 1.0,
               reasons.get("announcement_latency", "") +
               ("" if dr in (None, 1.0) else f" Delivery ratio {dr}: see announcements.missing."))
        v = get("idle", "cpu_pct_of_one_core", "max")
        target("idle CPU per node process (max over nodes; mean in idle)",
               f"<= {TARGET_IDLE_CPU_PCT:g}% of one core", v,
               v is not None and v <= TARGET_IDLE_CPU_PCT, reasons.get("idle_cpu", ""))
        v = get("idle", "rss_mb", "max")
        target("RSS per node process (max over nodes; mean in idle)", f"<= {TARGET_RSS_MB:g} MB",
               v, v is not None and v <= TARGET_RSS_MB, reasons.get("rss", ""))
        return out

    def reasons(self) -> dict[str, str]:
        """What the numbers say about why they are what they are (filled in from this run)."""
        get, out = self.get, {}
        cores = self.result["machine"]["cpus_usable"] or self.result["machine"]["cpu_count"] or 1
        idle_total = get("idle", "fleet_total_cpu_pct_of_one_core")
        ann = get("announcements", "fleet_cpu_during_sends")
        if isinstance(ann, dict) and "cpu_s" in ann:
            sent = get("announcements", "sent") or 1
            background = (idle_total or 0.0) / 100.0 * ann["window_s"]
            net_ms = max(0.0, ann["cpu_s"] - background) / sent * 1000.0
            other = get("announcements", "machine_load", "other_cpu_pct_of_one_core")
            prof = get("announcements", "profile") or {}
            areas = prof.get("busy_by_area_pct") or {}
            area_text = (" A py-spy sample of one receiver put its busy time in: " + ", ".join(
                f"{a} {p}%" for a, p in list(areas.items())[:6]) + ".") if areas else ""
            out["announcement_latency"] = (
                f"Each announcement cost the fleet {net_ms:.0f} ms of CPU net of idle "
                f"({net_ms / max(1, self.args.nodes):.1f} ms per node): every node receives "
                "it from several mesh peers (GossipSub D=6, D_hi=12, duplicates are decrypted "
                "and parsed before the seen-check), verifies the signed peer record carried "
                "in every RPC, checks the envelope signature once, and forwards it to its "
                "mesh peers one by one through Python noise + yamux framing. "
                f"With {self.args.nodes} node processes on {cores} core(s) that alone takes "
                f">= {net_ms / cores:.0f} ms of wall time per announcement, so the last "
                "receivers wait in the run queue: the latency is bounded by the machine's "
                "CPU, not by the network. "
                f"Other load on the machine during the section: {other}% of one core."
                + area_text)
        mx = get("idle", "cpu_pct_of_one_core", "max")
        if mx is not None:
            prof = get("idle", "profile") or {}
            areas = prof.get("busy_by_area_pct") or {}
            out["idle_cpu"] = (
                "Periodic work in every node while idle: the GossipSub heartbeat every 1 s "
                "(mesh upkeep, scoring of every peer, gossip emission), the policy loop every "
                "5 s (node.POLL_S), yamux/noise per-connection bookkeeping, py-libp2p's own "
                "periodic tasks (connection pruning, DHT routing-table refresh every 5-10 min)."
                + (" py-spy busy time by area: " + ", ".join(f"{a} {p}%" for a, p in
                                                               list(areas.items())[:6]) + "."
                   if areas else ""))
        if get("idle", "rss_mb", "max") is not None:
            out["rss"] = ("Resident memory is mostly the interpreter and its imports (py-libp2p, "
                          "trio, cryptography, PyNaCl, protobuf, multiaddr, click); see "
                          "idle.per_node.")
        sources = get("lookups_full", "inbound_connections", "distinct_source_ips")
        boot_fail = get("node_logs", "bootstrap_failed", "nodes")
        if sources == ["127.0.0.1"] or boot_fail:
            out["fleet_start"] = (
                "Every accepted loopback connection comes from source address "
                f"{', '.join(sources or ['?'])}: nodes listen on 127.0.<i+1>.1 but dial without "
                "binding a source address, so the kernel uses 127.0.0.1 for all of them. "
                "Mesh fix 8 (libp2p_fixes.limit_inbound_per_ip: at most 4 handshakes in "
                "progress and 16 inbound connections per source IP) therefore sees the whole "
                "loopback fleet as ONE source: when LocalFleet.start() starts 19 nodes at once "
                "against node 0, node 0 closes all but 4 handshakes; py-libp2p then puts node 0 "
                "in the dialer's 60 s negative cache, and the bootstrap back-off keeps the "
                "refused nodes alone for a minute or more. No node can accept more than 16 connections from the rest of "
                "the fleet either. --start-batch 3 starts the nodes in small groups with several "
                "bootstrap peers, which gets a connected fleet all the same. "
                f"Nodes whose log shows a failed bootstrap in this run: {boot_fail or 'none'}.")
        alone = get("lookups_after_kill", "fresh_readers_without_peers")
        if alone:
            out["fresh_readers"] = (
                f"Fresh reader(s) {alone} had no peer, so their lookups ran 0 rounds and found "
                "nothing: their bootstrap dials were refused (see reasons.fleet_start, "
                "node_logs, new_node_record.no_peer, lookups_after_kill.late_reader_problem).")
        lk = get("lookups_full")
        if isinstance(lk, dict) and lk.get("rounds", {}).get("mean"):
            out["lookup_cost"] = (
                f"Every lookup took {lk['rounds']['mean']:g} rounds and {lk['rpcs']['mean']:g} "
                "GET_VALUE RPCs: the walk queries every one of the k=20 closest peers it finds "
                "(all peers when N <= k+1) and does not stop at the first valid copy, so "
                "it costs ceil(min(N-1, k)/alpha) rounds; latency per round is about "
                f"{(lk['latency_raw_later_lookups_ms']['p50'] or 0) / lk['rounds']['mean']:.0f}"
                " ms here (Python noise+yamux streams, one new stream per RPC). A reader's "
                "first lookup also dials the peers it was not connected to "
                f"(first-lookup p50 {lk['latency_raw_first_lookup_per_reader_ms']['p50']} ms "
                f"vs later p50 {lk['latency_raw_later_lookups_ms']['p50']} ms).")
        ak = get("lookups_after_kill", "survivors_from_survivors")
        if isinstance(ak, dict) and ak.get("lookups"):
            live_others = (get("lookups_after_kill", "survivors") or 0) + len(
                get("lookups_after_kill", "fresh_readers") or []) - 1
            resp = ak.get("responses", {}).get("max")
            text = (
                f"After the kill, a reader's first lookup took p50 "
                f"{ak['latency_raw_first_lookup_per_reader_ms']['p50']} ms (max "
                f"{ak['latency_raw_first_lookup_per_reader_ms']['max']} ms) against later "
                f"p50 {ak['latency_raw_later_lookups_ms']['p50']} ms: each killed peer in a "
                "round costs py-libp2p's dial retries (RetryConfig: 3 retries at 0.1, 0.2, "
                "0.4 s, about 0.7 s even though loopback refuses at once) and a round waits "
                "for its slowest query. On a real network a vanished car drops packets: "
                "each such query would hold its round for dht_lookup.QUERY_TIMEOUT_S (5 s).")
            if resp is not None and resp > live_others:
                text += (f" The walk reported up to {resp} 'responses' with only {live_others} "
                         "other live nodes: libp2p's ValueStore._get_from_peer returns "
                         "(None, []) on a failed dial instead of raising, so "
                         "dht_lookup.walk counts dead peers as responders (and may pick them "
                         "as put targets among the k closest).")
            out["lookups_after_kill"] = text
        return out

    # --- the run -------------------------------------------------------------------------
    def run(self) -> dict:
        shutdown: dict = {}
        try:
            if self.section("fleet", self.start_fleet) is None:
                raise RuntimeError("the fleet did not start; nothing to measure")
            self.section("lookups_full", self.lookups_full)
            self.section("announcements", self.announcements)
            self.section("idle", self.idle)
            self.section("new_node_record", self.joiner_section)
            if self.args.kill_share > 0:
                self.section("lookups_after_kill", self.after_kill)
        except Exception as exc:  # noqa: BLE001
            self.errors.append({"section": "run", "error": f"{type(exc).__name__}: {exc}"})
        finally:
            log("stopping every node (SIGTERM all, then wait) ...")
            try:
                shutdown = B.stop_all(self.fleet.nodes)
            except Exception as exc:  # noqa: BLE001
                shutdown = {"error": str(exc)}
            try:
                self.fleet.stop()
            except Exception as exc:  # noqa: BLE001
                shutdown["fleet_stop_error"] = str(exc)
            shutdown["method"] = ("SIGTERM to every live node at once (each publishes its "
                                  "leaving record, closes its host and exits), wait up to "
                                  "20 s, SIGKILL stragglers; then LocalFleet.stop().")
            self.result["shutdown"] = shutdown
            self.result["node_logs"] = B.scan_logs(
                {n.index: n.output() for n in self.fleet.nodes}, LOG_PATTERNS)
            if not self.args.keep:
                shutil.rmtree(self.root, ignore_errors=True)
            else:
                self.result["kept_dir"] = str(self.root)
        reasons = self.reasons()
        self.result["targets"] = self.targets(reasons)
        self.result["reasons"] = reasons
        self.result["node_requests"] = NODE_REQUESTS
        self.result["errors"] = self.errors
        if self.args.raw:
            self.result["raw_lookups"] = self.raw
        self.result["duration_s"] = round(time.monotonic() - _T0, 1)
        return self.result


LOG_PATTERNS = {
    "bootstrap_failed": "no bootstrap peer answered",
    "dial_blocked_by_negative_cache": "recently failed all addresses (negative cache)",
    "security_upgrade_failed": "failed to upgrade security",
    "traceback": "Traceback (most recent call last)",
    "error_lines": "ERROR",
}

NODE_REQUESTS = [
    "lookup reply: add the in-node duration of mesh.get_capacity (e.g. lookup.elapsed_ms, "
    "time.perf_counter around the call in Node._lookup), so lookup latency needs no "
    "control-socket baseline subtraction.",
    "lookup reply: add lookup.values (how many peers' GET_VALUE answers carried a copy) and "
    "lookup.local (a copy was already in the reader's own value store), so a find from the "
    "network can be told from a cache hit (with N <= k+1 every node holds every record).",
    "status: add the time and peer count of the last successful capacity put "
    "(mesh.last_put_peers and when), so 'record reachable' can be timed without polling "
    "lookups from another node.",
    "status or peers: add the GossipSub mesh size per topic (gossipsub.mesh[topic]), so "
    "announcement hops and duplicate deliveries can be related to the mesh degree.",
    "announce reply: sent_at is taken after pubsub.publish returns; a started_at taken "
    "before it would bound the publisher's own share of the latency.",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=None, help="node processes (default 20; 5 with --quick)")
    ap.add_argument("--kill-share", type=float, default=0.3,
                    help="share of the nodes to SIGKILL for the churn lookups (default 0.3)")
    ap.add_argument("--announcements", type=int, default=None,
                    help="job announcements to gossip (default 20; 5 with --quick)")
    ap.add_argument("--spacing", type=float, default=0.5,
                    help="seconds between announcements (>= 0.5: the topic is low-rate)")
    ap.add_argument("--lookups", type=int, default=0,
                    help="lookups per lookup set: a seeded random sample; 0 = all pairs")
    ap.add_argument("--seed", type=int, default=1, help="seed for samples, kill set, publisher")
    ap.add_argument("--idle-s", type=float, default=None,
                    help="idle CPU sampling window (default 20 s; 6 s with --quick)")
    ap.add_argument("--settle-s", type=float, default=None,
                    help="wait after the fleet is ready (default 10 s; 3 s with --quick)")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    ap.add_argument("--quick", action="store_true", help="a small smoke run (5 nodes)")
    ap.add_argument("--keep", action="store_true", help="keep the fleet's data dirs and logs")
    ap.add_argument("--raw", action="store_true", help="include every lookup in the JSON")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="first wait up to S seconds until the machine is < 30%% busy "
                         "(others' work on a shared machine skews latencies)")
    ap.add_argument("--start-batch", type=int, default=0,
                    help="start the nodes in groups of this many (0: LocalFleet.start(), all "
                         "at once; see reasons.fleet_start)")
    ap.add_argument("--profile", action="store_true",
                    help="sample one node with py-spy (if installed) while idle and while "
                         "announcements pass (perturbs the timings a little)")
    ap.add_argument("--py-spy", default=None, help="path of py-spy (default: on PATH)")
    ap.add_argument("--workdir", default=None, help="where the fleet's temp dir goes")
    args = ap.parse_args(argv)
    if args.spacing < 0.5:
        ap.error("--spacing must be >= 0.5 s (announcement topics stay low-rate)")
    if not 0.0 <= args.kill_share < 1.0:
        ap.error("--kill-share must be in [0, 1)")
    q = args.quick
    args.nodes = args.nodes or (5 if q else 20)
    if args.nodes < 3:
        ap.error("--nodes must be >= 3")
    args.announcements = args.announcements if args.announcements is not None else (5 if q else 20)
    args.idle_s = args.idle_s or (6.0 if q else 20.0)
    args.settle_s = args.settle_s if args.settle_s is not None else (3.0 if q else 10.0)
    args.idle_settle_s = 2.0 if q else 5.0
    args.collect_s = 10.0
    args.after_kill_wait_s = 1.0
    args.join_timeout_s = 60.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet = None
    if args.wait_quiet > 0:
        log(f"waiting up to {args.wait_quiet:g} s for the machine to be < 30% busy ...")
        quiet = B.wait_quiet(args.wait_quiet)
    bench = Bench(args)
    bench.result["config"]["wait_quiet"] = quiet

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    result = bench.run()
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    for t in result["targets"]:
        log(f"target {t['name']}: {t['measured']} ({t['target']}) -> "
            f"{'met' if t['met'] else 'NOT met' if t['met'] is False else 'not measured'}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
