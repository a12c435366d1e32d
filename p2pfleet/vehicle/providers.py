"""Vehicle state providers: where the node learns whether the car is parked, plugged in...

A provider answers `state_at(now) -> VehicleState` for a Unix time `now`, and
`next_change_after(now) -> float | None`: the Unix time at which its answer may next
change by itself (a trace's next entry, a daily departure moving on), so the node can
wake on time instead of polling fast; None when it cannot know (live sources) or never.

Here: `StaticProvider` (values from config) and `TraceProvider` (replays a trace file,
specs/vehicle-trace-format.md). Live providers (`live.py`: the vehicle API in `tesla.py`,
JSON command and endpoint in `generic.py`, `power_supply.py`; OCPP in `ocpp/`) follow the
same interface, except that `state_at` may return None (no state to trust), with
`unavailable_why(now)` saying why and `health(now)` a status line; they also have
`run()`, a task the node starts (specs/vehicle-providers.md).
"""

from __future__ import annotations

import bisect
import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, tzinfo
from datetime import time as dtime
from importlib import resources
from pathlib import Path
from typing import Protocol, runtime_checkable

from .state import (
    FIELDS,
    REQUIRED_VEHICLE_FIELDS,
    VehicleState,
    VehicleStateError,
    state_from_mapping,
    vehicle_field_problem,
)

TRACE_FORMAT = "p2pfleet-vehicle-trace"
TRACE_VERSION = 1
MAX_TRACE_BYTES = 16 * 1024 * 1024
MAX_LINE_BYTES = 4096
BUILTIN_TRACES = ("commuter-day", "flappy-plug", "metered-network", "hot-day")
_HEADER_KEYS = ("format", "version", "start", "loop", "duration", "speed", "description")
_HHMM = re.compile(r"([01]\d|2[0-3]):([0-5]\d)")


@runtime_checkable
class VehicleProvider(Protocol):
    def state_at(self, now: float) -> VehicleState | None: ...

    def next_change_after(self, now: float) -> float | None: ...


# --------------------------------------------------------------------------- static

class StaticProvider:
    """The same state always; optionally a daily departure time ("HH:MM", local time).

    The reported departure is the next one, and stays on today's departure until
    `departure_grace_s` after it (the owner may be late), then moves to tomorrow's.
    `tz`: a tzinfo (e.g. ZoneInfo); None: the machine's local zone.
    """

    def __init__(self, state: VehicleState, *, departure_daily: str | None = None,
                 departure_grace_s: float = 3600.0, tz: tzinfo | None = None):
        if not isinstance(state, VehicleState):
            raise TypeError("StaticProvider needs a VehicleState")
        self._hm: tuple[int, int] | None = None
        if departure_daily is not None:
            m = _HHMM.fullmatch(departure_daily) if isinstance(departure_daily, str) else None
            if not m:
                raise VehicleStateError("static vehicle", "departure_daily",
                                        f"must be 'HH:MM', got {departure_daily!r}")
            self._hm = (int(m.group(1)), int(m.group(2)))
        if not isinstance(departure_grace_s, (int, float)) or departure_grace_s < 0:
            raise VehicleStateError("static vehicle", "departure_grace_s",
                                    f"must be a number >= 0, got {departure_grace_s!r}")
        self.state = state
        self.departure_grace_s = float(departure_grace_s)
        self.tz = tz

    @classmethod
    def from_config(cls, values: Mapping[str, object], *, tz: tzinfo | None = None,
                    where: str = "vehicle") -> "StaticProvider":
        """From a config table. Defaults: parked, plugged in, 100 %, limit 100 %, ethernet,
        metering unknown (so it computes only once the owner sets metered = false)."""
        values = dict(values)
        departure_daily = values.pop("departure_daily", None)
        grace = values.pop("departure_grace_s", 3600.0)
        merged = {"parked": True, "plugged_in": True, "soc_pct": 100.0,
                  "charge_limit_pct": 100.0, "network": "ethernet", **values}
        return cls(state_from_mapping(merged, where), departure_daily=departure_daily,
                   departure_grace_s=grace, tz=tz)

    def _departures(self, now: float) -> list[float]:
        h, m = self._hm
        if self.tz is None:
            y, mo, d = time.localtime(now)[:3]
            return [time.mktime((y, mo, d + k, h, m, 0, 0, 0, -1)) for k in (-1, 0, 1)]
        today = datetime.fromtimestamp(now, self.tz).date()
        return [datetime.combine(today + timedelta(days=k), dtime(h, m), tzinfo=self.tz)
                .timestamp() for k in (-1, 0, 1)]

    def _current_departure(self, now: float) -> float:
        return next(d for d in self._departures(now) if now < d + self.departure_grace_s)

    def state_at(self, now: float) -> VehicleState:
        if self._hm is None:
            return self.state
        return replace(self.state, departure_at=self._current_departure(now))

    def next_change_after(self, now: float) -> float | None:
        if self._hm is None:
            return None
        return self._current_departure(now) + self.departure_grace_s


# --------------------------------------------------------------------------- traces

class VehicleTraceError(ValueError):
    """A trace file is refused: names the file, the line (1-based; 0: the whole file),
    the field and the reason."""

    def __init__(self, source: str, line: int, field: str, reason: str):
        self.source, self.line, self.field, self.reason = source, line, field, reason
        super().__init__(f"{source}:{line}: {field}: {reason}")


@dataclass(frozen=True)
class Trace:
    """A parsed trace. `states[i]` is the full state after entry `i` (at `times[i]` trace
    seconds), as a dict of VehicleState fields with departure_at still in trace seconds."""

    source: str
    start: float
    loop: bool
    duration: float | None
    speed: float
    description: str
    times: tuple[float, ...]
    states: tuple[Mapping[str, object], ...]


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constants(name: str):
    raise ValueError(f"{name} is not a number")


def _parse_start(v: object, err) -> float:
    if _number(v) and v >= 0:
        return float(v)
    if isinstance(v, str):
        try:
            dt = datetime.fromisoformat(v)
        except ValueError:
            raise err("start", f"not an ISO 8601 date-time: {v!r}") from None
        if dt.tzinfo is None:
            raise err("start", f"{v!r} has no UTC offset (write e.g. +02:00 or Z)")
        return dt.timestamp()
    raise err("start", f"must be Unix seconds >= 0 or an ISO 8601 string, got {v!r}")


def parse_trace(text: str, source: str = "<trace>") -> Trace:
    """Parse a trace strictly. Any problem raises VehicleTraceError naming the line."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_TRACE_BYTES:
        raise VehicleTraceError(source, 0, "file", f"larger than {MAX_TRACE_BYTES} bytes")
    header: dict | None = None
    times: list[float] = []
    states: list[dict] = []
    current: dict = {}
    last_line = 0
    for lineno, raw in enumerate(text.split("\n"), start=1):
        last_line = lineno

        def err(field: str, reason: str, _n: int = lineno) -> VehicleTraceError:
            return VehicleTraceError(source, _n, field, reason)

        line = raw.removesuffix("\r")
        if not line.strip():
            continue
        if len(line.encode("utf-8", "surrogatepass")) > MAX_LINE_BYTES:
            raise err("line", f"longer than {MAX_LINE_BYTES} bytes")
        try:
            obj = json.loads(line, object_pairs_hook=_no_duplicates,
                             parse_constant=_no_constants)
        except ValueError as e:
            raise err("json", str(e)) from None
        if not isinstance(obj, dict):
            raise err("line", "must be a JSON object")
        if header is None:
            header = _parse_header(obj, err)
            continue
        t = _parse_entry(obj, err, current, times, header)
        try:
            state_from_mapping(current, "")
        except (VehicleStateError, ValueError) as e:
            field = getattr(e, "field", "entry")
            raise err(field, getattr(e, "reason", str(e))) from None
        times.append(t)
        states.append(dict(current))
    if header is None:
        raise VehicleTraceError(source, last_line, "header", "the file is empty: the first "
                                "line must be the trace header")
    if not times:
        raise VehicleTraceError(source, last_line, "entries", "the trace has no entries")
    return Trace(source, header["start"], header["loop"], header["duration"], header["speed"],
                 header["description"], tuple(times), tuple(states))


def _parse_header(obj: dict, err) -> dict:
    if obj.get("format") != TRACE_FORMAT:
        raise err("format", f"must be {TRACE_FORMAT!r}: the first line must be the header, "
                            f"got {obj.get('format')!r}")
    for key in obj:
        if key not in _HEADER_KEYS:
            raise err(key, f"unknown header field (known: {', '.join(_HEADER_KEYS)})")
    version = obj.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise err("version", f"must be an integer, got {version!r}")
    if version != TRACE_VERSION:
        raise err("version", f"unsupported version {version} (this reader knows "
                             f"{TRACE_VERSION})")
    if "start" not in obj:
        raise err("start", "missing")
    start = _parse_start(obj["start"], err)
    loop = obj.get("loop", False)
    if not isinstance(loop, bool):
        raise err("loop", f"must be true or false, got {loop!r}")
    duration = obj.get("duration")
    if duration is not None and not (_number(duration) and duration > 0):
        raise err("duration", f"must be a number of seconds > 0, got {duration!r}")
    if loop and duration is None:
        raise err("duration", "missing: a looping trace needs its period")
    speed = obj.get("speed", 1.0)
    if not (_number(speed) and speed > 0):
        raise err("speed", f"must be a number > 0, got {speed!r}")
    description = obj.get("description", "")
    if not isinstance(description, str) or len(description) > 1000:
        raise err("description", "must be a string of at most 1000 characters")
    return {"start": start, "loop": loop, "duration": None if duration is None else
            float(duration), "speed": float(speed), "description": description}


def _parse_entry(obj: dict, err, current: dict, times: list[float], header: dict) -> float:
    if "t" not in obj:
        raise err("t", "missing")
    t = obj["t"]
    if not (_number(t) and t >= 0):
        raise err("t", f"must be a number of seconds >= 0, got {t!r}")
    t = float(t)
    if not times and t != 0:
        raise err("t", f"the first entry must be at t=0 (the initial state), got {t:g}")
    if times and t <= times[-1]:
        raise err("t", f"times must increase: {t:g} is not after {times[-1]:g}")
    if header["duration"] is not None and t >= header["duration"]:
        raise err("t", f"{t:g} is not before the trace duration {header['duration']:g}")
    changed = [k for k in obj if k != "t"]
    if not changed:
        raise err("entry", "sets no field")
    for key in changed:
        if key not in FIELDS:
            raise err(key, f"unknown field (known: t, {', '.join(FIELDS)})")
        problem = vehicle_field_problem(key, obj[key])
        if problem:
            raise err(key, problem)
    if not times:
        for key in REQUIRED_VEHICLE_FIELDS:
            if key not in obj:
                raise err(key, "missing: the first entry must set the whole initial state")
    current.update({k: obj[k] for k in changed})
    return t


def load_trace(path: str | Path) -> Trace:
    """Read and parse a trace file (UTF-8, at most MAX_TRACE_BYTES)."""
    path = Path(path)
    source = str(path)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_TRACE_BYTES + 1)
    except OSError as e:
        raise VehicleTraceError(source, 0, "file", e.strerror or str(e)) from None
    if len(data) > MAX_TRACE_BYTES:
        raise VehicleTraceError(source, 0, "file", f"larger than {MAX_TRACE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise VehicleTraceError(source, line, "encoding", "not UTF-8") from None
    return parse_trace(text, source)


def builtin_trace_path(name: str) -> Path:
    """Path of a trace shipped with p2pfleet (see BUILTIN_TRACES)."""
    if name not in BUILTIN_TRACES:
        raise VehicleTraceError(name, 0, "name", f"no such built-in trace (known: "
                                                  f"{', '.join(BUILTIN_TRACES)})")
    return Path(str(resources.files("p2pfleet.vehicle") / "traces" / f"{name}.jsonl"))


def builtin_trace(name: str) -> Trace:
    return load_trace(builtin_trace_path(name))


class TraceProvider:
    """Replays a trace. Trace time at Unix time `now` is start + (now - t0) * speedup.

    t0: the Unix time at which the trace's start is replayed (default: the trace's own
    start, so a speed-1 trace follows the wall clock). speedup: default the header's
    `speed`, else 1. Before the start the initial state holds; after the end of a
    non-looping trace the last state holds; a looping trace repeats every `duration`.
    Departure times in the trace are trace seconds; they are reported as the Unix time at
    which the replay reaches them.
    """

    def __init__(self, trace: Trace | str | Path, *, t0: float | None = None,
                 speedup: float | None = None):
        self.trace = trace if isinstance(trace, Trace) else load_trace(trace)
        speedup = self.trace.speed if speedup is None else speedup
        if not (_number(speedup) and speedup > 0):
            raise ValueError(f"TraceProvider: speedup must be a number > 0, got {speedup!r}")
        if t0 is not None and not _number(t0):
            raise ValueError(f"TraceProvider: t0 must be Unix seconds, got {t0!r}")
        self.t0 = self.trace.start if t0 is None else float(t0)
        self.speedup = float(speedup)

    def _position(self, now: float) -> tuple[int, float]:
        """(loop round, trace seconds into the round) at Unix time `now`."""
        x = (now - self.t0) * self.speedup
        if self.trace.loop:
            d = self.trace.duration
            k = math.floor(x / d)
            r = x - k * d
            if r >= d:  # rounding at a round's boundary
                k, r = k + 1, r - d
            elif r < 0:
                k, r = k - 1, r + d
            return k, r
        return 0, max(x, 0.0)

    def _real(self, trace_s: float) -> float:
        """The first Unix time at which the replay has reached `trace_s` trace seconds."""
        r = self.t0 + trace_s / self.speedup
        while (r - self.t0) * self.speedup < trace_s:
            r = math.nextafter(r, math.inf)
        return r

    def state_at(self, now: float) -> VehicleState:
        k, x = self._position(now)
        i = max(0, bisect.bisect_right(self.trace.times, x) - 1)
        values = dict(self.trace.states[i])
        dep = values.get("departure_at")
        if dep is not None:
            base = k * self.trace.duration if self.trace.loop else 0.0
            values["departure_at"] = self._real(base + dep)
        return VehicleState(**values)

    def next_change_after(self, now: float) -> float | None:
        k, x = self._position(now)
        times = self.trace.times
        i = bisect.bisect_right(times, x)
        base = k * self.trace.duration if self.trace.loop else 0.0
        if i < len(times):
            return self._real(base + times[i])
        if self.trace.loop:
            return self._real(base + self.trace.duration)
        return None


__all__ = [
    "VehicleProvider", "StaticProvider", "TraceProvider", "Trace", "VehicleTraceError",
    "parse_trace", "load_trace", "builtin_trace", "builtin_trace_path", "BUILTIN_TRACES",
    "TRACE_FORMAT", "TRACE_VERSION", "MAX_TRACE_BYTES", "MAX_LINE_BYTES",
]
