"""The survey-based car-weeks shipped in p2pfleet/vehicle/traces/ (issue 17 item 5): the
loader reads every car-week as a well-formed looping trace, refuses corrupt files naming
file, line and field, and the node's trace provider accepts `survey:<car>`."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from p2pfleet.core.policy import Policy, StateObserved, VehicleState
from p2pfleet.live.config import load_config
from p2pfleet.live.node import make_provider
from p2pfleet.vehicle.providers import TraceProvider, VehicleTraceError
from p2pfleet.vehicle.survey import (
    CARS,
    META,
    STATES,
    WEEK_S,
    load_survey,
    resolve_trace,
    shipped_dir,
    shipped_survey,
    survey_trace,
)


@pytest.fixture(scope="module")
def fleet():
    return shipped_survey()


def test_at_least_200_car_weeks_with_their_sources(fleet):
    assert len(fleet) >= 200 and len(fleet.traces) == len(fleet.cars) == len(fleet.places)
    assert fleet.meta["source"].startswith("emobpy") and fleet.meta["tables_sha256"]
    assert {c["profile"] for c in fleet.cars} == {"fulltime", "parttime", "freetime"}
    assert len({c["seed"] for c in fleet.cars}) == len(fleet.cars)  # a seed per car


def test_every_car_week_is_well_formed(fleet):
    for i, (car, tr, places) in enumerate(zip(fleet.cars, fleet.traces, fleet.places)):
        assert tr.loop and tr.duration == WEEK_S and tr.source == f"survey:{i}"
        assert tr.times[0] == 0 and all(a < b for a, b in zip(tr.times, tr.times[1:]))
        assert tr.times[-1] < WEEK_S and len(places) == len(tr.times)
        assert any(not s["parked"] for s in tr.states) == (car["trips"] > 0)
        for t, s, place in zip(tr.times, tr.states, places):
            VehicleState(**s)  # every value in range
            assert s["charge_limit_pct"] == car["charge_limit_pct"]
            assert 0 <= s["soc_pct"] <= car["charge_limit_pct"] + 0.05
            assert not s["plugged_in"] or s["parked"]
            assert (place == "road") == (not s["parked"])
            if s["departure_at"] is not None:
                assert s["parked"] and s["departure_at"] > t


def test_a_survey_car_replays_and_the_policy_takes_its_states(fleet):
    tr = survey_trace(3)
    p = TraceProvider(tr)
    pol = Policy()
    now, seen = tr.start, set()
    while now < tr.start + WEEK_S:
        st = p.state_at(now)
        pol.handle(StateObserved(now, st, 7200))
        seen.add((st.parked, st.plugged_in))
        nxt = p.next_change_after(now)
        assert nxt > now
        now = nxt
    assert (False, False) in seen and (True, False) in seen
    # one week later the replay is where it was (the week loops)
    assert p.state_at(tr.start + 1000) == p.state_at(tr.start + WEEK_S + 1000)


def test_resolve_trace_names(fleet):
    assert resolve_trace("survey:199") is fleet.traces[199]
    assert resolve_trace("builtin:commuter-day").loop
    for bad, words in (("survey:200", "no such survey car"), ("survey:x", "car number"),
                       ("survey:-1", "car number")):
        with pytest.raises(VehicleTraceError, match=words):
            resolve_trace(bad)


def test_the_node_builds_a_provider_from_a_survey_trace(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[vehicle]\nprovider = "trace"\ntrace = "survey:42"\n')
    p = make_provider(load_config(path), t0=1000.0)
    assert isinstance(p, TraceProvider) and p.trace.source == "survey:42"
    first = dict(survey_trace(42).states[0])
    if first["departure_at"] is not None:  # trace seconds, reported as Unix time
        first["departure_at"] += 1000.0
    assert p.state_at(1000.0) == VehicleState(**first)


# ------------------------------------------------------------------ corrupt files

def copy(tmp_path: Path) -> Path:
    d = tmp_path / "survey"
    d.mkdir(parents=True)
    for name in (META, CARS, STATES):
        shutil.copy(shipped_dir() / name, d / name)
    return d


def edit_states(d: Path, fn) -> None:
    lines = gzip.decompress((d / STATES).read_bytes()).decode().splitlines()
    (d / STATES).write_bytes(gzip.compress(("\n".join(fn(lines)) + "\n").encode()))


def set_cell(line: str, column: int, value: str) -> str:
    cells = line.split(",")
    cells[column] = value
    return ",".join(cells)


def refused(d: Path, *words: str) -> str:
    with pytest.raises(VehicleTraceError) as err:
        load_survey(d)
    for w in words:
        assert w in str(err.value), str(err.value)
    return str(err.value)


def test_a_copy_of_the_shipped_files_loads(tmp_path):
    assert len(load_survey(copy(tmp_path))) == len(shipped_survey())


def test_truncated_gzip_is_refused(tmp_path):
    d = copy(tmp_path)
    data = (d / STATES).read_bytes()
    (d / STATES).write_bytes(data[: len(data) // 2])
    refused(d, STATES, ":0: file: not a complete gzip file")


@pytest.mark.parametrize("column, value, words", [
    (4, "104", ("soc_pct", "from 0 to 100", "104")),
    (5, "satellite", ("network", "satellite")),
    (2, "yes", ("parked", "must be 0 or 1")),
    (7, "-5", ("departure_at",)),
    (8, "moon", ("place", "moon")),
    (0, "999", ("car", "no car 999")),
    (1, "700000", ("t", "must be from 0 to 604799")),
])
def test_a_bad_value_is_refused_naming_line_and_field(tmp_path, column, value, words):
    d = copy(tmp_path)
    edit_states(d, lambda ls: [ls[0], ls[1], set_cell(ls[2], column, value), *ls[3:]])
    msg = refused(d, *words)
    assert f"{STATES}:3: " in msg


def test_times_going_back_are_refused(tmp_path):
    d = copy(tmp_path)
    edit_states(d, lambda ls: [ls[0], ls[1], ls[3], ls[2], *ls[4:]])
    refused(d, f"{STATES}:4: t: times must increase")


def test_plugged_in_while_driving_is_refused(tmp_path):
    d = copy(tmp_path)

    def fn(ls):
        k = next(i for i, ln in enumerate(ls) if i and ln.split(",")[2] == "0")
        ls[k] = set_cell(ls[k], 3, "1")
        return ls
    edit_states(d, fn)
    refused(d, "plugged_in: a driving car cannot be plugged in")


def test_wrong_columns_unknown_version_and_missing_file_are_refused(tmp_path):
    d = copy(tmp_path)
    edit_states(d, lambda ls: [ls[0].replace("soc_pct", "soc"), *ls[1:]])
    refused(d, f"{STATES}:1: header: expected columns")
    d = copy(tmp_path / "b")
    meta = json.loads((d / META).read_text())
    (d / META).write_text(json.dumps(dict(meta, version=2)))
    refused(d, "version: unsupported version 2")
    d = copy(tmp_path / "c")
    (d / CARS).unlink()
    refused(d, CARS, ":0: file:")
    d = copy(tmp_path / "d")
    text = (d / CARS).read_text().splitlines()
    text[5] = set_cell(text[5], 5, "120")
    (d / CARS).write_text("\n".join(text) + "\n")
    refused(d, f"{CARS}:6: charge_limit_pct")
