"""A vehicle population for the fleet simulator, built from the shipped vehicle traces.

Pure: `parse_trace` takes the lines of a trace file (specs/vehicle-trace-format.md), the
caller reads them (sim/traces.py); `population` draws every vehicle from a seeded
`random.Random`. Nothing here knows about publishers or leases.

Habits (a vehicle's day, local time; times in seconds after local midnight):
  home  commuter-day.jsonl as is: at home and plugged in overnight, away 07:25-18:00.
  work  the same day with the charger at work: plugged in at work 08:10-17:20 (departure
        17:20), unplugged at home overnight.
  fast  no charger of its own: one fast-charge session of 30 minutes on cellular.
Each vehicle's day is the habit's day shifted by up to +-`jitter_s` (plug-in, departure
and the planned `departure_at` alike), its arrival state of charge moved by a draw, and
its charge limit drawn. Overlays from the other traces: flappy-plug.jsonl (a loose
connector at the plug-in of a home charger), hot-day.jsonl (a workplace car parked in the
sun from 08:00) and metered-network.jsonl (a workplace Wi-Fi that changes from 09:00).
Networks: home Wi-Fi reaches the garage for `home_wifi` of home chargers (else cellular,
metered); a workplace Wi-Fi for `work_wifi` of workplace chargers (else cellular).

  survey  one of the survey car-days (sim/traces.py `load_survey_days`: each day of the
        200 car-weeks of docs/traces.md, every state as drawn), for a share of `habits`
        given e.g. as (("survey", 1.0),); not in the default mix.
The other habits' shares are assumptions, not survey data; `Assumptions` holds them and the
CLI prints them with --json.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field

DAY_S = 86_400
VEHICLE_KEYS = ("parked", "plugged_in", "soc_pct", "charge_limit_pct", "network", "metered",
                "battery_temp_c", "cabin_temp_c", "departure_at")


class TraceError(ValueError):
    """A trace file the simulator cannot use; the message names the file and line."""


@dataclass(frozen=True)
class Trace:
    name: str
    start_s: int                          # local time of day of t = 0
    loop: bool
    records: tuple[tuple[int, dict], ...]  # (t, changed fields), t ascending


def parse_trace(name: str, lines: list[str]) -> Trace:
    """The header and records of a vehicle trace (only the fields the simulator uses)."""
    rows = [ln for ln in lines if ln.strip()]
    if not rows:
        raise TraceError(f"{name}: empty trace")
    try:
        head = json.loads(rows[0])
        recs = [json.loads(r) for r in rows[1:]]
    except json.JSONDecodeError as exc:
        raise TraceError(f"{name}: line {exc.lineno}: not JSON: {exc.msg}") from None
    if head.get("format") != "p2pfleet-vehicle-trace":
        raise TraceError(f"{name}: line 1: not a p2pfleet-vehicle-trace header")
    start = str(head.get("start", ""))
    try:
        hh, mm = int(start[11:13]), int(start[14:16])
    except ValueError:
        raise TraceError(f"{name}: line 1: start {start!r} is not an ISO 8601 time") from None
    out, last = [], -1
    for i, r in enumerate(recs, start=2):
        t = r.get("t")
        if not isinstance(t, int) or t < last:
            raise TraceError(f"{name}: line {i}: t must be an integer, not going back")
        last = t
        out.append((t, {k: v for k, v in r.items() if k in VEHICLE_KEYS}))
    return Trace(name, hh * 3600 + mm * 60, bool(head.get("loop")), tuple(out))


@dataclass(frozen=True)
class Assumptions:
    """Shares and ranges of the population (documented guesses until survey traces land)."""

    habits: tuple[tuple[str, float], ...] = (("home", 0.55), ("work", 0.25), ("fast", 0.20))
    home_wifi: float = 0.75          # home chargers whose garage has the home Wi-Fi
    work_wifi: float = 0.30          # workplace chargers on an unmetered workplace Wi-Fi
    flappy: float = 0.05             # home chargers with a loose connector
    hot: float = 0.10                # workplace cars parked in the sun
    metered_change: float = 0.10     # workplace Wi-Fi that changes during the morning
    jitter_s: int = 3600             # a vehicle's day shifted by up to this, either way
    soc_delta: tuple[float, float] = (-20.0, 10.0)   # arrival state of charge moved by
    charge_limits: tuple[float, ...] = (80.0, 80.0, 90.0, 100.0)
    # hardware class -> (share, samples per second): a 32-row shard takes ~10 min on "car"
    hardware: tuple[tuple[str, float, float], ...] = (
        ("car", 0.60, 0.053), ("car-npu", 0.30, 0.09), ("pc", 0.10, 0.2))
    reachable: float = 0.20          # publicly reachable; the others are behind NAT/CGNAT
    hole_punch: float = 0.70         # NAT'd vehicles whose hole punching works

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Day:
    """One vehicle's day: full states (not changes) from each change on, times ascending;
    a state is a tuple of the values of VEHICLE_KEYS (tuples: 10^5 days fit in memory)."""

    states: tuple[tuple[int, tuple], ...]


def _cumulate(records: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
    out, cur = [], {"metered": None, "battery_temp_c": None, "cabin_temp_c": None,
                    "departure_at": None}
    for t, ch in sorted(records, key=lambda r: r[0]):
        cur = {**cur, **ch}
        if out and out[-1][0] == t:
            out[-1] = (t, cur)
        else:
            out.append((t, cur))
    return out


def _overlay(trace: Trace, keys: tuple[str, ...], at: int | None = None) -> list:
    start = trace.start_s if at is None else at
    return [(start + t, {k: v for k, v in ch.items() if k in keys})
            for t, ch in trace.records if any(k in ch for k in keys)]


@dataclass
class Habits:
    """The habit templates, built once from the traces (a few dozen change lists)."""

    traces: dict[str, Trace]
    _cache: dict = field(default_factory=dict)

    def template(self, habit: str, wifi: bool, overlay: str) -> list[tuple[int, dict]]:
        key = (habit, wifi, overlay)
        if key not in self._cache:
            self._cache[key] = _cumulate(self._build(habit, wifi, overlay))
        return self._cache[key]

    def _build(self, habit: str, wifi: bool, overlay: str) -> list[tuple[int, dict]]:
        day = [(t, dict(ch)) for t, ch in self.traces["commuter-day"].records]
        if habit == "home":
            if not wifi:  # the Wi-Fi does not reach the garage: cellular at home
                for _t, ch in day:
                    if ch.get("network") == "wifi":
                        ch.update(network="cellular", metered=True)
            if overlay == "flappy":  # the loose connector replaces the 18:00 plug-in
                plug = next(t for t, ch in day if ch.get("plugged_in") is True and t > 0)
                day = [(t, ch) for t, ch in day if t != plug]
                day += _overlay(self.traces["flappy-plug"], ("plugged_in",), at=plug)
            return day
        if habit == "work":
            for t, ch in day:
                if "plugged_in" in ch:
                    ch["plugged_in"] = False
                if t == 0:
                    ch["departure_at"] = None
            net = {"network": "wifi", "metered": False} if wifi else {
                "network": "cellular", "metered": True}
            day += [(29_400 + 600, {"plugged_in": True, **net, "departure_at": 62_400}),
                    (36_000, {"soc_pct": 76}), (41_000, {"soc_pct": 80}),
                    (62_400 - 60, {"plugged_in": False})]
            if overlay == "hot":
                day += _overlay(self.traces["hot-day"], ("battery_temp_c", "cabin_temp_c"))
            elif overlay == "metered" and wifi:
                day += _overlay(self.traces["metered-network"], ("network", "metered"))
            return day
        if habit == "fast":  # parked unplugged, one 30-minute session at noon (shifted)
            return [(0, {"parked": True, "plugged_in": False, "soc_pct": 50,
                         "charge_limit_pct": 90, "network": "none", "metered": None}),
                    (43_200, {"plugged_in": True, "network": "cellular", "metered": True,
                              "soc_pct": 25}),
                    (43_200 + 1800, {"plugged_in": False, "network": "none", "metered": None,
                                     "soc_pct": 80})]
        raise ValueError(f"unknown habit {habit!r}")


@dataclass(frozen=True)
class VehicleSpec:
    """What the population says about one vehicle; the simulator adds the machines."""

    habit: str
    day: Day
    hw_class: str
    bench: float
    reachable: bool
    direct: bool            # reachable, or its hole punching works (car-to-car blobs)


def _pick(rng: random.Random, table) -> tuple:
    x, acc = rng.random(), 0.0
    for row in table:
        acc += row[1]
        if x < acc:
            return row
    return table[-1]


def vehicle_day(habits: Habits, rng: random.Random, a: Assumptions, habit: str) -> Day:
    wifi = rng.random() < (a.home_wifi if habit == "home" else a.work_wifi)
    overlay = ""
    if habit == "home" and rng.random() < a.flappy:
        overlay = "flappy"
    elif habit == "work":
        x = rng.random()
        overlay = "hot" if x < a.hot else "metered" if x < a.hot + a.metered_change else ""
    shift = rng.randint(-a.jitter_s, a.jitter_s) if habit != "fast" else rng.randint(
        -6 * 3600, 6 * 3600)
    soc_delta = rng.uniform(*a.soc_delta)
    limit = rng.choice(a.charge_limits)
    out = []
    for t, st in habits.template(habit, wifi, overlay):
        dep = st["departure_at"]
        soc = max(5.0, min(limit, st["soc_pct"] + (soc_delta if t > 0 else 0.0)))
        values = dict(st, departure_at=None if dep is None else dep + shift,
                      charge_limit_pct=limit, soc_pct=soc)
        out.append((0 if t == 0 else min(max(t + shift, 1), DAY_S - 1),
                    tuple(values[k] for k in VEHICLE_KEYS)))
    # Midnight continues the day before (the day loops): its last state, its planned
    # departure a day earlier.
    last = list(out[-1][1])
    dep = VEHICLE_KEYS.index("departure_at")
    if last[dep] is not None:
        last[dep] -= DAY_S
    out[0] = (0, tuple(last))
    return Day(tuple(out))


def population(n: int, traces: dict[str, Trace], rng: random.Random,
               a: Assumptions = Assumptions()) -> list[VehicleSpec]:
    """`n` vehicles drawn from `rng` under the assumptions `a`."""
    missing = {"commuter-day", "flappy-plug", "hot-day", "metered-network"} - set(traces)
    if missing:
        raise TraceError(f"the population needs the traces {sorted(missing)}")
    habits = Habits(traces)
    survey = sorted(name for name in traces if name.startswith("survey:"))
    if not survey and any(h == "survey" and share > 0 for h, share in a.habits):
        raise TraceError("habit 'survey' needs the survey car-days (sim.traces.load_survey_days)")
    days: dict[str, Day] = {}
    out = []
    for _ in range(n):
        habit = _pick(rng, a.habits)[0]
        hw, _share, bench = _pick(rng, a.hardware)
        reachable = rng.random() < a.reachable
        direct = reachable or rng.random() < a.hole_punch
        if habit == "survey":  # a survey car-day as it is (docs/traces.md)
            name = rng.choice(survey)
            if name not in days:
                days[name] = Day(tuple((t, tuple(st.get(k) for k in VEHICLE_KEYS))
                                       for t, st in traces[name].records))
            day = days[name]
        else:
            day = vehicle_day(habits, rng, a, habit)
        out.append(VehicleSpec(habit, day, hw, bench * rng.uniform(0.8, 1.2), reachable,
                               direct))
    return out
