"""Vehicle state providers: static config, trace files (specs/vehicle-trace-format.md)."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from datetime import timedelta, timezone
from pathlib import Path

import pytest

from p2pfleet.core.policy import (
    Policy,
    PolicyConfig,
    StartComputing,
    StateObserved,
    StopComputing,
)
from p2pfleet.vehicle import (
    BUILTIN_TRACES,
    StaticProvider,
    TraceProvider,
    VehicleProvider,
    VehicleState,
    VehicleStateError,
    VehicleTraceError,
    builtin_trace,
    load_trace,
    parse_trace,
)

SPEC = Path(__file__).resolve().parents[2] / "specs" / "vehicle-trace-format.md"
HEADER = {"format": "p2pfleet-vehicle-trace", "version": 1, "start": 1000}
FIRST = {"t": 0, "parked": True, "plugged_in": False, "soc_pct": 70, "charge_limit_pct": 90,
         "network": "wifi", "metered": False}


def text(*lines) -> str:
    return "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"


# ------------------------------------------------------------------ parsing

def test_shipped_traces_and_the_spec_example_parse():
    for name in BUILTIN_TRACES:
        trace = builtin_trace(name)
        assert trace.times[0] == 0 and trace.description
    example = re.search(r"```jsonl\n(.*?)```", SPEC.read_text(), re.S).group(1)
    trace = parse_trace(example, "spec example")
    assert trace.times == (0, 60, 1500, 1530, 3600)


def test_state_persists_until_changed():
    trace = parse_trace(text(HEADER, FIRST, {"t": 60, "plugged_in": True},
                             {"t": 120, "soc_pct": 71.5, "departure_at": 7200}))
    p = TraceProvider(trace)
    assert p.state_at(1000 + 59).plugged_in is False
    s = p.state_at(1000 + 130)
    assert (s.plugged_in, s.soc_pct, s.network, s.departure_at) == (True, 71.5, "wifi", 8200)
    assert s.battery_temp_c is None
    assert p.state_at(0) == p.state_at(1000)  # before the start: the initial state


BAD = [
    ([{"format": "other", "version": 1, "start": 0}], 1, "format", "must be"),
    ([FIRST], 1, "format", "first line must be the header"),
    ([{**HEADER, "version": 2}], 1, "version", "unsupported version 2"),
    ([{**HEADER, "version": "1"}], 1, "version", "integer"),
    ([{**HEADER, "colour": "red"}], 1, "colour", "unknown header field"),
    ([{**HEADER, "start": "2024-06-03T00:00:00"}], 1, "start", "no UTC offset"),
    ([{**HEADER, "start": "yesterday"}], 1, "start", "ISO 8601"),
    ([{**HEADER, "loop": True}], 1, "duration", "looping trace needs its period"),
    ([{**HEADER, "speed": 0}], 1, "speed", "> 0"),
    ([HEADER, {**FIRST, "t": 5}], 2, "t", "first entry must be at t=0"),
    ([HEADER, {k: v for k, v in FIRST.items() if k != "network"}], 2, "network",
     "initial state"),
    ([HEADER, FIRST, {"t": 60, "parked": False}, {"t": 60, "parked": True}], 4, "t",
     "times must increase: 60 is not after 60"),
    ([HEADER, FIRST, {"t": 60, "parked": False}, {"t": 30, "parked": True}], 4, "t",
     "times must increase"),
    ([HEADER, FIRST, {"t": 60, "speed_kmh": 30}], 3, "speed_kmh", "unknown field"),
    ([HEADER, FIRST, {"t": 60, "soc_pct": 104}], 3, "soc_pct", "from 0 to 100, got 104"),
    ([HEADER, FIRST, {"t": 60, "soc_pct": True}], 3, "soc_pct", "got True"),
    ([HEADER, FIRST, {"t": 60, "parked": "yes"}], 3, "parked", "true or false"),
    ([HEADER, FIRST, {"t": 60, "network": "5g"}], 3, "network", "one of wifi"),
    ([HEADER, FIRST, {"t": 60}], 3, "entry", "sets no field"),
    ([HEADER, FIRST, {"t": -1, "parked": True}], 3, "t", ">= 0"),
    ([{**HEADER, "loop": True, "duration": 100}, FIRST, {"t": 100, "parked": False}], 3, "t",
     "not before the trace duration"),
    ([HEADER, FIRST, '{"t": 60, "parked": true, "parked": false}'], 3, "json",
     "duplicate key"),
    ([HEADER, FIRST, '{"t": 60, "soc_pct": NaN}'], 3, "json", "NaN is not a number"),
    ([HEADER, FIRST, '{"t": 60, "parked": tru'], 3, "json", "Expecting value"),
    ([HEADER, FIRST, "[1, 2]"], 3, "line", "JSON object"),
    ([HEADER, FIRST, '{"t": 60, "x": "' + "a" * 5000 + '"}'], 3, "line", "longer than 4096"),
    ([HEADER], 2, "entries", "no entries"),
    ([], 2, "header", "empty"),
]


@pytest.mark.parametrize("lines,line,field,reason", BAD, ids=[f"{b[2]}-{b[3][:20]}" for b in BAD])
def test_bad_traces_are_refused_naming_line_field_and_reason(lines, line, field, reason):
    with pytest.raises(VehicleTraceError) as e:
        parse_trace(text(*lines), "bad.jsonl")
    err = e.value
    assert (err.source, err.line, err.field) == ("bad.jsonl", line, field), str(err)
    assert reason in err.reason
    assert str(err).startswith(f"bad.jsonl:{line}: {field}: ")


def test_blank_lines_are_skipped_and_counted(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(text(HEADER, "", FIRST, "   ", {"t": 1, "soc_pct": 200}))
    with pytest.raises(VehicleTraceError, match=r"t\.jsonl:5: soc_pct: "):
        load_trace(path)


def test_files_that_are_not_utf8_or_missing_are_refused(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(text(HEADER, FIRST).encode() + b'{"t": 1, "network": "\xff"}\n')
    with pytest.raises(VehicleTraceError) as e:
        load_trace(path)
    assert (e.value.line, e.value.field) == (3, "encoding")
    with pytest.raises(VehicleTraceError) as e:
        load_trace(tmp_path / "missing.jsonl")
    assert (e.value.line, e.value.field) == (0, "file")
    with pytest.raises(VehicleTraceError, match="no such built-in trace"):
        builtin_trace("nope")


def test_iso_start_with_offset():
    trace = parse_trace(text({**HEADER, "start": "2024-06-03T00:00:00+02:00"}, FIRST))
    assert trace.start == 1_717_365_600
    trace = parse_trace(text({**HEADER, "start": "2024-06-03T00:00:00Z"}, FIRST))
    assert trace.start == 1_717_372_800


# ------------------------------------------------------------------ replay

def test_loop_repeats_each_round_from_the_initial_state():
    trace = builtin_trace("commuter-day")
    p = TraceProvider(trace)
    start = trace.start
    for x in (0, 7300, 27100, 50000, 65000, 86399):
        a, b = p.state_at(start + x), p.state_at(start + 3 * 86400 + x)
        if a.departure_at is None:
            assert a == b
        else:
            assert b == replace(a, departure_at=a.departure_at + 3 * 86400)
    evening = p.state_at(start + 86400 + 19 * 3600)  # day 2, 19:00: plugged in, charging
    assert evening.plugged_in and evening.soc_pct == 59
    assert evening.departure_at == start + 2 * 86400 + 27000  # next morning 07:30
    assert p.state_at(start + 2 * 86400).departure_at == start + 2 * 86400 + 27000
    assert p.state_at(start - 86400 + 28000).parked is False  # loops before the start too


def test_speedup_runs_a_day_in_a_minute():
    trace = builtin_trace("commuter-day")
    p = TraceProvider(trace, t0=5000, speedup=1440)
    assert p.state_at(5000) == replace(TraceProvider(trace).state_at(trace.start),
                                       departure_at=5000 + 27000 / 1440)
    assert p.state_at(5000 + 64800 / 1440 + 0.01).plugged_in  # 18:00 trace time
    assert p.state_at(5000 + 60 + 27100 / 1440).parked is False  # day 2, 07:31
    default = TraceProvider(parse_trace(text({**HEADER, "speed": 60}, FIRST)))
    assert default.speedup == 60
    with pytest.raises(ValueError, match="speedup"):
        TraceProvider(trace, speedup=0)


def test_next_change_after_lands_exactly_on_each_change():
    for name, t0, speedup in (("flappy-plug", 1234.567, 1.0), ("commuter-day", 99.1, 1440.0),
                              ("hot-day", 0.3, 7.0)):
        trace = builtin_trace(name)
        p = TraceProvider(trace, t0=t0, speedup=speedup)
        now, seen = t0, 0
        while seen < len(trace.times) + 2:
            nxt = p.next_change_after(now)
            if nxt is None:
                assert not trace.loop and seen == len(trace.times) - 1
                break
            assert nxt > now
            before, after = p.state_at(nxt - 1e-6 / speedup), p.state_at(nxt)
            assert before != after or trace.loop, (name, nxt)
            now, seen = nxt, seen + 1
    p = TraceProvider(builtin_trace("flappy-plug"), t0=0)
    assert p.next_change_after(-50) == 60  # before the start: the first change
    assert p.next_change_after(60) == 150
    assert p.next_change_after(10**6) is None


def test_loop_next_change_wraps_to_the_next_round():
    trace = builtin_trace("commuter-day")
    p = TraceProvider(trace, t0=0)
    assert p.next_change_after(84600) == 86400
    assert p.next_change_after(86400) == 86400 + 7200


# ------------------------------------------------------------------ static

def test_static_provider():
    state = VehicleState(parked=True, plugged_in=True, soc_pct=90, charge_limit_pct=100,
                         network="ethernet", metered=False)
    p = StaticProvider(state)
    assert isinstance(p, VehicleProvider)
    assert p.state_at(123) == state and p.next_change_after(123) is None
    q = StaticProvider.from_config({"metered": False})
    assert q.state_at(0) == replace(state, soc_pct=100)
    with pytest.raises(VehicleStateError, match=r"vehicle: colour: unknown field"):
        StaticProvider.from_config({"colour": "red"})
    with pytest.raises(VehicleStateError, match="soc_pct"):
        StaticProvider.from_config({"soc_pct": "full"})


def test_static_daily_departure_moves_on_after_the_grace():
    tz = timezone(timedelta(hours=2))
    day = 1_717_365_600  # 2024-06-03 00:00 +02:00
    p = StaticProvider.from_config({"metered": False, "departure_daily": "07:30"}, tz=tz)
    dep = day + 27000
    assert p.state_at(day + 6 * 3600).departure_at == dep
    assert p.state_at(dep + 3599).departure_at == dep  # owner is late: still today's
    assert p.next_change_after(day + 6 * 3600) == dep + 3600
    assert p.state_at(dep + 3600).departure_at == dep + 86400
    assert p.state_at(day + 86400 + 1800).departure_at == dep + 86400  # 00:30 next day
    with pytest.raises(VehicleStateError, match="departure_daily"):
        StaticProvider.from_config({"departure_daily": "7:30"})
    local = StaticProvider.from_config({"departure_daily": "07:30"})  # machine's zone
    assert local.next_change_after(day) > day


# ------------------------------------------------------------------ shipped traces drive the policy

def replay(name: str, hours: float, step: float = 600.0):
    """Drive the default policy with a shipped trace the way a node would: observe the
    state at every trace change, every policy WakeAt, and at least every `step` seconds.
    Returns (hours after the trace start, effect, stop code) for starts and stops."""
    trace = builtin_trace(name)
    provider = TraceProvider(trace)
    policy = Policy(PolicyConfig())
    out = []
    t, end = trace.start, trace.start + hours * 3600
    while t <= end:
        for e in policy.handle(StateObserved(t, provider.state_at(t), 7200)):
            if isinstance(e, (StartComputing, StopComputing)):
                out.append((round((t - trace.start) / 3600, 2), type(e).__name__,
                            getattr(e, "code", None)))
        candidates = [t + step, provider.next_change_after(t), policy.state.wake_at]
        t = min(c for c in candidates if c is not None and c > t)
    return out


def test_shipped_traces_behave_as_documented():
    # commuter: computes 00:05-06:30, then from 19:25 (battery reaches the 60% floor at
    # 19:20) until 06:30 the next day
    assert replay("commuter-day", 31) == [
        (0.08, "StartComputing", None), (6.5, "StopComputing", "departure"),
        (19.42, "StartComputing", None), (30.5, "StopComputing", "departure")]
    # flappy plug: plugged in at most 900 s at a time, never less than 300 s between a stop
    # and the next start
    assert replay("flappy-plug", 2) == [(0.25, "StartComputing", None),
                                        (0.42, "StopComputing", "unplugged"),
                                        (0.54, "StartComputing", None)]
    assert replay("metered-network", 3) == [
        (0.08, "StartComputing", None), (0.5, "StopComputing", "metered"),
        (2.08, "StartComputing", None), (2.5, "StopComputing", "no_network"),
        (2.75, "StartComputing", None)]
    assert replay("hot-day", 12) == [(0.08, "StartComputing", None),
                                     (2.5, "StopComputing", "cabin_hot"),
                                     (9.08, "StartComputing", None)]
