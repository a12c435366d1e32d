"""A real node (`p2pfleet node start`, its own process) fed by the generic JSON-command
provider: the policy follows what the command prints, and a command that fails or lies
leaves the node out of the mesh with the reason in `node status` (specs/vehicle-providers.md).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from p2pfleet.live.localfleet import P2PFLEET, LocalFleet, wait_for

CAR = {"parked": True, "plugged_in": True, "soc_pct": 80, "charge_limit_pct": 90}


def command_fleet(tmp_path: Path, command: list[str]) -> LocalFleet:
    return LocalFleet(tmp_path / "f", 1, network="systest", settings={
        "vehicle.provider": "json_command",
        "json_source.command": ",".join(command),
        "json_source.interval_s": "0.2",
        "json_source.timeout_s": "5",
    })


def write(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)  # the command never sees half a file


def human_status(node) -> str:
    return subprocess.run([*P2PFLEET, "--data-dir", str(node.data_dir), "node", "status"],
                          capture_output=True, text=True, timeout=30).stdout


def test_policy_follows_the_json_command(tmp_path):
    state = tmp_path / "car.json"
    write(state, CAR)
    with command_fleet(tmp_path, ["cat", str(state)]) as f:
        car = f.nodes[0]
        wait_for(lambda: car.ask("status")["computing"], 30, "the car to compute")
        assert car.ask("status")["vehicle"].startswith("command: ok, read")

        write(state, {**CAR, "plugged_in": False})
        status = wait_for(lambda: (s := car.ask("status")) and not s["computing"] and s, 30,
                          "the car to stop when unplugged")
        assert [r["code"] for r in status["reasons"]] == ["unplugged"]

        write(state, {**CAR, "soc_pct": 140})  # a lie: trusted for nothing
        status = wait_for(lambda: (s := car.ask("status"))["reasons"][0]["code"] == "no_state"
                          and s, 30, "the lie to be refused")
        assert "soc_pct" in status["reasons"][0]["text"], status["reasons"]
        assert "soc_pct" in status["vehicle"]

        write(state, CAR)
        wait_for(lambda: car.ask("status")["computing"], 30, "the car to compute again")
        assert "vehicle: command: ok" in human_status(car)


def test_a_failing_command_keeps_the_node_out_with_a_clear_status(tmp_path):
    f = command_fleet(tmp_path, ["sh", "-c", "echo '{\"parked\": true' ; exit 3"])
    f.init()
    car = f.nodes[0]
    car.start(f.network, [])  # never joins the mesh: wait for its control socket, not an address
    try:
        status = wait_for(lambda: (s := car.try_ask("status")) and "exit status 3" in
                          s["reasons"][0]["text"] and s, 30, "the failure to show")
        assert not status["computing"] and not status["in_mesh"]
        assert status["reasons"][0]["code"] == "no_state"
        assert status["reasons"][0]["text"].startswith("no vehicle state: command: ")
        assert "exit status 3" in status["vehicle"]
        assert "exit status 3" in human_status(car)
    finally:
        f.stop()
