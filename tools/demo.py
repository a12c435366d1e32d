"""`make demo`: verified inference on a local fleet of real p2pfleet node processes.

What it runs, all on this machine over TCP on loopback:
- N nodes (`p2pfleet node init` + `node start`), each with its own Ed25519 identity, data
  dir, ledger and sandbox; they form a Kademlia DHT and a GossipSub mesh, and every node
  finds every other node's signed capacity record;
- one node is a car replaying a vehicle trace: it unplugs during the job (handing back what
  it started and leaving the mesh entirely) and plugs in again;
- one node cheats: it computes with fp16-rounded weights and reports that as the real thing;
- a publisher (the SDK, `p2pfleet.sdk`) submits a trained digits classifier over the 1797
  images of scikit-learn's digits set, with quorum 2; nodes pull leases, fetch the model and
  their inputs over the network, compute in their sandboxes and return signed results;
- the report: every accepted output equals a local onnxruntime run, the cheater excluded
  with a signed evidence report, credit per node from each node's own ledger.
Everything is checked, not just printed: the demo exits non-zero if any step fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import trio
from rich.console import Console
from rich.table import Table

from p2pfleet.core.scheduler import SchedulerSettings
from p2pfleet.live.control import ControlError
from p2pfleet.core.trust import TrustSettings
from p2pfleet.live.localfleet import FleetError, LocalFleet, wait_for
from p2pfleet.publisher import PublisherSettings
from p2pfleet.sdk import connect

NETWORK = "demo"
SPEEDUP = 3.0
CAR_TRACE = [
    {"format": "p2pfleet-vehicle-trace", "version": 1, "start": 0, "loop": False,
     "description": "demo car in its garage: plugged in, unplugged for a while, plugged in again"},
    {"t": 0, "parked": True, "plugged_in": True, "soc_pct": 78, "charge_limit_pct": 90,
     "network": "wifi", "metered": False, "battery_temp_c": 21, "cabin_temp_c": 19},
    {"t": 27, "plugged_in": False},
    {"t": 54, "plugged_in": True},
]
NODE_SETTINGS = {"publishers.serve_anyone": "true", "publishers.retry_base_s": "1",
                 "policy.max_threads": "1"}
# The publisher's demo settings: everything happens in a minute, so a new identity counts
# as established after 3 agreeing results (the default is 10 and a day) and leases are short.
PUBLISHER = PublisherSettings(
    scheduler=SchedulerSettings(request_interval_ms=200, min_deadline_ms=60_000,
                                cross_class_wait_ms=1_000,
                                trust=TrustSettings(established_accepted=3, established_age_ms=0)),
    announce_interval_s=2.0)


def lookup(reader, owner) -> bool | str:
    """True when `reader` finds `owner`'s verified record; "out" when `reader` is out of
    the mesh (a car its trace unplugged)."""
    try:
        return reader.ask("lookup", peer_id=owner.peer_id)["found"]
    except ControlError as exc:
        if "out of the mesh" in str(exc):
            return "out"
        raise


def digits_data() -> tuple[bytes, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    from p2pfleet.zoo import digits

    model, _name, _inputs = digits()
    X, y = load_digits(return_X_y=True)
    return model, (X / 16.0).astype(np.float32), y


def local_run(model: bytes, X: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {"X": X})))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="4 nodes (for the test suite)")
    parser.add_argument("--keep", action="store_true", help="keep the fleet's directory")
    args = parser.parse_args()
    n = 4 if args.quick else max(4, args.nodes)
    console = Console()
    root = Path(tempfile.mkdtemp(prefix="p2pfleet-demo-"))
    trace = root / "car.jsonl"
    trace.write_text("\n".join(json.dumps(line) for line in CAR_TRACE) + "\n")
    car_i, cheat_i = n - 1, n - 2
    fleet = LocalFleet(root / "fleet", n, network=NETWORK, settings=NODE_SETTINGS,
                       traces={car_i: str(trace)}, trace_speedup=SPEEDUP)
    fleet.nodes[cheat_i].args = ("--cheat", "fp16")
    start = time.monotonic()
    try:
        console.rule(f"[bold]p2pfleet demo: {n} node processes on loopback, network '{NETWORK}'")
        model, X, y = digits_data()
        with console.status("starting nodes..."):
            fleet.start()
        car, cheater = fleet.nodes[car_i], fleet.nodes[cheat_i]
        wait_for(lambda: car.ask("status")["in_mesh"], 30, "the car to join")
        table = Table("node", "peer id", "listens on", "role")
        for node in fleet.nodes:
            status = node.ask("status")
            role = ("car replaying a trace (unplugs mid-job)" if node is car else
                    "[red]cheater: fp16-rounded weights[/]" if node is cheater else
                    "honest, plugged in" + (" (publisher's own machine)" if node.index < 2 else ""))
            table.add_row(str(node.index), node.peer_id, ", ".join(status["listen_addrs"]) or "-",
                          role)
        console.print(table)

        console.rule("DHT: every node looks up every node's signed capacity record")
        found = 0
        for reader in fleet.nodes:
            for owner in fleet.nodes:
                found += wait_for(lambda: lookup(reader, owner), 30,
                                  f"node {reader.index} to find node {owner.index}") is True
        # On a slow machine the car's trace may unplug it before this check ends: a node
        # out of the mesh looks nothing up (its own record then says it is leaving).
        console.print(f"{found}/{n * n} records found and verified"
                      + ("" if found == n * n else " (the car left the mesh meanwhile)"))

        console.rule("Verified inference: a digits classifier over 1797 images, quorum 2")
        report, outputs, ledgers = trio.run(publish, fleet, model, X, console)
        check(console, fleet, report, outputs, model, X, y, ledgers, cheater, car)
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
    return 0


async def publish(fleet: LocalFleet, model: bytes, X: np.ndarray, console: Console):
    trusted = [fleet.nodes[0].peer_id, fleet.nodes[1].peer_id]
    async with connect(fleet.root.parent / "publisher", network=NETWORK,
                       listen=["/ip4/127.0.200.1/tcp/0"], bootstrap=[fleet.nodes[0].addr],
                       settings=PUBLISHER, trusted=trusted) as client:
        console.print(f"publisher {client.peer_id} trusts nodes 0 and 1 (its own machines)")
        job = await client.submit(model, {"X": X}, shard_size=30, micro_batch=5, quorum=2)
        st = job.status()
        console.print(f"job {job.id}: {job.samples()} samples in {st.shards} shards")
        report = await job.wait(progress=True, timeout=240)
        outputs = job.outputs() if report.accepted == report.shards else {}
    ledgers = {node.index: node_credit(node) for node in fleet.nodes}
    return report, outputs, ledgers


def node_credit(node) -> dict:
    import subprocess

    from p2pfleet.live.localfleet import P2PFLEET

    out = subprocess.run([*P2PFLEET, "--data-dir", str(node.data_dir), "ledger", "--json"],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise FleetError(f"node {node.index}: p2pfleet ledger failed: {out.stderr.strip()}")
    pubs = json.loads(out.stdout)["publishers"]
    return {"paid": sum(p["credit"]["paid"] for p in pubs),
            "compute_ms": sum(p["compute_ms"] for p in pubs),
            "results": sum(p.get("results_delivered", 0) for p in pubs)}


def check(console: Console, fleet: LocalFleet, report, outputs, model, X, y, ledgers,
          cheater, car) -> None:
    console.print(report.table())
    if report.state != "done" or report.accepted != report.shards:
        raise FleetError(f"job ended {report.state} with {report.accepted}/{report.shards} "
                         f"shards accepted ({report.waiting})")
    local = local_run(model, X)
    same = all(np.array_equal(outputs[k], v) for k, v in local.items())
    if not same:
        raise FleetError("accepted outputs differ from a local onnxruntime run")
    accuracy = float(np.mean(outputs["label"] == y))
    console.print(f"[green]all {len(X)} accepted outputs equal a local onnxruntime run, bit "
                  f"for bit[/] (labels match the dataset's for {accuracy:.1%} of the images)")
    accused = [e["accused"] for e in report.evidence]
    if accused != [cheater.peer_id]:
        raise FleetError(f"expected the cheater {cheater.peer_id} excluded with evidence, "
                         f"got {accused}")
    console.print(f"[green]cheater node {cheater.index} excluded[/]: the publisher signed an "
                  f"evidence report ({report.evidence[0]['claim']})")
    status = car.ask("status")
    if status["mesh_leaves"] < 1:
        raise FleetError("the car never left the mesh: its trace unplugs it during the job")
    console.print(f"the car was unplugged mid-job: it handed back "
                  f"{status['work']['hand_backs']} shard(s), left the mesh and came back "
                  f"({status['mesh_leaves']} leave(s))")
    table = Table("node", "role", "results", "credit paid", "compute, ms")
    for node in fleet.nodes:
        c = ledgers[node.index]
        role = "car" if node is car else "cheater" if node is cheater else "honest"
        table.add_row(str(node.index), role, str(c["results"]), str(c["paid"]), str(c["compute_ms"]))
    console.print(table)
    if ledgers[cheater.index]["paid"] != 0:
        raise FleetError("the cheater was paid")
    if not all(ledgers[i]["paid"] > 0 for i in (0, 1)):
        raise FleetError("an honest node holds no receipt")


if __name__ == "__main__":
    sys.exit(main())
