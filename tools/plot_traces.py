"""Share of the survey cars parked, plugged in and eligible to compute, by hour of day.

Drives the project's own vehicle policy (`p2pfleet.core.policy.Policy`, default settings)
over every shipped survey car-week (`p2pfleet.vehicle.survey`) through `TraceProvider`, as
a node would: a `StateObserved` at each trace change and at least every `--sample-s`
seconds, a `Tick` at each `WakeAt` the policy asks for. A sample every `--sample-s`
seconds of the week records parked, plugged in, at home and computing (the policy's
verdict: "eligible"). Energy and transfer budgets are not spent (no work is simulated).

Also the calibration: trips, km, driving minutes and departure hours in the traces beside
the figures implied by the survey tables they were drawn from (survey-meta.json), and the
share of cars at home by hour beside emobpy's own model (tools/traces/emobpy_ref.json).

    .venv/bin/python tools/plot_traces.py [--svg docs/traces-by-hour.svg]
JSON to stdout and tools/traces.last.json; --quick uses the first 20 cars.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from p2pfleet.core.policy import Policy, StateObserved, Tick, WakeAt  # noqa: E402
from p2pfleet.vehicle.providers import TraceProvider  # noqa: E402
from p2pfleet.vehicle.survey import WEEK_S, load_survey  # noqa: E402

UTC_OFFSET_S = 7200  # the traces' week starts at local midnight, +02:00
WARMUP_S = 86_400    # one looped day before the measured week: hold times, no cold start
SERIES = ("parked", "plugged_in", "home", "eligible")


def drive_car(trace, places, sample_s: int) -> dict[str, list[int]]:
    """Per hour of day: samples with the car parked, plugged in, at home, eligible."""
    p = TraceProvider(trace)
    pol = Policy()
    start = trace.start
    counts = {k: [0] * 24 for k in SERIES}
    counts["samples"] = [0] * 24
    now = start - WARMUP_S
    wake: float | None = None
    next_sample = now
    end = start + WEEK_S
    while now < end:
        state = p.state_at(now)
        effects = pol.handle(StateObserved(now, state, UTC_OFFSET_S))
        if wake is not None and wake <= now:
            wake = None
            effects += pol.handle(Tick(now, UTC_OFFSET_S))
        for e in effects:
            if isinstance(e, WakeAt):
                wake = e.at if wake is None or wake <= now else min(wake, e.at)
        while next_sample <= now:
            next_sample += sample_s
        if now >= start and (now - start) % sample_s == 0:
            x = int(now - start)
            h = (x % 86_400) // 3600
            k = _index(trace.times, x)
            counts["samples"][h] += 1
            counts["parked"][h] += state.parked
            counts["plugged_in"][h] += state.plugged_in
            counts["home"][h] += places[k] == "home"
            counts["eligible"][h] += pol.computing
        nxt = [next_sample, p.next_change_after(now) or end]
        if wake is not None and wake > now:
            nxt.append(wake)
        now = min(nxt)
    return counts


def _index(times, x: float) -> int:
    import bisect
    return max(0, bisect.bisect_right(times, x) - 1)


def calibration(fleet) -> dict:
    """Trips, km and driving minutes per car-day; share at home by hour."""
    cars = fleet.cars
    days = 7 * len(cars)
    drive_min = 0.0
    starts = [0] * 24
    for tr in fleet.traces:
        for k, s in enumerate(tr.states):
            if not s["parked"]:
                nxt = tr.times[k + 1] if k + 1 < len(tr.times) else WEEK_S
                drive_min += (nxt - tr.times[k]) / 60
                if k == 0 or tr.states[k - 1]["parked"]:
                    starts[int(tr.times[k] % 86_400 // 3600)] += 1
    out = {
        "traces": {"trips_per_car_day": round(sum(c["trips"] for c in cars) / days, 2),
                   "km_per_car_day": round(sum(c["km"] for c in cars) / days, 1),
                   "driving_min_per_car_day": round(drive_min / days, 1),
                   "departures_by_hour": [round(x / sum(starts), 4) for x in starts]},
        "published": {"car_in_use_min_per_day_mid2017": 45},
    }
    meta = fleet.meta
    out["survey_tables"] = {"source": meta["source"], "emobpy_version": meta["emobpy_version"],
                            **meta["survey_figures"]}
    return out


def emobpy_home_by_hour(path: Path) -> dict:
    """Share of emobpy's own profiles at home by hour of day, trips and km per car-day
    (the runs of tools/traces/emobpy_ref.py)."""
    profiles = [p for p in json.loads(path.read_text()) if "runs" in p]
    home, n = [0] * 24, [0] * 24
    for p in profiles:
        i = 0
        for state, steps in p["runs"]:
            for j in range(i, i + steps):
                h = int(j * p["step_h"]) % 24
                n[h] += 1
                home[h] += state == "home"
            i += steps
    days = 7 * len(profiles)
    return {"profiles": len(profiles),
            "failed": sum(1 for p in json.loads(path.read_text()) if "error" in p),
            "home_by_hour": [round(a / b, 3) if b else None for a, b in zip(home, n)],
            "trips_per_car_day": round(sum(p["trips"] for p in profiles) / days, 2),
            "km_per_car_day": round(sum(p["km"] for p in profiles) / days, 1)}


def svg(rows: dict[str, list[float]], ref: list[float] | None = None) -> str:
    w, h, pad = 720, 320, 48
    colors = {"parked": "#999999", "home": "#2a9d8f", "plugged_in": "#4682b4",
              "eligible": "#d62828"}

    def x(hr: float) -> float:
        return pad + (w - 2 * pad) * hr / 23

    def y(v: float) -> float:
        return h - pad - (h - 2 * pad) * v

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect width="{w}" height="{h}" fill="white"/>']
    for v in range(0, 11, 2):
        out.append(f'<line x1="{pad}" x2="{w - pad}" y1="{y(v / 10):.1f}" y2="{y(v / 10):.1f}" '
                   f'stroke="#ddd"/><text x="{pad - 6}" y="{y(v / 10) + 4:.1f}" '
                   f'text-anchor="end">{v * 10}%</text>')
    for hr in range(0, 24, 3):
        out.append(f'<text x="{x(hr):.1f}" y="{h - pad + 16}" text-anchor="middle">'
                   f'{hr:02d}:00</text>')
    out.append(f'<text x="{w / 2}" y="{h - 8}" text-anchor="middle">hour of day (local)'
               f'</text>')
    series = [(k, rows[k], colors[k], "") for k in ("parked", "home", "plugged_in", "eligible")]
    if ref:
        series.append(("home (emobpy run)", ref, colors["home"], ' stroke-dasharray="4 3"'))
    for i, (name, vals, color, dash) in enumerate(series):
        pts = " ".join(f"{x(hr):.1f},{y(v):.1f}" for hr, v in enumerate(vals) if v is not None)
        out.append(f'<polyline points="{pts}" fill="none" stroke="{color}" '
                   f'stroke-width="2"{dash}/>')
        out.append(f'<line x1="{pad + 10 + i * 130}" x2="{pad + 30 + i * 130}" y1="16" y2="16" '
                   f'stroke="{color}" stroke-width="2"{dash}/><text x="{pad + 34 + i * 130}" '
                   f'y="20">{name.replace("_", " ")}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sample-s", type=int, default=300)
    ap.add_argument("--quick", action="store_true", help="only the first 20 cars")
    ap.add_argument("--svg", type=Path, default=None)
    ap.add_argument("--emobpy-ref", type=Path, default=ROOT / "tools" / "traces" / "emobpy_ref.json",
                    help="JSON of emobpy's own profiles (tools/traces/emobpy_ref.py)")
    ap.add_argument("--out", type=Path, default=ROOT / "tools" / "traces.last.json")
    args = ap.parse_args()
    fleet = load_survey()
    n = 20 if args.quick else len(fleet)
    total: dict[str, list[int]] = {k: [0] * 24 for k in (*SERIES, "samples")}
    for i in range(n):
        c = drive_car(fleet.traces[i], fleet.places[i], args.sample_s)
        for k in total:
            total[k] = [a + b for a, b in zip(total[k], c[k])]
    shares = {k: [round(a / s, 3) for a, s in zip(total[k], total["samples"])] for k in SERIES}
    result = {
        "what": "share of survey cars parked / at home / plugged in / eligible (default "
                "vehicle policy computing) by local hour of day, over one week",
        "cars": n, "car_weeks": n, "sample_s": args.sample_s,
        "profiles": dict(Counter(c["profile"] for c in fleet.cars[:n])),
        "by_hour": shares,
        "mean": {k: round(sum(total[k]) / sum(total["samples"]), 3) for k in SERIES},
        "calibration": calibration(fleet),
    }
    ref = None
    if args.emobpy_ref and args.emobpy_ref.exists():
        result["calibration"]["emobpy_run"] = emobpy_home_by_hour(args.emobpy_ref)
        ref = result["calibration"]["emobpy_run"]["home_by_hour"]
    text = json.dumps(result, indent=1)
    print(text)
    if not args.quick:
        args.out.write_text(text + "\n")
    if args.svg:
        args.svg.write_text(svg(shares, ref))


if __name__ == "__main__":
    main()
