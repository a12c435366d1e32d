"""Make the survey-based vehicle traces shipped in p2pfleet/vehicle/traces/ (run once).

Runs in its own environment (tools/traces/Makefile: `make -C tools/traces`), never in the
project's: it reads the mobility statistics that emobpy (DIW Berlin, MIT licence) ships,
derived from Germany's national travel survey "Mobilitaet in Deutschland" (MiD 2017), and
draws car-weeks from them:

  TripsPerDay.csv               trips a car makes on a weekday / weekend day
  DepartureDestinationTrip_*.csv  joint share of (departure half-hour, destination) for
                                weekdays, Saturdays and Sundays; workers and free-time drivers
  DistanceDurationTrip.csv      joint share of (distance, duration) of a trip

The trip sampler is ours, not emobpy's `Mobility.run()` (which takes about 25 s a profile
here, and fails for some seeds of its "parttime" rules: docs/traces.md);
it follows the same tables and the same rules (a worker's weekday starts with a trip to
work; time at work 7-8 h full-time, 3.5-4 h part-time; the last trip of a day goes home).
What the survey lacks (batteries, chargers, plug-in habits, charge limits, networks,
announced departures) is added under the assumptions in ASSUMPTIONS, written with the
output so they travel with the data (docs/traces.md explains them).

Output (compact, read by p2pfleet.vehicle.survey with the standard library):
  survey-cars.csv       one row per car: its profile, seed and assumptions drawn
  survey-states.csv.gz  the full vehicle state at each change, per car, one week looping
  survey-meta.json      sources (table hashes, emobpy version), seeds, assumptions
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import json
from importlib import metadata, resources
from pathlib import Path

import numpy as np

WEEK_S = 7 * 86_400
START = "2024-06-03T00:00:00+02:00"  # a Monday; local time in Germany (CEST)
PLACES = {"home": "home", "workplace": "work"}  # the rest: "other"; driving: "road"
PURPOSES = ("errands", "escort", "home", "leisure", "shopping", "workplace")

ASSUMPTIONS = {
    "profiles": {"fulltime": 0.45, "parttime": 0.15, "freetime": 0.40},
    "battery_kwh": {"40": 0.15, "58": 0.35, "77": 0.35, "100": 0.15},
    "consumption_kwh_per_km": [0.15, 0.22],   # uniform, incl. losses at the wheel
    "charge_efficiency": 0.90,
    "home_charger": 0.75,                     # share of cars with a charger at home
    "home_charger_kw": {"11": 0.6, "3.7": 0.4},
    "work_charger": 0.30,                     # share of workers with one at work, 11 kW
    "public_ac_kw": 11.0,
    "public_ac_when_soc_below": 30.0,         # no own charger: plugs in at a stop >= 1 h
    "fast_charge_when_soc_below": 10.0,       # folded into the trip: SoC jumps to 80 %
    "plug_habit": {"arrival": 0.55, "when_low": 0.45},
    "when_low_threshold_pct": [40.0, 60.0],   # uniform, per car
    "plug_delay_min": [1, 10],                # after arrival, uniform
    "unplug_before_min": [1, 5],              # before departure, uniform
    "min_stay_to_plug_min": 20,
    "charge_limit_pct": {"80": 0.55, "90": 0.35, "100": 0.10},
    "home_wifi": 0.75,                        # home Wi-Fi reaches the parked car
    "work_wifi": 0.30,                        # unmetered Wi-Fi at a workplace charger
    "announces_departure": 0.60,              # the car knows its next departure
    "soc_step_min": 15,                       # SoC rows every 15 min while charging
}


def _pick(rng: np.random.Generator, table: dict[str, float]) -> str:
    keys = list(table)
    p = np.array([table[k] for k in keys], dtype=float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


class Stats:
    """emobpy's shipped MiD tables, as arrays."""

    def __init__(self, folder: Path):
        self.folder = folder
        trips = list(csv.DictReader((folder / "TripsPerDay.csv").open()))
        self.n_trips = np.array([int(r["trip"]) for r in trips])
        self.p_trips = {k: np.array([float(r[k]) for r in trips]) for k in ("weekday", "weekend")}
        self.dest = {who: self._dest(folder / f"DepartureDestinationTrip_{who}.csv")
                     for who in ("Worker", "Free")}
        rows = list(csv.reader((folder / "DistanceDurationTrip.csv").open()))
        self.dur_min = np.array([float(x) for x in rows[0][1:]])
        self.km = np.array([float(r[0]) for r in rows[1:]])
        self.p_km_dur = np.array([[float(x) for x in r[1:]] for r in rows[1:]])

    @staticmethod
    def _dest(path: Path) -> dict[str, np.ndarray]:
        out: dict[str, list] = {}
        for r in csv.DictReader(path.open()):
            out.setdefault(r["days"], []).append([float(r[p]) for p in PURPOSES])
        return {k: np.array(v) for k, v in out.items()}  # [48 half-hours, purposes]

    def hashes(self) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(self.folder.glob("*.csv"))}


def survey_figures(folder: Path, profiles: dict[str, float]) -> dict:
    """What emobpy's MiD tables imply: trips on weekdays and weekend days, km a trip, and
    the share of trips departing in each hour (workers' and free-time drivers' tables
    weighted by the traces' profile mix, days by their number and trips)."""
    rows = list(csv.DictReader((folder / "TripsPerDay.csv").open()))
    res = {}
    for col in ("weekday", "weekend"):
        p = [float(r[col]) for r in rows]
        res[f"trips_per_car_{col}"] = round(sum(int(r["trip"]) * x for r, x in zip(rows, p))
                                            / sum(p), 2)
    hours = [0.0] * 24
    for who, share in (("Worker", 1 - profiles["freetime"]), ("Free", profiles["freetime"])):
        by_day: dict[str, list[float]] = {}
        for r in csv.DictReader((folder / f"DepartureDestinationTrip_{who}.csv").open()):
            by_day.setdefault(r["days"], []).append(
                sum(float(v) for k, v in r.items() if k not in ("days", "time")))
        for day, weight in (("weekdays", 5 * res["trips_per_car_weekday"]),
                            ("saturday", res["trips_per_car_weekend"]),
                            ("sunday", res["trips_per_car_weekend"])):
            col = by_day[day]
            for half, x in enumerate(col):
                hours[half // 2] += share * weight * x / sum(col)
    res["departures_by_hour"] = [round(x / sum(hours), 4) for x in hours]
    grid = list(csv.reader((folder / "DistanceDurationTrip.csv").open()))
    km = [float(r[0]) for r in grid[1:]]
    mass = [sum(float(x) for x in r[1:]) for r in grid[1:]]
    mids = [(lo + hi) / 2 for lo, hi in zip([0.5] + km[:-1], km)]
    res["km_per_trip"] = round(sum(m * w for m, w in zip(mids, mass)) / sum(mass), 1)
    return res


def _day_kind(day: int) -> tuple[str, str]:
    """(trips table column, departure table rows) of day 0 = Monday .. 6 = Sunday."""
    return ("weekday", "weekdays") if day < 5 else (
        "weekend", "saturday" if day == 5 else "sunday")


def _trip_km_min(rng, st: Stats) -> tuple[float, float]:
    p = st.p_km_dur.ravel()
    i = int(rng.choice(p.size, p=p / p.sum()))
    r, c = divmod(i, st.dur_min.size)
    lo_km = st.km[r - 1] if r else 0.5
    lo_min = st.dur_min[c - 1] if c else 5.0
    return float(rng.uniform(lo_km, st.km[r])), float(rng.uniform(lo_min, st.dur_min[c]))


def _sample_departure(rng, table: np.ndarray, lo_h: float, hi_h: float,
                      allowed: list[int]) -> tuple[float, int] | None:
    """A (departure hour, destination index) from the table, departure in [lo_h, hi_h)."""
    slots = np.arange(48) * 0.5
    mask = (slots + 0.5 > lo_h) & (slots < hi_h)
    sub = table[:, allowed] * mask[:, None]
    if sub.sum() <= 0:
        return None
    i = int(rng.choice(sub.size, p=(sub / sub.sum()).ravel()))
    s, d = divmod(i, len(allowed))
    t = float(rng.uniform(max(slots[s], lo_h), min(slots[s] + 0.5, hi_h)))
    return t, allowed[d]


def _day_by_rejection(rng, st: Stats, table: np.ndarray, n: int, lo: float, end_h: float,
                      work_h: tuple[float, float] | None, min_home_h: float,
                      tries: int = 200):
    """A day's n trips as emobpy draws them: the first departure from the distribution of
    trips to its destination (work for a worker's weekday, anywhere but home otherwise),
    the others from the day's departure-time distribution, sorted, a destination drawn at
    each, and the whole day drawn again until it keeps emobpy's rules (stays of at least
    15 min, the work hours, the last trip home before `end_h`, at least `min_home_h` at
    home). None if `tries` draws all break a rule."""
    home, work = PURPOSES.index("home"), PURPOSES.index("workplace")
    slots = np.arange(48) * 0.5
    window = (slots + 0.5 > lo) & (slots < end_h)
    first_to = [work] if work_h else [i for i in range(len(PURPOSES)) if i != home]
    p1 = table[:, first_to].sum(axis=1) * window  # the first trip leaves home for these
    p = table.sum(axis=1) * window
    if p.sum() <= 0 or p1.sum() <= 0:
        return None
    p, p1 = p / p.sum(), p1 / p1.sum()
    for _ in range(tries):
        first = slots[rng.choice(48, p=p1)] + rng.uniform(0, 0.5)
        rest = slots[rng.choice(48, size=n - 1, p=p)] + rng.uniform(0, 0.5, size=n - 1)
        deps = [first, *np.sort(rest)]
        trips, loc, prev_arr = [], home, lo - 0.25
        for k, dep in enumerate(deps):
            dep = float(dep)
            if dep < prev_arr + 0.25 or dep >= end_h or (
                    loc == work and work_h and not
                    work_h[0] <= dep - prev_arr <= work_h[1] + 0.5):
                break
            if k == n - 1:
                dest = home
            elif k == 0 and work_h:
                dest = work
            else:
                allowed = [i for i in range(len(PURPOSES)) if i not in (home, loc)]
                w = table[int(dep * 2), allowed]
                dest = allowed[int(rng.choice(len(allowed), p=w / w.sum()))] if w.sum() > 0 \
                    else allowed[int(rng.integers(len(allowed)))]
            km, minutes = _trip_km_min(rng, st)
            trips.append((dep, dep + minutes / 60, PURPOSES[dest], km))
            loc, prev_arr = dest, dep + minutes / 60
        else:
            if first + 24.0 - trips[-1][1] >= min_home_h:
                return trips
    return None


def mobility_week(rng, st: Stats, profile: str) -> list[tuple[float, float, str, float]]:
    """Trips of one week: (departure h, arrival h, destination, km), hours from Monday 0:00."""
    who = "Free" if profile == "freetime" else "Worker"
    work_h = {"fulltime": (7.0, 8.0), "parttime": (3.5, 4.0)}.get(profile)
    trips: list[tuple[float, float, str, float]] = []
    earliest = 0.0
    home, work = PURPOSES.index("home"), PURPOSES.index("workplace")
    for day in range(7):
        col, rows = _day_kind(day)
        table = st.dest[who][rows]
        n = int(rng.choice(st.n_trips, p=st.p_trips[col] / st.p_trips[col].sum()))
        base = day * 24.0
        lo = max(earliest - base, 0.0)
        end_h = 20.0 if day == 6 else 23.75  # the week loops: Sunday ends at home
        loc = home
        day_trips = _day_by_rejection(rng, st, table, n, lo, end_h,
                                      work_h if day < 5 else None,
                                      9.0 if day < 5 else 6.0) if n else []
        if day_trips is not None:
            trips += [(base + d, base + a, dest, km) for d, a, dest, km in day_trips]
            earliest = (trips[-1][1] + 0.25) if trips else earliest
            continue
        # no draw kept the rules: build the day trip by trip, each departure drawn after
        # the last arrival (this pushes late trips later than the survey's distribution)
        for k in range(n):
            last = k == n - 1
            if k == 0 and work_h and day < 5:
                allowed = [work]
            elif last:
                allowed = [home]
            else:
                allowed = [i for i in range(len(PURPOSES)) if i not in (home, loc)]
            hi = end_h if last else end_h - 1.0  # an outing leaves time to get home
            if loc == work and work_h:
                lo, hi = lo + work_h[0], min(lo + work_h[1] + 0.5, end_h)
            pick = _sample_departure(rng, table, lo, hi, allowed) if lo < hi else None
            if pick is None:
                break
            dep, dest = pick
            km, minutes = _trip_km_min(rng, st)
            arr = dep + minutes / 60
            trips.append((base + dep, base + arr, PURPOSES[dest], km))
            loc, lo = dest, arr + 0.25
        if loc != home:  # the survey's rule: the last trip of a day goes home
            dep = max(min(lo, end_h), trips[-1][1] - base + 0.1)
            km, minutes = _trip_km_min(rng, st)
            trips.append((base + dep, base + dep + minutes / 60, "home", km))
        earliest = (trips[-1][1] + 0.25) if trips else earliest
    return trips


def car_states(rng, trips, car: dict) -> list[tuple[int, dict]]:
    """Full vehicle states at each change over the week (seconds from Monday 0:00).

    The week loops: the stay from the last arrival of the week to the first departure of
    the next is built once, past the week's end, and its part after the end is wrapped to
    the week's start; the state at t = 0 is the one in force at the week's end."""
    a = ASSUMPTIONS
    cap = car["battery_kwh"]
    if trips:
        stays = [(trips[k - 1][1] * 3600, trips[k][0] * 3600, trips[k - 1][2])
                 for k in range(1, len(trips))]
        stays.append((trips[-1][1] * 3600, (trips[0][0] + 168.0) * 3600, trips[-1][2]))
        drives = [(dep * 3600, km) for dep, _arr, _d, km in trips]
    else:
        stays, drives = [(0.0, float(WEEK_S), "home")], []
    # plug-in and unplug draws are made once, so the warm-up and the final pass agree
    delays = [(rng.uniform(*a["plug_delay_min"]) * 60, rng.uniform(*a["unplug_before_min"]) * 60)
              for _ in stays]

    def network(loc: str) -> tuple[str, bool]:
        if loc == "home" and car["home_wifi"]:
            return "wifi", False
        if loc == "workplace" and car["work_charger"] and car["work_wifi"]:
            return "wifi", False
        return "cellular", True

    def charger_kw(loc: str, soc: float, long_stay: bool) -> float:
        if loc == "home" and car["home_charger_kw"]:
            return car["home_charger_kw"]
        if loc == "workplace" and car["work_charger"]:
            return 11.0
        if not car["home_charger_kw"] and long_stay and soc < a["public_ac_when_soc_below"]:
            return a["public_ac_kw"]
        return 0.0

    def stay_rows(i: int, soc: float, rows: list) -> float:
        t0, t1, loc = stays[i]
        net, metered = network(loc)
        dep_at = int(t1) if car["announces_departure"] and drives else None
        parked = {"parked": True, "plugged_in": False, "network": net, "metered": metered,
                  "departure_at": dep_at, "place": PLACES.get(loc, "other")}
        rows.append((int(t0), dict(parked, soc_pct=soc)))
        plug_at, unplug_at = t0 + delays[i][0], t1 - delays[i][1]
        kw = charger_kw(loc, soc, t1 - t0 >= 3600)
        wants = car["plug_habit"] == "arrival" or soc < car["when_low_pct"] or loc not in (
            "home", "workplace")
        if kw <= 0 or not wants or unplug_at - plug_at < a["min_stay_to_plug_min"] * 60:
            return soc
        rows.append((int(plug_at), dict(parked, plugged_in=True, soc_pct=soc)))
        rate = kw * a["charge_efficiency"] / cap * 100 / 3600  # % per second
        t, step = plug_at, a["soc_step_min"] * 60
        while t < unplug_at and soc < car["charge_limit_pct"]:
            dt = min(step, unplug_at - t, (car["charge_limit_pct"] - soc) / rate)
            t += dt
            soc = min(car["charge_limit_pct"], soc + rate * dt)
            if t < unplug_at:
                rows.append((int(t), dict(parked, plugged_in=True, soc_pct=soc)))
        rows.append((int(unplug_at), dict(parked, plugged_in=False, soc_pct=soc)))
        return soc

    def run(soc: float) -> tuple[list[tuple[int, dict]], float]:
        rows: list[tuple[int, dict]] = []
        for i, (t0, km) in enumerate(drives):
            rows.append((int(t0), {"parked": False, "plugged_in": False, "soc_pct": soc,
                                   "network": "cellular", "metered": True,
                                   "departure_at": None, "place": "road"}))
            soc -= km * car["kwh_per_km"] / cap * 100
            if soc < a["fast_charge_when_soc_below"]:
                soc = 80.0
            soc = stay_rows(i, soc, rows)
        if not drives:
            soc = stay_rows(0, soc, rows)
        return rows, soc

    _rows, soc = run(car["charge_limit_pct"] * 0.8)  # warm-up week
    _rows, soc = run(soc)
    rows, _ = run(soc)
    at_end = [s for t, s in rows if t <= WEEK_S]
    first = dict(at_end[-1])
    if first["departure_at"] is not None and first["departure_at"] >= WEEK_S:
        first["departure_at"] -= WEEK_S  # the departure of this round, not the next
    out: dict[int, dict] = {0: first}
    for t, s in rows:  # wrapped first, so a state at the same second after them wins
        if t >= WEEK_S:
            s = dict(s, departure_at=None if s["departure_at"] is None
                     else s["departure_at"] - WEEK_S)
            out[max(t - WEEK_S, 1)] = s
    for t, s in rows:
        if 0 < t < WEEK_S:
            out[t] = s
    return sorted(out.items())


def draw_car(rng, index: int, seed: int) -> dict:
    a = ASSUMPTIONS
    profile = _pick(rng, a["profiles"])
    home = rng.random() < a["home_charger"]
    return {
        "car": index, "seed": seed, "profile": profile,
        "battery_kwh": float(_pick(rng, a["battery_kwh"])),
        "kwh_per_km": round(float(rng.uniform(*a["consumption_kwh_per_km"])), 3),
        "charge_limit_pct": float(_pick(rng, a["charge_limit_pct"])),
        "home_charger_kw": float(_pick(rng, a["home_charger_kw"])) if home else 0.0,
        "work_charger": profile != "freetime" and rng.random() < a["work_charger"],
        "home_wifi": rng.random() < a["home_wifi"],
        "work_wifi": rng.random() < a["work_wifi"],
        "plug_habit": _pick(rng, a["plug_habit"]),
        "when_low_pct": round(float(rng.uniform(*a["when_low_threshold_pct"])), 1),
        "announces_departure": rng.random() < a["announces_departure"],
    }


CAR_COLUMNS = ("car", "seed", "profile", "battery_kwh", "kwh_per_km", "charge_limit_pct",
               "home_charger_kw", "work_charger", "home_wifi", "work_wifi", "plug_habit",
               "when_low_pct", "announces_departure", "trips", "km")
STATE_COLUMNS = ("car", "t", "parked", "plugged_in", "soc_pct", "network", "metered",
                 "departure_at", "place")


def _cell(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.1f}" if v != int(v) else str(int(v))
    return str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cars", type=int, default=200)
    ap.add_argument("--seed", type=int, default=20240603, help="car i uses seed + i")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    folder = Path(str(resources.files("emobpy") / "data" / "eg2" / "config_files"))
    st = Stats(folder)
    cars_buf, states_buf = io.StringIO(), io.StringIO()
    cw, sw = csv.writer(cars_buf, lineterminator="\n"), csv.writer(states_buf, lineterminator="\n")
    cw.writerow(CAR_COLUMNS)
    sw.writerow(STATE_COLUMNS)
    for i in range(args.cars):
        rng = np.random.default_rng(args.seed + i)
        car = draw_car(rng, i, args.seed + i)
        trips = mobility_week(rng, st, car["profile"])
        rows = car_states(rng, trips, car)
        car.update(trips=len(trips), km=round(sum(t[3] for t in trips), 1))
        cw.writerow([_cell(car[c]) for c in CAR_COLUMNS])
        prev = None
        for t, s in rows:
            vals = [_cell(round(s["soc_pct"], 1)) if c == "soc_pct" else _cell(s[c])
                    for c in STATE_COLUMNS[2:]]
            if vals != prev:
                sw.writerow([i, t, *vals])
                prev = vals
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "survey-cars.csv").write_text(cars_buf.getvalue())
    with gzip.GzipFile(args.out / "survey-states.csv.gz", "wb", mtime=0) as f:
        f.write(states_buf.getvalue().encode())
    meta = {
        "format": "p2pfleet-survey-traces", "version": 1, "start": START, "week_s": WEEK_S,
        "cars": args.cars, "seed": args.seed, "seeds": "car i: numpy default_rng(seed + i)",
        "source": "emobpy (DIW Berlin, MIT licence) shipped statistics from MiD 2017, "
                  "data/eg2/config_files",
        "emobpy_version": metadata.version("emobpy"), "numpy_version": np.__version__,
        "tables_sha256": st.hashes(), "assumptions": ASSUMPTIONS,
        "survey_figures": survey_figures(folder, ASSUMPTIONS["profiles"]),
    }
    (args.out / "survey-meta.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
