"""`p2pfleet node start --vehicle-trace survey:<car>` replays a shipped survey car-week: the
node starts and its status shows the trace's state, not "no vehicle state" (issue 17)."""

from __future__ import annotations

import pytest

from p2pfleet.live.localfleet import LocalFleet, wait_for


@pytest.mark.parametrize("car", [0, 199])
def test_node_starts_with_a_survey_trace(tmp_path, car):
    fleet = LocalFleet(tmp_path / "f", 1, network="systest", traces={0: f"survey:{car}"},
                       trace_speedup=600.0)
    fleet.init()
    node = fleet.nodes[0]
    node.start(fleet.network, [])
    try:
        status = wait_for(lambda: fleet._check_alive(node) and (s := node.try_ask("status"))
                          and s["reasons"][:1] != [{"code": "no_state", "text":
                                                    "no vehicle state observed yet", "until": None}]
                          and s, 60, f"the node to replay survey:{car}")
        assert all(r["code"] not in ("no_state", "stale_state") for r in status["reasons"])
    finally:
        fleet.stop()
    assert "Traceback" not in node.output()
