"""The simulator draws vehicles from the survey car-days (sim/traces.py load_survey_days,
docs/traces.md) when its habits ask for them, and drives the real policy over them."""

from __future__ import annotations

import random

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
