"""The vehicle policy: may this car compute now, and must it leave the mesh?

A pure state machine (notes/style.md): frozen events in, effects out; no clock reads, no
randomness, no I/O. `Policy.handle(event) -> list[effect]` decides, then mutates: an event
it refuses (`PolicyUsageError`) changes nothing. The same events give the same effects, so
the simulator can replay a node's event log.

Time. Every event carries `at`, Unix seconds, and events must not go back in time. Quiet
hours, tariff windows and the daily counters live in *local* time: `StateObserved` and
`Tick` carry `utc_offset_s`, the offset of the owner's time zone at `at` (the node passes
`datetime.fromtimestamp(at).astimezone().utcoffset()`; the simulator passes whatever its
cars live in). Local time is `at + utc_offset_s`; other events use the last offset given.
The offset is part of the event, so a replayed log needs no time zone database. Boundaries
ahead (end of quiet hours, next midnight) are computed with the current offset; across a
daylight-saving change they may be off by the change, which is bounded by `recheck_s`: the
machine asks to be woken at least that often and then sees the new offset.

The rules. The car may compute while all of these hold:

  vehicle  (read from the last `VehicleState`; they must have held for `resume_after_s`
           before computing starts, so a flapping plug or sensor starts nothing):
    - a state was observed, not longer ago than `state_max_age_s` (a silent provider stops
      computing rather than trusting an old "plugged in"), and the provider has not since
      said it has none (`StateUnavailable`: a live source failed, timed out or reported
      impossible values; the last state is forgotten at once);
    - parked, and plugged in;
    - battery at or above the effective floor = min(battery_floor_pct,
      charge_limit_pct - charge_limit_margin_pct): a floor at or above the car's own charge
      limit would flap as the car tops up from limit - 1% to the limit;
    - battery and cabin temperatures at or under their limits (an unknown one, None, is not
      checked: a provider that cannot read it says so);
    - a network; known to be unmetered (`metered is False`) when `require_unmetered`;
      `metered=None` (unknown) counts as metered;
    - not within `departure_margin_s` before the planned departure, nor after it while the
      provider still reports that departure (the car is about to leave, or late).
  schedule (local time, no hysteresis): outside quiet hours and excluded tariff windows.
  owner: not paused (`PauseRequested`, `StopAfterCurrent`) until `ResumeRequested`.
  budgets: energy used today < daily_energy_budget_wh; bytes transferred today <
    daily_transfer_cap_mb (MB = 10^6 bytes). Both reset at local midnight.

Hysteresis covers only the vehicle conditions: they are noisy physical signals. Schedule,
owner and budget conditions are exact, so computing resumes as soon as they clear if the
vehicle conditions have held long enough (e.g. plugged in all night: quiet hours end at
07:00, computing starts at 07:00).

Effects. Starting: `JoinMesh()`, then `StartComputing(threads, cpu_share)`. Stopping:
`StopComputing(reason, hand_back, code)`, then `LeaveMesh(flush_byte_cap)`: publish a
leaving record, flush pending results and receipts up to `flush_byte_cap` bytes (0 unless
the link is usable: a network, unmetered or allowed metered; never more than today's
transfer cap leaves), and close every connection. Out of the mesh the node holds no
connection, sends no heartbeat and serves no DHT. `hand_back=True` means stop now and hand
back the finished micro-batches; `hand_back=False` (only for `StopAfterCurrent`) means
take no new lease and let the running shard finish offline (it needs no mesh), its result
waits in the outbox for the next `JoinMesh`. If a condition then fails while that shard may
still run, one more `StopComputing(..., hand_back=True)` follows (and nothing else);
otherwise `StartComputing` and `StopComputing` alternate, as do `JoinMesh` and
`LeaveMesh`. `WakeAt(at)` asks the driver to send a `Tick` then (the next time a decision
may change by time alone); it is emitted when it is earlier than the pending one or the
pending one has passed, so drivers keep the minimum, as in notes/style.md.

Energy. The policy counts what `EnergyUsed` reports; the node computes it with
`p2pfleet.core.energy.account()`: where the car or charger meters the node computer's
energy (`VehicleState.charger_energy_wh`, cumulative), the delta of that meter; otherwise
an estimate, wh = power_w * cpu_share * busy_s / 3600, with power_w the computer's draw at
full load (60 W by default for a car computer). The estimate is good to a factor of about
two (idle draw, frequency scaling, converter and charger losses are ignored); metered
values are exact to the meter. See specs/vehicle-trace-format.md.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields

DAY_S = 86_400
MB = 1_000_000
KIB = 1024
NETWORKS = ("wifi", "ethernet", "cellular", "none")
MAX_UTC_OFFSET_S = 18 * 3600


class PolicyUsageError(Exception):
    """The caller misused the policy machine (our bug): refused, nothing changed."""


class PolicyConfigError(ValueError):
    """A policy setting is invalid; the message names the setting."""


# --------------------------------------------------------------------------- vehicle state


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _number_in(lo: float, hi: float):
    def check(v: object) -> str | None:
        if not _is_number(v) or not lo <= v <= hi:
            return f"must be a number from {lo:g} to {hi:g}, got {v!r}"
        return None

    return check


def _optional(check):
    def opt(v: object) -> str | None:
        return None if v is None else check(v)

    return opt


def _bool(v: object) -> str | None:
    return None if isinstance(v, bool) else f"must be true or false, got {v!r}"


def _network(v: object) -> str | None:
    return None if v in NETWORKS else f"must be one of {', '.join(NETWORKS)}, got {v!r}"


def _charge_limit(v: object) -> str | None:
    if not _is_number(v) or not 0 < v <= 100:
        return f"must be a number above 0 and at most 100, got {v!r}"
    return None


def _non_negative(v: object) -> str | None:
    if not _is_number(v) or v < 0:
        return f"must be a number >= 0, got {v!r}"
    return None


# Field name -> check returning a problem (or None). The trace reader uses the same checks.
VEHICLE_FIELD_CHECKS = {
    "parked": _bool,
    "plugged_in": _bool,
    "soc_pct": _number_in(0, 100),
    "charge_limit_pct": _charge_limit,
    "battery_temp_c": _optional(_number_in(-100, 200)),
    "cabin_temp_c": _optional(_number_in(-100, 200)),
    "network": _network,
    "metered": _optional(_bool),
    "departure_at": _optional(_non_negative),
    "charger_energy_wh": _optional(_non_negative),
}
REQUIRED_VEHICLE_FIELDS = ("parked", "plugged_in", "soc_pct", "charge_limit_pct", "network")
_FLOAT_FIELDS = ("soc_pct", "charge_limit_pct", "battery_temp_c", "cabin_temp_c",
                 "departure_at", "charger_energy_wh")


def vehicle_field_problem(name: str, value: object) -> str | None:
    """Why `value` is not acceptable for VehicleState field `name`, or None if it is."""
    check = VEHICLE_FIELD_CHECKS.get(name)
    if check is None:
        return "unknown vehicle state field"
    return check(value)


@dataclass(frozen=True, kw_only=True)
class VehicleState:
    """What the car (or the machine the node runs on) reports at one moment.

    metered: None = unknown, treated as metered. departure_at: Unix seconds of the planned
    departure, or None. charger_energy_wh: a cumulative meter of the energy the node's
    computer used, as the car or charger measures it (None: no such meter; never the
    charging meter of the whole car). Temperatures: None = not measured, not checked.
    """

    parked: bool
    plugged_in: bool
    soc_pct: float
    charge_limit_pct: float
    network: str
    metered: bool | None = None
    battery_temp_c: float | None = None
    cabin_temp_c: float | None = None
    departure_at: float | None = None
    charger_energy_wh: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            problem = vehicle_field_problem(f.name, getattr(self, f.name))
            if problem:
                raise ValueError(f"VehicleState.{f.name}: {problem}")
        for name in _FLOAT_FIELDS:
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, float(v))


# --------------------------------------------------------------------------- configuration

_WINDOW_RE = re.compile(r"(\d\d):(\d\d)-(\d\d):(\d\d)")


@dataclass(frozen=True)
class Window:
    """A daily local-time window [start, end), minutes after midnight; may wrap midnight."""

    start_min: int
    end_min: int
    text: str

    @property
    def length_s(self) -> int:
        return ((self.end_min - self.start_min) % 1440 or 1440) * 60

    @classmethod
    def parse(cls, text: object, where: str) -> "Window":
        m = _WINDOW_RE.fullmatch(text) if isinstance(text, str) else None
        if not m:
            raise PolicyConfigError(f"{where}: {text!r} is not of the form 'HH:MM-HH:MM'")
        sh, sm, eh, em = (int(g) for g in m.groups())
        if sh > 23 or sm > 59 or em > 59 or eh > 24 or (eh == 24 and em != 0):
            raise PolicyConfigError(f"{where}: {text!r}: hours 00-23 (24:00 only as an end), "
                                    "minutes 00-59")
        start, end = sh * 60 + sm, eh * 60 + em
        if start == end % 1440 and not (start == 0 and end == 1440):
            raise PolicyConfigError(f"{where}: {text!r} is empty (start equals end); "
                                    "write 00:00-24:00 for the whole day")
        return cls(start, end, text)


def _check_cfg(name: str, ok: bool, want: str, value: object) -> None:
    if not ok:
        raise PolicyConfigError(f"PolicyConfig.{name}: must be {want}, got {value!r}")


@dataclass(frozen=True)
class PolicyConfig:
    """The owner's rules. Durations are seconds; see the module docstring for each rule."""

    battery_floor_pct: float = 60.0
    charge_limit_margin_pct: float = 5.0       # effective floor <= charge limit - this
    max_battery_temp_c: float = 40.0
    max_cabin_temp_c: float = 45.0
    require_unmetered: bool = True
    quiet_hours: tuple[str, ...] = ()          # local "HH:MM-HH:MM", may wrap midnight
    excluded_tariff_windows: tuple[str, ...] = ()
    departure_margin_s: float = 3600.0
    resume_after_s: float = 300.0              # hysteresis: vehicle conditions held this long
    cpu_share: float = 0.5
    max_threads: int = 2
    daily_energy_budget_wh: float | None = 2000.0   # None: no budget
    daily_transfer_cap_mb: float | None = 500.0     # MB = 10^6 bytes; None: no cap
    power_w: float = 60.0                      # computer's draw at full load (estimates)
    leaving_flush_cap_kb: int = 64             # KiB the node may flush while leaving
    state_max_age_s: float | None = 900.0      # older vehicle state counts as unknown
    recheck_s: float | None = 900.0            # wake at least this often (DST, clock drift)
    quiet_windows: tuple[Window, ...] = field(init=False, repr=False, compare=False)
    tariff_windows: tuple[Window, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        num = _is_number
        _check_cfg("battery_floor_pct", num(self.battery_floor_pct)
                   and 0 <= self.battery_floor_pct <= 100, "a number 0..100",
                   self.battery_floor_pct)
        _check_cfg("charge_limit_margin_pct", num(self.charge_limit_margin_pct)
                   and 0 <= self.charge_limit_margin_pct <= 50, "a number 0..50",
                   self.charge_limit_margin_pct)
        for name in ("max_battery_temp_c", "max_cabin_temp_c"):
            _check_cfg(name, num(getattr(self, name)), "a number", getattr(self, name))
        _check_cfg("require_unmetered", isinstance(self.require_unmetered, bool),
                   "true or false", self.require_unmetered)
        for name in ("departure_margin_s", "resume_after_s"):
            v = getattr(self, name)
            _check_cfg(name, num(v) and v >= 0, "a number >= 0", v)
        _check_cfg("cpu_share", num(self.cpu_share) and 0 < self.cpu_share <= 1,
                   "a number above 0 and at most 1", self.cpu_share)
        _check_cfg("max_threads", isinstance(self.max_threads, int)
                   and not isinstance(self.max_threads, bool) and self.max_threads >= 1,
                   "an integer >= 1", self.max_threads)
        for name in ("daily_energy_budget_wh", "daily_transfer_cap_mb"):
            v = getattr(self, name)
            _check_cfg(name, v is None or (num(v) and v >= 0), "a number >= 0 or none", v)
        _check_cfg("power_w", num(self.power_w) and self.power_w > 0, "a number > 0",
                   self.power_w)
        _check_cfg("leaving_flush_cap_kb", isinstance(self.leaving_flush_cap_kb, int)
                   and not isinstance(self.leaving_flush_cap_kb, bool)
                   and self.leaving_flush_cap_kb >= 0, "an integer >= 0",
                   self.leaving_flush_cap_kb)
        for name in ("state_max_age_s", "recheck_s"):
            v = getattr(self, name)
            _check_cfg(name, v is None or (num(v) and v > 0), "a number > 0 or none", v)
        for name, parsed in (("quiet_hours", "quiet_windows"),
                             ("excluded_tariff_windows", "tariff_windows")):
            raw = getattr(self, name)
            if isinstance(raw, str) or not isinstance(raw, (list, tuple)):
                raise PolicyConfigError(f"PolicyConfig.{name}: must be a list of "
                                        f"'HH:MM-HH:MM' strings, got {raw!r}")
            object.__setattr__(self, name, tuple(raw))
            windows = tuple(Window.parse(w, f"PolicyConfig.{name}[{i}]")
                            for i, w in enumerate(raw))
            object.__setattr__(self, parsed, windows)

    def effective_floor(self, charge_limit_pct: float) -> float:
        return max(0.0, min(self.battery_floor_pct,
                            charge_limit_pct - self.charge_limit_margin_pct))

    @property
    def transfer_cap_bytes(self) -> int | None:
        cap = self.daily_transfer_cap_mb
        return None if cap is None else int(cap * MB)


# --------------------------------------------------------------------------- events

@dataclass(frozen=True)
class StateObserved:
    at: float
    vehicle_state: VehicleState
    utc_offset_s: int = 0


@dataclass(frozen=True)
class StateUnavailable:
    """The provider has no trustworthy state now (its source failed, timed out, lied, or
    the car sleeps and was never read). The last state is forgotten: `no_state` with `why`."""

    at: float
    why: str
    utc_offset_s: int = 0


MAX_WHY_CHARS = 300


@dataclass(frozen=True)
class Tick:
    at: float
    utc_offset_s: int = 0


@dataclass(frozen=True)
class EnergyUsed:
    """Energy the node used since the last report (see core/energy.py)."""

    at: float
    wh: float


@dataclass(frozen=True)
class BytesTransferred:
    """Bytes the node sent plus received since the last report."""

    at: float
    n: int


@dataclass(frozen=True)
class PauseRequested:
    """The owner pauses: stop now, hand back; stays paused until ResumeRequested."""

    at: float


@dataclass(frozen=True)
class ResumeRequested:
    at: float


@dataclass(frozen=True)
class StopAfterCurrent:
    """The owner pauses, but lets the running shard finish first."""

    at: float


EVENTS = (StateObserved, StateUnavailable, Tick, EnergyUsed, BytesTransferred, PauseRequested,
          ResumeRequested, StopAfterCurrent)


# --------------------------------------------------------------------------- effects

@dataclass(frozen=True)
class StartComputing:
    threads: int
    cpu_share: float


@dataclass(frozen=True)
class StopComputing:
    reason: str                 # human-readable, all failing conditions
    hand_back: bool = True      # False: let the running shard finish (StopAfterCurrent)
    code: str = "policy"        # the first failing condition, see CONDITION_CODES


@dataclass(frozen=True)
class JoinMesh:
    pass


@dataclass(frozen=True)
class LeaveMesh:
    flush_byte_cap: int


@dataclass(frozen=True)
class WakeAt:
    at: float


# --------------------------------------------------------------------------- reasons

VEHICLE_CODES = ("no_state", "stale_state", "not_parked", "unplugged", "battery_low",
                 "battery_hot", "cabin_hot", "no_network", "metered", "departure")
CONDITION_CODES = VEHICLE_CODES + ("quiet_hours", "tariff", "paused", "stop_after_current",
                                   "energy_budget", "transfer_cap")


@dataclass(frozen=True)
class Reason:
    """Why the car is not computing. until: when it clears by time alone, if known."""

    code: str
    text: str
    until: float | None = None


def hand_back_reason(code: str) -> str:
    """The wire `HandBack.reason` for a StopComputing code."""
    if code in ("not_parked", "unplugged"):
        return "unplugged"
    if code == "departure":
        return "departure"
    return "policy"


def _hhmm(t: float, off: int) -> str:
    sod = int((t + off) % DAY_S)
    return f"{sod // 3600:02d}:{sod % 3600 // 60:02d}"


def _dur(s: float) -> str:
    s = max(0.0, s)
    if s < 60:
        return f"{math.ceil(s)} s"
    m = math.ceil(s / 60 - 1e-9)
    if m < 60:
        return f"{m} min"
    h, m = divmod(m, 60)
    return f"{h} h {m} min" if m else f"{h} h"


def _pct(x: float) -> str:
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


def _local_day(at: float, off: int) -> int:
    return math.floor((at + off) / DAY_S)


def _next_midnight(at: float, off: int) -> float:
    return (_local_day(at, off) + 1) * DAY_S - off


def _window_span(windows: tuple[Window, ...], at: float, off: int):
    """(end of the union of windows containing `at` or None, next window start or None)."""
    if not windows:
        return None, None
    midnight0 = _local_day(at, off) * DAY_S - off
    spans = sorted(
        (midnight0 + d * DAY_S + w.start_min * 60, midnight0 + d * DAY_S + w.start_min * 60
         + w.length_s)
        for d in (-1, 0, 1, 2) for w in windows
    )
    merged: list[list[float]] = []
    for s, e in spans:
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    inside = next((e for s, e in merged if s <= at < e), None)
    upcoming = next((s for s, e in merged if s > at), None)
    return inside, upcoming


# --------------------------------------------------------------------------- the machine

@dataclass(frozen=True)
class PolicyState:
    """Everything the policy remembers. Replaced whole after each accepted event."""

    at: float | None = None                 # time of the last event
    utc_offset_s: int = 0                   # last local offset given
    vehicle: VehicleState | None = None
    observed_at: float | None = None
    holding_since: float | None = None      # vehicle conditions true since (hysteresis)
    computing: bool = False                 # also: in the mesh
    finishing: bool = False                 # stopped with hand_back=False, shard may run
    paused: str | None = None               # None | "paused" | "stop_after_current"
    day: int | None = None                  # local day number of the counters
    energy_wh: float = 0.0                  # today
    transfer_bytes: int = 0                 # today
    wake_at: float | None = None            # last WakeAt emitted
    unavailable: str | None = None          # why the provider has no state (StateUnavailable)

    @property
    def name(self) -> str:
        name = "COMPUTING" if self.computing else ("FINISHING" if self.finishing else "OUT")
        return name + (f"/{self.paused}" if self.paused else "")


def _with(s: PolicyState, **changes: object) -> PolicyState:
    """`dataclasses.replace(s, **changes)` without running `__init__` again: the same
    record (PolicyState has no checks of its own), a fifth of the cost, and the simulator
    copies the state a few times per event for every car."""
    new = object.__new__(PolicyState)
    new.__dict__.update(s.__dict__)
    new.__dict__.update(changes)
    return new


def _vehicle_failures(cfg: PolicyConfig, s: PolicyState, at: float) -> list[Reason]:
    v, off = s.vehicle, s.utc_offset_s
    if v is None:
        return [Reason("no_state", "no vehicle state observed yet" if s.unavailable is None
                       else f"no vehicle state: {s.unavailable}")]
    out: list[Reason] = []
    age = at - s.observed_at
    if cfg.state_max_age_s is not None and age >= cfg.state_max_age_s:
        out.append(Reason("stale_state", f"vehicle state is stale: last observed {_dur(age)} "
                                         f"ago (limit {_dur(cfg.state_max_age_s)})"))
    if not v.parked:
        out.append(Reason("not_parked", "not parked (driving)"))
    if not v.plugged_in:
        out.append(Reason("unplugged", "not plugged in"))
    floor = cfg.effective_floor(v.charge_limit_pct)
    if v.soc_pct < floor:
        text = f"battery {_pct(v.soc_pct)}% < floor {_pct(floor)}%"
        if floor < cfg.battery_floor_pct:
            text += (f" (charge limit {_pct(v.charge_limit_pct)}% - "
                     f"{_pct(cfg.charge_limit_margin_pct)}%)")
        out.append(Reason("battery_low", text))
    if v.battery_temp_c is not None and v.battery_temp_c > cfg.max_battery_temp_c:
        out.append(Reason("battery_hot", f"battery {v.battery_temp_c:g} C > "
                                         f"{cfg.max_battery_temp_c:g} C"))
    if v.cabin_temp_c is not None and v.cabin_temp_c > cfg.max_cabin_temp_c:
        out.append(Reason("cabin_hot", f"cabin {v.cabin_temp_c:g} C > "
                                       f"{cfg.max_cabin_temp_c:g} C"))
    if v.network == "none":
        out.append(Reason("no_network", "no network"))
    elif cfg.require_unmetered and v.metered is not False:
        out.append(Reason("metered", f"{v.network} network is metered" if v.metered else
                          f"{v.network} network may be metered (unknown counts as metered)"))
    dep = v.departure_at
    if dep is not None and at >= dep - cfg.departure_margin_s:
        if at < dep:
            text = (f"departure at {_hhmm(dep, off)} in {_dur(dep - at)} "
                    f"(margin {_dur(cfg.departure_margin_s)})")
        else:
            text = (f"departure time {_hhmm(dep, off)} has passed; waiting for the car to "
                    "leave or a new departure time")
        out.append(Reason("departure", text))
    return out


def _failures(cfg: PolicyConfig, s: PolicyState, at: float) -> list[Reason]:
    off = s.utc_offset_s
    out = _vehicle_failures(cfg, s, at)
    until, _ = _window_span(cfg.quiet_windows, at, off)
    if until is not None:
        out.append(Reason("quiet_hours", f"quiet hours until {_hhmm(until, off)}", until))
    until, _ = _window_span(cfg.tariff_windows, at, off)
    if until is not None:
        out.append(Reason("tariff", f"excluded tariff window until {_hhmm(until, off)}", until))
    if s.paused == "paused":
        out.append(Reason("paused", "paused by the owner"))
    elif s.paused == "stop_after_current":
        out.append(Reason("stop_after_current", "stopped by the owner after the current shard"))
    midnight = _next_midnight(at, off)
    budget = cfg.daily_energy_budget_wh
    if budget is not None and s.energy_wh >= budget:
        out.append(Reason("energy_budget", f"energy budget used {s.energy_wh:.0f}/{budget:g} Wh "
                                           f"today, resets at {_hhmm(midnight, off)}", midnight))
    cap = cfg.transfer_cap_bytes
    if cap is not None and s.transfer_bytes >= cap:
        out.append(Reason("transfer_cap", f"transfer cap used {s.transfer_bytes / MB:.1f}/"
                                          f"{cfg.daily_transfer_cap_mb:g} MB today, resets at "
                                          f"{_hhmm(midnight, off)}", midnight))
    return out


def _advance(cfg: PolicyConfig, s: PolicyState, at: float, off: int):
    """Move the held state to time `at`: new local day, and vehicle conditions that lapsed
    by time alone (departure margin, stale state) since the last event."""
    held_day = s.day
    if s.day is not None and s.at is not None and off != s.utc_offset_s:
        # A new offset (time zone learnt, or DST): today's counters belong to the local
        # day of the last event as seen with the new offset.
        held_day = _local_day(s.at, off)
    day = _local_day(at, off)
    if held_day is None or day > held_day:
        s = _with(s, day=day, energy_wh=0.0, transfer_bytes=0, at=at, utc_offset_s=off)
    else:
        s = _with(s, day=held_day, at=at, utc_offset_s=off)
    lapsed: list[Reason] = []
    if s.holding_since is not None:
        lapsed = _vehicle_failures(cfg, s, at)
        if lapsed:
            s = _with(s, holding_since=None)
    return s, lapsed


def _holding(cfg: PolicyConfig, s: PolicyState, fails: list[Reason], at: float):
    if any(r.code in VEHICLE_CODES for r in fails):
        return None, False
    since = at if s.holding_since is None else s.holding_since
    return since, at - since >= cfg.resume_after_s


def _flush_cap(cfg: PolicyConfig, s: PolicyState, at: float) -> int:
    v = s.vehicle
    fresh = cfg.state_max_age_s is None or (
        s.observed_at is not None and at - s.observed_at < cfg.state_max_age_s)
    if v is None or not fresh or v.network == "none":
        return 0
    if v.metered is not False and cfg.require_unmetered:
        return 0
    cap = cfg.leaving_flush_cap_kb * KIB
    if cfg.transfer_cap_bytes is not None:
        cap = min(cap, max(0, cfg.transfer_cap_bytes - s.transfer_bytes))
    return cap


def _stop(why: list[Reason], hand_back: bool) -> StopComputing:
    return StopComputing("; ".join(r.text for r in why), hand_back, why[0].code)


def _next_wake(cfg: PolicyConfig, s: PolicyState, at: float, fails: list[Reason]):
    off = s.utc_offset_s
    cands: list[float] = []
    if cfg.recheck_s is not None:
        cands.append(at + cfg.recheck_s)
    if s.holding_since is not None:
        cands.append(s.holding_since + cfg.resume_after_s)
    v = s.vehicle
    if v is not None and v.departure_at is not None:
        cands.append(v.departure_at - cfg.departure_margin_s)
    if cfg.state_max_age_s is not None and s.observed_at is not None:
        cands.append(s.observed_at + cfg.state_max_age_s)
    for windows in (cfg.quiet_windows, cfg.tariff_windows):
        cands.extend(t for t in _window_span(windows, at, off) if t is not None)
    if any(r.code in ("energy_budget", "transfer_cap") for r in fails):
        cands.append(_next_midnight(at, off))
    later = [c for c in cands if c > at]
    return min(later) if later else None


def _decide(cfg: PolicyConfig, s: PolicyState, at: float, lapsed: list[Reason]):
    fails = _failures(cfg, s, at)
    since, held = _holding(cfg, s, fails, at)
    if since != s.holding_since:
        s = _with(s, holding_since=since)
    effects: list = []
    if s.computing and (fails or not held):
        why = fails or lapsed or [Reason("policy", "conditions lapsed")]
        hand_back = not (len(why) == 1 and why[0].code == "stop_after_current")
        effects += [_stop(why, hand_back), LeaveMesh(_flush_cap(cfg, s, at))]
        s = _with(s, computing=False, finishing=not hand_back)
    elif not s.computing:
        urgent = [r for r in fails if r.code != "stop_after_current"] or lapsed
        if s.finishing and urgent:
            effects.append(_stop(urgent, True))
            s = _with(s, finishing=False)
        elif not fails and held:
            effects += [JoinMesh(), StartComputing(cfg.max_threads, cfg.cpu_share)]
            s = _with(s, computing=True, finishing=False)
    wake = _next_wake(cfg, s, at, fails)
    if wake is not None and (s.wake_at is None or s.wake_at <= at or wake < s.wake_at):
        effects.append(WakeAt(wake))
        s = _with(s, wake_at=wake)
    return s, effects


def _refuse(s: PolicyState, ev: object, why: str) -> PolicyUsageError:
    at = getattr(ev, "at", None)
    return PolicyUsageError(f"can't handle {type(ev).__name__}(at={at!r}) when "
                            f"state={s.name}: {why}")


def _check(s: PolicyState, ev: object) -> None:
    if type(ev) not in EVENTS:
        raise _refuse(s, ev, "not a policy event")
    if not _is_number(ev.at) or ev.at < 0:
        raise _refuse(s, ev, "at must be a finite number of Unix seconds >= 0")
    if s.at is not None and ev.at < s.at:
        raise _refuse(s, ev, f"time went backwards (last event at={s.at!r})")
    if isinstance(ev, (StateObserved, StateUnavailable, Tick)):
        off = ev.utc_offset_s
        if not isinstance(off, int) or isinstance(off, bool) or abs(off) > MAX_UTC_OFFSET_S:
            raise _refuse(s, ev, f"utc_offset_s must be an integer within +-18 h, got {off!r}")
    if isinstance(ev, StateObserved) and not isinstance(ev.vehicle_state, VehicleState):
        raise _refuse(s, ev, "vehicle_state must be a VehicleState")
    if isinstance(ev, StateUnavailable) and not (
            isinstance(ev.why, str) and 0 < len(ev.why) <= MAX_WHY_CHARS):
        raise _refuse(s, ev, f"why must be a non-empty string of at most {MAX_WHY_CHARS} "
                             "characters")
    if isinstance(ev, EnergyUsed) and not (_is_number(ev.wh) and ev.wh >= 0):
        raise _refuse(s, ev, f"wh must be a finite number >= 0, got {ev.wh!r}")
    if isinstance(ev, BytesTransferred) and not (
            isinstance(ev.n, int) and not isinstance(ev.n, bool) and ev.n >= 0):
        raise _refuse(s, ev, f"n must be an integer >= 0, got {ev.n!r}")


_COUNTERS = (EnergyUsed, BytesTransferred)


def _below_limit(cfg: PolicyConfig, s: PolicyState, ev: object) -> bool:
    """Does the count `ev` adds stay below its daily limit (or is there none)?"""
    if isinstance(ev, EnergyUsed):
        budget = cfg.daily_energy_budget_wh
        return budget is None or s.energy_wh + ev.wh < budget
    cap = cfg.transfer_cap_bytes
    return cap is None or s.transfer_bytes + ev.n < cap


def _apply(s: PolicyState, ev: object) -> PolicyState:
    if isinstance(ev, StateObserved):
        return _with(s, vehicle=ev.vehicle_state, observed_at=ev.at, unavailable=None)
    if isinstance(ev, StateUnavailable):
        return _with(s, vehicle=None, observed_at=None, unavailable=ev.why)
    if isinstance(ev, EnergyUsed):
        return _with(s, energy_wh=s.energy_wh + ev.wh)
    if isinstance(ev, BytesTransferred):
        return _with(s, transfer_bytes=s.transfer_bytes + ev.n)
    if isinstance(ev, PauseRequested):
        return _with(s, paused="paused")
    if isinstance(ev, StopAfterCurrent):
        return s if s.paused == "paused" else _with(s, paused="stop_after_current")
    if isinstance(ev, ResumeRequested):
        return _with(s, paused=None)
    return s  # Tick


class Policy:
    """The vehicle policy machine of one node. See the module docstring."""

    def __init__(self, config: PolicyConfig | None = None):
        self.config = config if config is not None else PolicyConfig()
        self._s = PolicyState()

    @property
    def state(self) -> PolicyState:
        return self._s

    @property
    def computing(self) -> bool:
        return self._s.computing

    @property
    def in_mesh(self) -> bool:
        return self._s.computing

    def handle(self, ev: object) -> list:
        s = self._s
        _check(s, ev)
        if type(ev) in _COUNTERS and ev.at == s.at and _below_limit(self.config, s, ev):
            # At the instant of the last event, with the count still below its limit,
            # nothing the decision reads has changed: the same decision, so no effect (a
            # node reports energy and bytes together; the simulator does so per lease).
            self._s = _apply(s, ev)
            return []
        return self._full_decision(s, ev)

    def _full_decision(self, s: PolicyState, ev: object) -> list:
        off = (ev.utc_offset_s if isinstance(ev, (StateObserved, StateUnavailable, Tick))
               else s.utc_offset_s)
        s, lapsed = _advance(self.config, s, ev.at, off)
        s = _apply(s, ev)
        s, effects = _decide(self.config, s, ev.at, lapsed)
        self._s = s
        return effects

    def reasons(self, at: float | None = None) -> list[Reason]:
        """Why the car is not computing at `at` (default: the last event), without changing
        anything. Empty when it computes (or will at the next event)."""
        s = self._s
        if s.at is None:
            return [Reason("no_state", "no vehicle state observed yet")]
        at = s.at if at is None else at
        if not _is_number(at) or at < s.at:
            raise PolicyUsageError(f"can't report status at={at!r} when state={s.name}: "
                                   f"before the last event at={s.at!r}")
        s, _ = _advance(self.config, s, at, s.utc_offset_s)
        fails = _failures(self.config, s, at)
        since, held = _holding(self.config, s, fails, at)
        if since is not None and not held:
            until = since + self.config.resume_after_s
            fails.append(Reason("holding", f"waiting {_dur(until - at)} more for conditions "
                                           "to hold", until))
        return fails

    def status(self, at: float | None = None) -> list[str]:
        """Lines for `node status`: what the car does and why, and when that may change."""
        cfg, s = self.config, self._s
        reasons = self.reasons(at)
        lines: list[str] = []
        if not reasons:
            lines.append(f"computing: {cfg.max_threads} threads, "
                         f"{cfg.cpu_share * 100:g}% CPU share" if s.computing else
                         "conditions hold: computing starts at the next event")
        else:
            lines.append("not computing" if not s.computing else
                         "computing, stopping at the next event")
            lines += [r.text for r in reasons]
        if s.finishing:
            lines.append("the running shard may finish before the node stops")
        if s.at is not None:
            view, _ = _advance(cfg, s, s.at if at is None else at, s.utc_offset_s)
            budget = ("no budget" if cfg.daily_energy_budget_wh is None else
                      f"{view.energy_wh:.0f}/{cfg.daily_energy_budget_wh:g} Wh")
            cap = ("no cap" if cfg.daily_transfer_cap_mb is None else
                   f"{view.transfer_bytes / MB:.1f}/{cfg.daily_transfer_cap_mb:g} MB")
            lines.append(f"today: energy {budget}, transfer {cap}")
        return lines


__all__ = [
    "Policy", "PolicyConfig", "PolicyState", "PolicyUsageError", "PolicyConfigError",
    "VehicleState", "Window", "Reason", "NETWORKS", "CONDITION_CODES", "VEHICLE_CODES",
    "VEHICLE_FIELD_CHECKS", "REQUIRED_VEHICLE_FIELDS", "vehicle_field_problem",
    "hand_back_reason", "StateObserved", "StateUnavailable", "Tick", "EnergyUsed", "BytesTransferred",
    "PauseRequested", "ResumeRequested", "StopAfterCurrent", "EVENTS", "StartComputing",
    "StopComputing", "JoinMesh", "LeaveMesh", "WakeAt",
]
