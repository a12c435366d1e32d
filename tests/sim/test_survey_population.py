"""The simulator draws vehicles from the survey car-days (sim/traces.py load_survey_days,
docs/traces.md) when its habits ask for them (`p2pfleet sim --population survey`), and drives
the real policy over them."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from p2pfleet.sim.fleet import Fleet, FleetConfig
from p2pfleet.sim.population import DAY_S, VEHICLE_KEYS, Assumptions, TraceError, population
from p2pfleet.sim.traces import load_survey_days, load_traces

TRACES = load_traces()
SURVEY = load_survey_days()
ONLY_SURVEY = Assumptions(habits=(("survey", 1.0),))


def test_every_survey_car_day_is_a_well_formed_day():
    assert len(SURVEY) == 200 * 7
    for name, tr in SURVEY.items():
        times = [t for t, _ in tr.records]
        assert times[0] == 0 and all(a < b for a, b in zip(times, times[1:])), name
        assert times[-1] < DAY_S
        for _t, st in tr.records:
            assert set(st) == set(VEHICLE_KEYS)
            assert st["departure_at"] is None or st["departure_at"] > 0


def test_the_population_draws_survey_days_only_when_asked():
    pop = population(300, {**TRACES, **SURVEY}, random.Random(3), ONLY_SURVEY)
    assert {v.habit for v in pop} == {"survey"}
    assert len({v.day for v in pop}) > 100  # many different car-days
    default = population(300, {**TRACES, **SURVEY}, random.Random(3))
    assert default == population(300, TRACES, random.Random(3))  # default mix unchanged
    with pytest.raises(TraceError, match="load_survey_days"):
        population(10, TRACES, random.Random(3), ONLY_SURVEY)


def test_a_survey_fleet_is_usable_at_night_more_than_by_day():
    s = Fleet(FleetConfig(150, hours=24, seed=4, assumptions=ONLY_SURVEY),
              {**TRACES, **SURVEY}).run().summary()
    night = sum(r["usable_share"] for r in s["by_hour"] if 1 <= r["hour"] <= 4) / 4
    midday = sum(r["usable_share"] for r in s["by_hour"] if 11 <= r["hour"] <= 14) / 4
    assert night > 0.1 and night > 1.5 * midday, (night, midday)


def test_the_cli_draws_the_population_from_the_survey(tmp_path):
    env = dict(os.environ, P2PFLEET_DATA_DIR=str(tmp_path / "data"))

    def sim(*extra: str) -> dict:
        r = subprocess.run([sys.executable, "-m", "p2pfleet.cli.main", "sim", "--vehicles",
                            "120", "--hours", "4", "--seed", "2", "--json", *extra],
                           capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    survey, assumed = sim("--population", "survey"), sim()
    assert survey["population"] == "survey" and "population" not in assumed
    assert survey["by_hour"] != assumed["by_hour"]
    # the same fleet as the Python API builds from the survey days
    api = Fleet(FleetConfig(120, hours=4, seed=2, assumptions=ONLY_SURVEY),
                {**TRACES, **SURVEY}).run().summary()
    assert survey["by_hour"] == api["by_hour"]
    assert survey["shards_accepted"] == api["shards_accepted"]
