"""The survey-based car-weeks shipped with p2pfleet: reading them, and naming a trace.

`tools/traces/make_traces.py` drew them once from emobpy's statistics of Germany's
national travel survey (MiD 2017) plus documented charging assumptions (docs/traces.md);
three files in `p2pfleet/vehicle/traces/`:

    survey-meta.json      format, start (a Monday, local time), sources, seeds, assumptions
    survey-cars.csv       one row per car: profile, battery, charge limit, charger access...
    survey-states.csv.gz  the full vehicle state at each change: car, t (seconds into the
                          week), parked, plugged_in, soc_pct, network, metered,
                          departure_at, place (home, work, other; road while driving)

Each car is one week that loops (`duration` 604800 s); `survey_trace(i)` turns car `i` into
a `Trace` (specs/vehicle-trace-format.md) for `TraceProvider`, the node (`--vehicle-trace
survey:<i>`) and the simulator. Standard library only; every refusal is a
`VehicleTraceError` naming the file, line, field and reason.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from .providers import (
    Trace,
    VehicleTraceError,
    _parse_start,
    builtin_trace_path,
    load_trace,
)
from .state import vehicle_field_problem

SURVEY_FORMAT = "p2pfleet-survey-traces"
SURVEY_VERSION = 1
WEEK_S = 7 * 86_400
META, CARS, STATES = "survey-meta.json", "survey-cars.csv", "survey-states.csv.gz"
CAR_COLUMNS = ("car", "seed", "profile", "battery_kwh", "kwh_per_km", "charge_limit_pct",
               "home_charger_kw", "work_charger", "home_wifi", "work_wifi", "plug_habit",
               "when_low_pct", "announces_departure", "trips", "km")
STATE_COLUMNS = ("car", "t", "parked", "plugged_in", "soc_pct", "network", "metered",
                 "departure_at", "place")
PLACES = ("home", "work", "other", "road")
MAX_STATES_BYTES = 64 * 1024 * 1024  # uncompressed


@dataclass(frozen=True)
class SurveyFleet:
    """The shipped car-weeks: `cars[i]` (dict of CAR_COLUMNS, typed), `traces[i]`, and
    `places[i][k]`, where car i is from `traces[i].times[k]` on (not a vehicle field)."""

    start: float
    meta: dict
    cars: tuple[dict, ...]
    traces: tuple[Trace, ...]
    places: tuple[tuple[str, ...], ...]

    def __len__(self) -> int:
        return len(self.cars)


def shipped_dir() -> Path:
    return Path(str(resources.files("p2pfleet.vehicle") / "traces"))


def _bool01(v: str) -> bool:
    if v not in ("0", "1"):
        raise ValueError(f"must be 0 or 1, got {v!r}")
    return v == "1"


def _num(v: str) -> float:
    x = float(v)
    if x != x or x in (float("inf"), float("-inf")):
        raise ValueError(f"must be a finite number, got {v!r}")
    return x


_CAR_TYPES = {"car": int, "seed": int, "profile": str, "battery_kwh": _num,
              "kwh_per_km": _num, "charge_limit_pct": _num, "home_charger_kw": _num,
              "work_charger": _bool01, "home_wifi": _bool01, "work_wifi": _bool01,
              "plug_habit": str, "when_low_pct": _num, "announces_departure": _bool01,
              "trips": int, "km": _num}


def _read_csv(src: str, text: str, columns: tuple[str, ...]) -> list[tuple[int, list[str]]]:
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or tuple(rows[0]) != columns:
        got = ",".join(rows[0]) if rows else "nothing"
        raise VehicleTraceError(src, 1, "header", f"expected columns {','.join(columns)}, "
                                                  f"got {got}")
    out = []
    for n, row in enumerate(rows[1:], start=2):
        if len(row) != len(columns):
            raise VehicleTraceError(src, n, "row", f"{len(row)} values, expected "
                                                   f"{len(columns)}")
        out.append((n, row))
    return out


def _cars(src: str, text: str) -> list[dict]:
    cars = []
    for n, row in _read_csv(src, text, CAR_COLUMNS):
        car = {}
        for name, value in zip(CAR_COLUMNS, row):
            try:
                car[name] = _CAR_TYPES[name](value)
            except ValueError as e:
                raise VehicleTraceError(src, n, name, str(e)) from None
        if car["car"] != len(cars):
            raise VehicleTraceError(src, n, "car", f"cars must be numbered 0, 1, ... in "
                                                   f"order: expected {len(cars)}, got "
                                                   f"{car['car']}")
        problem = vehicle_field_problem("charge_limit_pct", car["charge_limit_pct"])
        if problem or car["battery_kwh"] <= 0:
            raise VehicleTraceError(src, n, "charge_limit_pct" if problem else "battery_kwh",
                                    problem or "must be above 0")
        cars.append(car)
    if not cars:
        raise VehicleTraceError(src, 0, "file", "no cars")
    return cars


def _state(src: str, n: int, row: list[str], limit: float) -> tuple[int, int, dict]:
    def field(name: str, conv):
        try:
            return conv(row[STATE_COLUMNS.index(name)])
        except ValueError as e:
            raise VehicleTraceError(src, n, name, str(e)) from None

    car, t = field("car", int), field("t", int)
    metered = row[STATE_COLUMNS.index("metered")]
    dep = row[STATE_COLUMNS.index("departure_at")]
    state = {"parked": field("parked", _bool01), "plugged_in": field("plugged_in", _bool01),
             "soc_pct": field("soc_pct", _num), "charge_limit_pct": limit,
             "network": row[STATE_COLUMNS.index("network")],
             "metered": None if metered == "" else field("metered", _bool01),
             "departure_at": None if dep == "" else field("departure_at", int)}
    for name, value in state.items():
        problem = vehicle_field_problem(name, value)
        if problem:
            raise VehicleTraceError(src, n, name, problem)
    if state["plugged_in"] and not state["parked"]:
        raise VehicleTraceError(src, n, "plugged_in", "a driving car cannot be plugged in")
    if not 0 <= t < WEEK_S:
        raise VehicleTraceError(src, n, "t", f"must be from 0 to {WEEK_S - 1}, got {t}")
    place = row[STATE_COLUMNS.index("place")]
    if place not in PLACES or (place == "road") == state["parked"]:
        raise VehicleTraceError(src, n, "place", f"must be one of {', '.join(PLACES)} (road "
                                                 f"exactly while not parked), got {place!r}")
    return car, t, state, place


def load_survey(directory: str | Path | None = None) -> SurveyFleet:
    """Read and check the survey car-weeks in `directory` (default: the shipped ones)."""
    d = shipped_dir() if directory is None else Path(directory)

    def read(name: str) -> bytes:
        try:
            return (d / name).read_bytes()
        except OSError as e:
            raise VehicleTraceError(str(d / name), 0, "file", e.strerror or str(e)) from None

    src_meta = str(d / META)
    try:
        meta = json.loads(read(META))
    except (ValueError, UnicodeDecodeError) as e:
        raise VehicleTraceError(src_meta, 0, "file", f"not JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != SURVEY_FORMAT:
        raise VehicleTraceError(src_meta, 0, "format", f"not {SURVEY_FORMAT!r}")
    if meta.get("version") != SURVEY_VERSION:
        raise VehicleTraceError(src_meta, 0, "version", f"unsupported version "
                                f"{meta.get('version')!r} (this reader knows {SURVEY_VERSION})")
    if meta.get("week_s") != WEEK_S:
        raise VehicleTraceError(src_meta, 0, "week_s", f"must be {WEEK_S}")
    start = _parse_start(meta.get("start"), lambda f, r: VehicleTraceError(src_meta, 0, "start", r))

    src_cars = str(d / CARS)
    try:
        cars = _cars(src_cars, read(CARS).decode("utf-8"))
    except UnicodeDecodeError:
        raise VehicleTraceError(src_cars, 0, "encoding", "not UTF-8") from None

    src = str(d / STATES)
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(read(STATES))) as f:
            raw = f.read(MAX_STATES_BYTES + 1)
        text = raw.decode("utf-8")
    except (OSError, EOFError, zlib.error) as e:
        raise VehicleTraceError(src, 0, "file", f"not a complete gzip file: {e}") from None
    except UnicodeDecodeError:
        raise VehicleTraceError(src, 0, "encoding", "not UTF-8") from None
    if len(raw) > MAX_STATES_BYTES:
        raise VehicleTraceError(src, 0, "file", f"larger than {MAX_STATES_BYTES} bytes")

    per_car: list[tuple[list[float], list[dict], list[str]]] = [([], [], []) for _ in cars]
    current = -1
    for n, row in _read_csv(src, text, STATE_COLUMNS):
        try:
            car = int(row[0])
        except ValueError:
            raise VehicleTraceError(src, n, "car", f"not a car number: {row[0]!r}") from None
        if not 0 <= car < len(cars):
            raise VehicleTraceError(src, n, "car", f"no car {car} in {CARS}")
        if car < current:
            raise VehicleTraceError(src, n, "car", "rows must be grouped by car, ascending")
        current = car
        _, t, state, place = _state(src, n, row, cars[car]["charge_limit_pct"])
        times, states, places = per_car[car]
        if not times and t != 0:
            raise VehicleTraceError(src, n, "t", f"car {car}'s first state must be at t 0, "
                                                 f"got {t}")
        if times and t <= times[-1]:
            raise VehicleTraceError(src, n, "t", f"times must increase: {t} is not after "
                                                 f"{int(times[-1])}")
        times.append(float(t))
        states.append(state)
        places.append(place)
    traces = []
    for i, (times, states, _places) in enumerate(per_car):
        if not times:
            raise VehicleTraceError(src, 0, "car", f"car {i} has no states")
        c = cars[i]
        traces.append(Trace(
            source=f"survey:{i}", start=start, loop=True, duration=float(WEEK_S), speed=1.0,
            description=f"survey car {i}: {c['profile']}, {c['battery_kwh']:g} kWh, limit "
                        f"{c['charge_limit_pct']:g} %, plugs in {c['plug_habit']}",
            times=tuple(times), states=tuple(states)))
    return SurveyFleet(start, meta, tuple(cars), tuple(traces),
                       tuple(tuple(p) for _t, _s, p in per_car))


@lru_cache(maxsize=1)
def shipped_survey() -> SurveyFleet:
    return load_survey()


def survey_trace(index: int) -> Trace:
    """Car `index` of the shipped survey car-weeks as a looping one-week trace."""
    fleet = shipped_survey()
    if not 0 <= index < len(fleet):
        raise VehicleTraceError(f"survey:{index}", 0, "car",
                                f"no such survey car (0 to {len(fleet) - 1})")
    return fleet.traces[index]


def resolve_trace(spec: str) -> Trace:
    """A trace named as the node's `vehicle.trace` names it: builtin:<name>, survey:<car>
    (0..199), or a file path."""
    if spec.startswith("builtin:"):
        return load_trace(builtin_trace_path(spec[len("builtin:"):]))
    if spec.startswith("survey:"):
        n = spec[len("survey:"):]
        if not n.isdigit():
            raise VehicleTraceError(spec, 0, "car", "survey:<car> takes a car number, "
                                                    f"got {n!r}")
        return survey_trace(int(n))
    return load_trace(Path(spec).expanduser())


__all__ = ["SurveyFleet", "load_survey", "shipped_survey", "survey_trace", "resolve_trace",
           "shipped_dir", "WEEK_S"]
