"""`p2pfleet node start --vehicle-trace` works with every trace shipped with p2pfleet: the
node starts, replays it, and its status shows the trace's state (issue 17)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from p2pfleet.live.localfleet import LocalFleet, wait_for
from p2pfleet.vehicle import BUILTIN_TRACES

TRACES_DIR = Path(str(resources.files("p2pfleet.vehicle") / "traces"))


def test_every_trace_file_is_a_builtin():
    shipped = sorted(p.stem for p in TRACES_DIR.iterdir() if p.suffix == ".jsonl")
    assert shipped == sorted(BUILTIN_TRACES)


@pytest.mark.parametrize("name", BUILTIN_TRACES)
def test_node_starts_with_shipped_trace(tmp_path, name):
    fleet = LocalFleet(tmp_path / "f", 1, network="systest", traces={0: f"builtin:{name}"},
                       trace_speedup=600.0)
    fleet.init()
    car = fleet.nodes[0]
    car.start(fleet.network, [])
    try:
        status = wait_for(lambda: fleet._check_alive(car) and (s := car.try_ask("status"))
                          and s["reasons"][:1] != [{"code": "no_state", "text":
                                                    "no vehicle state observed yet", "until": None}]
                          and s, 60, f"the node to replay {name}")
        assert status["why"] and status["vehicle"] is None  # a trace has no health line
        assert all(r["code"] not in ("no_state", "stale_state") for r in status["reasons"])
    finally:
        fleet.stop()
    assert "Traceback" not in car.output()
