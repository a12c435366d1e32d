"""The fleet simulator (p2pfleet.sim.fleet): the real vehicle policy and scheduler, in
virtual time, over a population drawn from the shipped traces (issue 16, items 1 and 4).

- One seed gives one summary; another seed another.
- Cheaters of the kinds sim/verification.py knows get no wrong output accepted where its
  `zero_by_construction` says none can be; partial cheats of established colluders are
  measured, and every wrong output accepted is backed by colluders only.
- Capacity follows the plug-in pattern: home chargers make the night, not midday.
- `p2pfleet sim` runs end to end (1,000 vehicles, 3 h) and refuses bad options clearly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from p2pfleet.sim import verification as V
from p2pfleet.sim.fleet import CHEATS, Fleet, FleetConfig, simulate
from p2pfleet.sim.population import Assumptions, population
from p2pfleet.sim.traces import load_traces

TRACES = load_traces()
WHOLE = ("random", "fp16", "copy", "strategic", "sybil")


def test_the_same_seed_gives_the_same_summary():
    cfg = FleetConfig(200, hours=4, cheaters=0.2, seed=5)
    a, b = simulate(cfg, TRACES), simulate(cfg, TRACES)
    assert a == b
    assert a["shards_accepted"] > 0 and a["wrong_results"] > 0, a
    other = simulate(FleetConfig(200, hours=4, cheaters=0.2, seed=6), TRACES)
    assert other != a


def test_groups_played_one_after_another_give_what_one_shared_heap_gives():
    # Fleet.run plays each publisher's group alone; on one heap together (churn and a
    # partition too, whose draws are the publishers' own) the summary is the very same.
    cfg = FleetConfig(300, hours=6, cheaters=0.2, seed=4, churn=0.3, partition=(2, 600, 0.3))
    apart = Fleet(cfg, TRACES).run()
    together = Fleet(cfg, TRACES).run(together=True)
    assert apart.summary() == together.summary()
    assert apart.capacity() == together.capacity()
    assert apart.unplugs > 0 and apart.summary()["publishers"] == 3


def _scenario(kinds: tuple[str, ...]) -> V.Scenario:
    cheats = dict(CHEATS)
    return V.Scenario("fleet", adversaries=tuple(V.Adversaries(1, cheats[k]) for k in kinds))


def test_whole_shard_cheaters_never_get_a_wrong_result_accepted():
    assert V.zero_by_construction(_scenario(WHOLE))
    fleet = Fleet(FleetConfig(400, hours=6, cheaters=0.3, cheat_kinds=WHOLE, seed=3),
                  TRACES).run()
    s = fleet.summary()
    assert s["wrong_results"] > 20, "the cheaters cheated too little to tell: vacuous"
    assert s["wrong_accepted_ever"] == 0, s
    assert s["accepted_on_fresh_only"] == 0, s
    assert s["honest_excluded"] == 0, s
    assert s["cheaters_excluded"] > 0, s
    cheated = set().union(*(p.cheated for p in fleet.publishers))
    established = set().union(*(p.cheat_established for p in fleet.publishers))
    assert established, "no cheater cheated while established: vacuous"
    # a whole-shard cheat fails the known-answer row every shard holds: excluded at once
    assert cheated <= set().union(*(p.excluded for p in fleet.publishers))


def test_colluders_partial_cheats_are_measured_and_backed_by_colluders_only():
    kinds = ("colluder",)
    assert not V.zero_by_construction(_scenario(kinds))
    fleet = Fleet(FleetConfig(400, hours=6, cheaters=0.3, cheat_kinds=kinds, seed=4),
                  TRACES).run()
    s = fleet.summary()
    assert s["wrong_results"] > 0 and s["honest_excluded"] == 0, s
    for pub in fleet.publishers:
        for shard in pub.wrong:
            backers = {pub.by_key[l.worker].kind for l in pub.backers(shard)}
            assert backers == {"colluder"}, (shard, backers)
    # two colluders hold both replicas of about f^2 of the shards: the bound, with slack
    assert s["wrong_accepted"] <= 2 * 0.3 ** 2 * s["shards_accepted"] + 5, s


def test_capacity_follows_the_plug_in_pattern():
    everyone_home = Assumptions(habits=(("home", 1.0),), home_wifi=1.0)
    s = Fleet(FleetConfig(150, hours=24, seed=2, assumptions=everyone_home), TRACES
              ).run().summary()
    night = [r["usable_share"] for r in s["by_hour"] if 1 <= r["hour"] <= 4]
    midday = [r["usable_share"] for r in s["by_hour"] if 11 <= r["hour"] <= 14]
    assert min(night) > 0.5 and max(midday) == 0.0, (night, midday)
    for r in s["by_hour"]:
        assert 0 <= r["used_share"] <= r["usable_share"] + 1e-9, r
    mixed = Fleet(FleetConfig(200, hours=24, seed=2), TRACES).run().summary()
    work = [r["usable_share"] for r in mixed["by_hour"] if 11 <= r["hour"] <= 14]
    assert min(work) > 0, "workplace chargers on Wi-Fi should give some daytime capacity"
    assert sum(night) / 4 > 3 * sum(work) / 4 > 0


def test_the_population_follows_its_assumptions():
    import random
    pop = population(2000, TRACES, random.Random(1))
    share = sum(1 for v in pop if v.habit == "home") / len(pop)
    assert 0.5 < share < 0.6
    assert all(v.day.states[0][0] == 0 for v in pop)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="FleetConfig.cheaters"):
        FleetConfig(10, cheaters=1.5)
    with pytest.raises(ValueError, match="FleetConfig.cheat_kinds"):
        FleetConfig(10, cheat_kinds=("lazy",))


def _cli(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, P2PFLEET_DATA_DIR=str(tmp_path / "data"))
    return subprocess.run([sys.executable, "-m", "p2pfleet.cli.main", *args],
                          capture_output=True, text=True, env=env, timeout=600)


def test_cli_runs_end_to_end(tmp_path):
    out = tmp_path / "capacity.png"
    r = _cli("sim", "--vehicles", "1000", "--hours", "3", "--cheaters", "0.1", "--seed",
             "1", "--json", "--plot", str(out), tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["vehicles"] == 1000 and s["cheaters"] == 100
    for key in ("verified_samples", "shards_failed", "wrong_accepted", "effective_replication",
                "energy_wh_per_vehicle", "credit_per_honest_vehicle",
                "work_lost_to_unplugging_hours", "time_to_result_s", "publisher_uplink",
                "by_hour"):
        assert key in s, key
    assert s["verified_samples"] > 0 and len(s["by_hour"]) == 3
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = tmp_path / "capacity.svg"
    r = _cli("sim", "--vehicles", "50", "--hours", "1", "--plot", str(svg), tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "verified samples" in r.stdout
    assert ET.fromstring(svg.read_text()).tag.endswith("svg")


def test_cli_names_a_bad_option(tmp_path):
    r = _cli("sim", "--vehicles", "10", "--plot", str(tmp_path / "x.gif"), tmp_path=tmp_path)
    assert r.returncode == 2 and "--plot" in r.stderr and ".png or .svg" in r.stderr, r.stderr
    r = _cli("sim", "--cheaters", "1", tmp_path=tmp_path)
    assert r.returncode == 2 and "--cheaters" in r.stderr, r.stderr
    empty = tmp_path / "traces"
    empty.mkdir()
    r = _cli("sim", "--traces", str(empty), tmp_path=tmp_path)
    assert r.returncode == 2 and "no *.jsonl vehicle traces" in r.stderr, r.stderr
    (empty / "commuter-day.jsonl").write_text('{"format": "p2pfleet-vehicle-trace"}\n{"t": -1}\n')
    r = _cli("sim", "--traces", str(empty), tmp_path=tmp_path)
    assert r.returncode == 2 and "commuter-day.jsonl: line 1: start" in r.stderr, r.stderr
