#!/usr/bin/env python3
"""Network benchmark: one verified job on shaped test-bed links against the same job on an
unshaped bed link and on loopback, in one run (issue 15, "Show").

One run, one machine, JSON out (stdout and tools/bench_net.last.json; progress on stderr).
Needs root (the bed: tools/netbed). For each link profile a fresh fleet of --nodes real
`p2pfleet node start` processes and a `p2pfleet job submit` publisher (the same job: the
digits classifier, --samples inputs, 50-row shards, quorum 2, every node trusted):

- loopback: the nodes and the publisher on 127.0.0.1-style addresses, no bed;
- bed: the publisher and the nodes on public bed hosts, unshaped links;
- shaped profiles: every node's link gets tbf at the rate both ways, the nftables loss rule,
  and latency from netbed.linkdelay (a user-space layer-2 delay: this kernel has no netem)
  holding each frame the profile's delay each way; the publisher's link is unshaped (a
  well-connected publisher, the cars on slow links), so a publisher-node round trip is
  2 x delay (measured with a TCP probe and reported).

Throughput and time to first verified result come from the publisher's own job store: the
job's creation time, and per shard the time its `target`-th agreeing result was received
(the moment it could be accepted). Throughput = samples / (last shard's time - creation).
Then the share of NATed nodes reached directly: nodes each behind its own NAT router (two
port-preserving, one symmetric by default) and a public relay node; one more node behind a
port-preserving NAT reaches each of them through its relayed address; a node counts as
reached directly when its hole punch (DCUtR, net/holepunch.py) ends "direct" within 60 s.

    sudo tools/bench_net.py            # the full run (about 5 minutes on 2 cores)
    sudo tools/bench_net.py --quick    # fewer samples
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tools"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import benchlib as B  # noqa: E402
import netbed  # noqa: E402
from netbed.jobs import (NETWORK, NODE_SETTINGS, publisher_argv, start_fleet,  # noqa: E402
                         submit)
from netbed.linkdelay import delay_link  # noqa: E402

from p2pfleet.live.control import ControlError  # noqa: E402
from p2pfleet.live.localfleet import LocalFleet, wait_for  # noqa: E402
from p2pfleet.zoo import digits  # noqa: E402

OUT = Path(__file__).with_suffix(".last.json")
PROBE = ROOT / "tools" / "netbed" / "probe.py"
PROFILES = {  # name: (rate Mbit/s, one-way delay ms per node link, loss %)
    "100mbit_30ms": (100, 30, 0),
    "20mbit_80ms_1pct": (20, 80, 1),
}
SHARD, QUORUM = 50, 2
OUTPUT = "probabilities"  # the digits model's output compared with a local run


def log(msg: str) -> None:
    print(f"[bench_net] {msg}", file=sys.stderr, flush=True)


def job_timing(pub_root: Path, samples: int) -> dict:
    """Creation -> first and last shard acceptable, from the publisher's store."""
    db = sqlite3.connect(f"file:{pub_root / 'publisher' / 'jobs.sqlite'}?mode=ro", uri=True)
    try:
        (created,) = db.execute("select created_ms from jobs").fetchone()
        targets = dict(db.execute("select idx, target from shards"))
        received: dict[int, list[int]] = {}
        for shard, at in db.execute(
                "select l.shard, r.received_ms from leases l join results r using (lease_id) "
                "where l.verdict = 'valid'"):
            received.setdefault(shard, []).append(at)
    finally:
        db.close()
    # a shard is acceptable once `target` valid results are in (fewer when the publisher
    # accepted it with fewer, e.g. an audit replica it dropped)
    done = [sorted(t)[min(len(t), max(1, targets[s])) - 1] for s, t in received.items()]
    if len(done) < len(targets):
        return {"complete": False, "shards": len(targets), "acceptable": len(done)}
    span = (max(done) - created) / 1000
    return {"complete": True, "shards": len(targets),
            "first_verified_s": round((min(done) - created) / 1000, 2),
            "job_s": round(span, 2), "samples_per_s": round(samples / span, 1)}


def run_job(popen_publisher, pub_root: Path, out: Path, want: np.ndarray, samples: int,
            timeout: float) -> dict:
    proc = popen_publisher()
    stdout, stderr = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        return {"error": stderr.strip()[-1500:]}
    report = json.loads(stdout)["report"]
    path = out / f"{OUTPUT}.npy"
    got = np.load(path) if path.exists() else None
    res = {"state": report["state"], "accepted": report["accepted"],
           "outputs_equal_local_run": got is not None and np.array_equal(got, want)}
    return {**res, **job_timing(pub_root, samples)}


def trust(nodes) -> list[str]:
    return [a for n in nodes for a in ("--trust", n.peer_id)]


def loopback(work: Path, files: tuple[Path, Path], want, samples, n_nodes) -> dict:
    fleet = LocalFleet(work / "fleet", n_nodes, network=NETWORK, settings=NODE_SETTINGS)
    fleet.start()
    try:
        pub_root, out = work / "pub", work / "out"
        argv = publisher_argv(pub_root, "/ip4/127.0.95.1/tcp/0", *files, out,
                              fleet.nodes[0].addr, "--shard-size", str(SHARD),
                              "--quorum", str(QUORUM), "--timeout", "600", *trust(fleet.nodes))
        return run_job(lambda: subprocess.Popen(argv, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE, text=True),
                       pub_root, out, want, samples, 700)
    finally:
        B.stop_all(fleet.nodes)


def rtt_ms(src: netbed.Host, dst: netbed.Host) -> float | None:
    echo = dst.python([str(PROBE), "tcp-echo", "--listen", f"{dst.ip}:0"],
                      stdout=subprocess.PIPE, text=True)
    addr = echo.stdout.readline().split()[1]
    out = src.run([sys.executable, str(PROBE), "tcp-rtt", "--to", addr, "--rounds", "5"],
                  check=False)
    echo.terminate()
    try:
        return round(json.loads(out.stdout.strip().splitlines()[-1])["min_rtt_ms"], 1)
    except (IndexError, KeyError, ValueError):
        return None


def bed_run(work: Path, files, want, samples, n_nodes, profile) -> dict:
    with netbed.Bed() as bed:
        pub = bed.public("publisher")
        hosts = [bed.public(f"n{i}") for i in range(n_nodes)]
        link = {"shaped": False}
        if profile:
            rate, delay, loss = profile
            for h in hosts:
                bed.shape(h, rate_mbit=rate, loss_pct=loss)
                delay_link(h, delay)
            link = {"shaped": True, "rate_mbit": rate, "node_link_delay_ms_each_way": delay,
                    "loss_pct_each_way": loss}
        link["publisher_node_rtt_ms_measured"] = rtt_ms(pub, hosts[0])
        nodes = start_fleet(hosts, work)
        pub_root, out = work / "pub", work / "out"
        res = run_job(lambda: submit(pub, pub_root, *files, out, nodes[0].addr,
                                     "--shard-size", str(SHARD), "--quorum", str(QUORUM),
                                     "--timeout", "600", *trust(nodes)),
                      pub_root, out, want, samples, 700)
        B.stop_all(nodes)
        return {"link": link, **res}


def nat_direct(work: Path, modes: list[str]) -> dict:
    """NATed nodes, each behind its own router (`modes`: preserve = port-preserving, random =
    symmetric), each reached through its relay reservation by one more node behind a
    port-preserving NAT (a typical home peer); the reached node then punches
    (net/holepunch.py). Direct = its punch outcome becomes "direct" within 60 s."""
    with netbed.Bed() as bed:
        relay = netbed.start_node(bed.public("relay"), work)
        cars = [netbed.start_node(bed.behind(bed.nat_router(f"home{i}", mode=m), f"car{i}"),
                                  work, bootstrap=[relay.addr]) for i, m in enumerate(modes)]
        asker = netbed.start_node(bed.behind(bed.nat_router("askhome", mode="preserve"),
                                             "asker"), work, bootstrap=[relay.addr])
        for car in (*cars, asker):
            wait_for(lambda c=car: (c.try_ask("status") or {}).get("relay_addrs"), 120,
                     "a NATed node's relay reservation")
        reached = []
        for i, car in enumerate(cars):
            wait_for(lambda c=car, a=asker: any("/p2p-circuit" in x for x in (a.try_ask(
                "lookup", peer_id=c.peer_id) or {}).get("record", {}).get("addrs", [])), 120,
                "the NATed node's record with its relayed address")
            try:
                reach = asker.ask("reach", peer_id=car.peer_id)
            except ControlError as exc:
                reach = {"ok": False, "error": str(exc)[:300]}

            def outcome(c=car) -> str | None:
                return ((c.try_ask("status") or {}).get("hole_punch") or {}).get(asker.peer_id)
            try:
                punch = wait_for(lambda: outcome() == "direct" and "direct", 60, "a punch")
            except Exception:  # noqa: BLE001 - not direct: the last outcome is reported
                punch = outcome() or "no outcome"
            reached.append({"nat_mode": modes[i], "reach_ok": reach.get("ok"),
                            "punch": punch, "direct": punch == "direct"})
        B.stop_all([relay, asker, *cars])
    direct = sum(r["direct"] for r in reached)
    per_mode = {m: {"nodes": modes.count(m),
                    "direct": sum(r["direct"] for r in reached if r["nat_mode"] == m)}
                for m in dict.fromkeys(modes)}
    return {"nated_nodes": len(modes), "reached_directly": direct,
            "share_direct": B.rate(direct, len(modes)), "per_mode": per_mode,
            "reach": reached}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="400 samples instead of 1200")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--nat-modes", default="preserve,preserve,random",
                    help="NAT of each NATed node in the direct-reach part ('' skips it)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    reason = netbed.missing()
    if reason:
        sys.exit(f"bench_net: {reason}")
    samples = 400 if args.quick else 1200
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="bench-net-"))
    model, name, gen = digits()
    X = gen(samples)
    files = (work / "model.onnx", work / "x.npy")
    files[0].write_bytes(model)
    np.save(files[1], X)
    import onnxruntime as ort
    want = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(
        [OUTPUT], {name: X})[0]
    result: dict = {
        "benchmark": "net", "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick, "machine": B.machine_info(),
        "job": {"model": "digits", "samples": samples, "shard_size": SHARD, "quorum": QUORUM,
                "nodes": args.nodes, "every_node_trusted": True},
        "method": ("fresh fleet per profile: real node processes + a `job submit` publisher "
                   "process; times from the publisher's job store (creation -> a shard's "
                   "target-th agreeing result received); shaped: tbf + nftables loss + "
                   "linkdelay (user-space L2 delay, no netem here) on every node's link, the "
                   "publisher's link unshaped"),
        "runs": {}}
    try:
        result["machine_quiet"] = B.wait_quiet(20.0)
        for label, profile in [("loopback", None), ("bed_unshaped", None), *PROFILES.items()]:
            log(f"{label}: {samples} samples")
            sub = work / label
            sub.mkdir()
            if label == "loopback":
                result["runs"][label] = loopback(sub, files, want, samples, args.nodes)
            else:
                result["runs"][label] = bed_run(sub, files, want, samples, args.nodes, profile)
            log(f"{label}: {json.dumps(result['runs'][label])}")
        modes = [m for m in args.nat_modes.split(",") if m]
        if modes:
            log("NATed nodes reached directly")
            result["nat"] = nat_direct(work / "nat", modes)
    finally:
        result["elapsed_s"] = round(time.monotonic() - started, 1)
        shutil.rmtree(work, ignore_errors=True)
        text = json.dumps(result, indent=2, default=str)
        print(text)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
