"""`make demo`: a local fleet of real p2pfleet node processes on this machine.

What it shows, until the publisher side lands (verified work is the next issue):
- N nodes start (`p2pfleet node init` + `node start`), each with its own Ed25519 identity,
  data dir and control socket; they form a Kademlia DHT and a GossipSub mesh on loopback;
- every node finds every other node's signed capacity record in the DHT;
- a publisher's signed job announcement reaches every node by gossip;
- one node replays a vehicle trace: it is plugged in, unplugged (it publishes a leaving
  record and leaves the mesh entirely: no sockets), and plugged in again (it rejoins);
- every node stops cleanly on SIGTERM.
Everything is checked, not just printed: the demo exits non-zero if any step fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from p2pfleet.identity import Identity
from p2pfleet.localfleet import FleetError, LocalFleet, mesh_sockets, wait_for
from p2pfleet.wire.envelope import seal
from p2pfleet.wire.kinds import JobAnnouncement, Requirements

NETWORK = "demo"
SPEEDUP = 3.0
CAR_TRACE = [
    {"format": "p2pfleet-vehicle-trace", "version": 1, "start": 0, "loop": False,
     "description": "demo car in its garage: plugged in, unplugged for a while, plugged in again"},
    {"t": 0, "parked": True, "plugged_in": True, "soc_pct": 78, "charge_limit_pct": 90,
     "network": "wifi", "metered": False, "battery_temp_c": 21, "cabin_temp_c": 19},
    {"t": 45, "plugged_in": False},
    {"t": 90, "plugged_in": True},
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="4 nodes (for the test suite)")
    parser.add_argument("--keep", action="store_true", help="keep the fleet's directory")
    args = parser.parse_args()
    n = 4 if args.quick else max(3, args.nodes)
    console = Console()
    root = Path(tempfile.mkdtemp(prefix="p2pfleet-demo-"))
    trace = root / "car.jsonl"
    trace.write_text("\n".join(json.dumps(line) for line in CAR_TRACE) + "\n")
    car_index = n - 1
    fleet = LocalFleet(root / "fleet", n, network=NETWORK, traces={car_index: str(trace)},
                       trace_speedup=SPEEDUP)
    start = time.monotonic()
    try:
        console.rule(f"[bold]p2pfleet demo: {n} node processes on loopback, network '{NETWORK}'")
        with console.status("starting nodes..."):
            fleet.start()
        car = fleet.nodes[car_index]
        wait_for(lambda: car.ask("status")["in_mesh"], 30, "the car to join")
        table = Table("node", "peer id", "listens on", "vehicle")
        for node in fleet.nodes:
            status = node.ask("status")
            table.add_row(str(node.index), node.peer_id, ", ".join(status["listen_addrs"]) or "-",
                          "trace (plugged in)" if node is car else "static, plugged in")
        console.print(table)

        console.rule("DHT: every node looks up every node's signed capacity record")
        found = 0
        for reader in fleet.nodes:
            for owner in fleet.nodes:
                wait_for(lambda: reader.ask("lookup", peer_id=owner.peer_id)["found"], 30,
                         f"node {reader.index} to find node {owner.index}")
                found += 1
        sample = fleet.nodes[0].ask("lookup", peer_id=car.peer_id)
        console.print(f"{found}/{n * n} records found and verified. Node 0's view of the car: "
                      f"state [bold]{sample['record']['state']}[/], seq {sample['record']['seq']}, "
                      f"{sample['lookup']['rpcs']} DHT RPCs")

        console.rule("Gossip: a publisher announces a job")
        publisher = Identity.generate()
        now_ms = int(time.time() * 1000)
        job_id = os.urandom(16)
        body = JobAnnouncement(
            seq=now_ms, exp=now_ms + 600_000, job_id=job_id, model_digest=os.urandom(32),
            model_size=1_000_000, requirements=Requirements(min_memory_mb=256, providers=(),
                                                           min_sw_version="0.1.0",
                                                           ort_versions=">=1.32,<2"),
            credit_rate=1, quorum=2, shards_total=100, shards_left=100, addrs=())
        time.sleep(1.5)  # a few heartbeats for the gossip mesh
        sent = fleet.nodes[0].ask("announce", envelope_hex=seal(body, publisher, NETWORK).hex())
        delays = []
        for node in fleet.nodes:
            heard = wait_for(lambda: [j for j in node.ask("jobs")["jobs"]
                                      if j["job_id"] == job_id.hex()], 15,
                             f"node {node.index} to hear the job")
            delays.append((heard[0]["heard_at"] - sent["sent_at"]) * 1000)
        console.print(f"job {job_id.hex()[:12]}... from publisher {publisher.peer_id[:16]}... "
                      f"heard by {len(delays)}/{n} nodes, slowest after {max(delays):.0f} ms")

        console.rule("Vehicle policy: the car is unplugged (still on the home wifi)")
        status = wait_for(lambda: (s := car.ask("status")) and not s["in_mesh"] and s, 60,
                          "the car to leave")
        console.print("car: " + "; ".join(status["why"][1:-1] or status["why"]))
        leaving = wait_for(lambda: (r := fleet.nodes[0].ask("lookup", peer_id=car.peer_id))
                           ["found"] and r["record"]["state"] == "leaving" and r, 30,
                           "the leaving record")
        sockets = mesh_sockets(car)
        if sockets:
            raise FleetError(f"the car left the mesh but holds {sockets} TCP sockets")
        console.print(f"node 0 now sees the car's record as [bold]{leaving['record']['state']}[/]; "
                      f"the car's process holds {sockets} TCP sockets")

        console.rule("The car is plugged in again")
        wait_for(lambda: car.ask("status")["in_mesh"], 60, "the car to rejoin")
        back = wait_for(lambda: (r := fleet.nodes[0].ask("lookup", peer_id=car.peer_id))["found"]
                        and r["record"]["state"] == "available" and r, 30, "the fresh record")
        console.print(f"the car rejoined; its record is [bold]{back['record']['state']}[/] again "
                      f"(seq {back['record']['seq']})")
    except FleetError as exc:
        console.print(f"[bold red]demo failed:[/] {exc}")
        return 1
    finally:
        with console.status("stopping nodes (SIGTERM)..."):
            try:
                fleet.stop()
            except FleetError as exc:
                console.print(f"[bold red]{exc}[/]")
        if not args.keep:
            import shutil
            shutil.rmtree(root, ignore_errors=True)
    console.rule(f"[bold green]demo passed in {time.monotonic() - start:.0f} s")
    console.print("Next: verified inference across this fleet arrives with the publisher SDK "
                  "(see the open issues).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
