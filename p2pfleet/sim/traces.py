"""Reading the vehicle traces the simulator's population is built from (the one file-reading
module of the simulator; everything after it is pure)."""

from __future__ import annotations

from pathlib import Path

from .population import DAY_S, VEHICLE_KEYS, Trace, TraceError, parse_trace

# The traces shipped with the node (package data of p2pfleet.vehicle), found by path so the
# simulator imports nothing of the live driver.
SHIPPED = Path(__file__).resolve().parents[1] / "vehicle" / "traces"


def load_traces(directory: Path = SHIPPED) -> dict[str, Trace]:
    """Every *.jsonl trace in `directory`, by file stem."""
    files = sorted(Path(directory).glob("*.jsonl"))
    if not files:
        raise TraceError(f"no *.jsonl vehicle traces in {directory}")
    return {f.stem: parse_trace(f.name, f.read_text(encoding="utf-8").splitlines())
            for f in files}


def load_survey_days() -> dict[str, Trace]:
    """Every day of the shipped survey car-weeks (p2pfleet.vehicle.survey, docs/traces.md)
    as a one-day trace named survey:<car>:<day> (day 0 = Monday): full states, t in
    seconds after local midnight, the first at 0 (the state in force at midnight), a
    departure in seconds after that midnight (past DAY_S: a later day)."""
    from ..vehicle.survey import shipped_survey

    out = {}
    for car, tr in enumerate(shipped_survey().traces):
        for day in range(7):
            lo, hi = day * DAY_S, (day + 1) * DAY_S
            k0 = max(i for i, t in enumerate(tr.times) if t <= lo)
            records = []
            for t, st in zip(tr.times[k0:], tr.states[k0:]):
                if t >= hi:
                    break
                values = {k: st.get(k) for k in VEHICLE_KEYS}
                if values["departure_at"] is not None:
                    values["departure_at"] = int(values["departure_at"]) - lo
                records.append((max(int(t) - lo, 0), values))
            out[f"survey:{car}:{day}"] = Trace(f"survey:{car}:{day}", 0, True, tuple(records))
    return out
