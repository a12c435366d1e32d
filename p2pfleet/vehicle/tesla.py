"""A vehicle-API provider: a Tesla's charge, drive and climate state from the Tesla Fleet
API (specs/vehicle-providers.md, section 5).

Why not the `tesla-fleet-api` package: it is maintained (Teslemetry, used by Home
Assistant), but it is built on aiohttp, so under trio it would need its own asyncio loop in
a thread, and it pulls in aiohttp, aiofiles, aiolimiter, protobuf, cryptography and bleak
(Bluetooth) for what is, here, two documented GET requests. This module talks the Fleet
API's documented JSON over HTTPS with httpx (which runs on trio), under the node's size and
time limits.

Polling, gently (a car kept awake by polling drains its battery):

- every `poll_s` (default 60 s) it asks `GET /api/1/vehicles/{vehicle}`, which answers the
  car's `state` (online, asleep, offline) without waking it;
- only an `online` car is read (`GET .../vehicle_data`); never `wake_up`. While the last
  reading was charging or driving (the car is awake anyway) every poll; while it was idle,
  at most every `idle_poll_s` (default 1800 s), so the car gets the quiet time it needs to
  fall asleep (about 15 minutes without data requests). Between reads the last reading
  holds: an unplug or a drive away is seen at the next read, up to `idle_poll_s` late;
- an asleep car keeps its last reading for up to `asleep_max_age_s` (default 12 h): a car
  cannot be driven or unplugged without waking, so a parked, plugged-in car that fell
  asleep is still parked and plugged in. Never read since the node started: no state;
- offline (no connectivity), HTTP 401/403 (token expired or revoked), 5xx, 429 (with
  back-off), a timeout, an answer that is not the documented shape, or impossible values
  (battery level 140 %, negative charger power): no state, and the status says which.

Mapping to `VehicleState`: parked = shift state P or none and not moving; plugged in =
charging state other than Disconnected; soc = battery_level; charge limit =
charge_limit_soc; cabin temperature = inside_temp; departure = scheduled_departure_time
when scheduled departure or off-peak charging is on. Charger power, energy added and the
outside temperature are checked and shown in the status, but not used by the policy: energy
added is the car's charging meter, never the node computer's (vehicle-policy.md, section 6).
Network and metering are the node's own (`[vehicle]` settings).

The access token is read from `token_file` before every request (so a separate refresher
may replace it); the file must be private (mode 0600), like the node key.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from .generic import MAX_JSON_BYTES, HttpStatusError, finite, get_capped
from .live import PolledProvider, ProviderError, Unavailable
from .state import VehicleState, VehicleStateError, state_from_mapping

CHARGING_STATES = ("Charging", "Complete", "Disconnected", "Stopped", "Starting", "NoPower")
SHIFT_STATES = (None, "P", "D", "R", "N")
DATA_ENDPOINTS = "charge_state;climate_state;drive_state"
MAX_TOKEN_BYTES = 8192


class TokenFileError(ProviderError):
    """The token file is missing, not private, or empty."""


def read_token(path: Path) -> str:
    """The access token in `path`, refusing a file others can read or change."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        raise TokenFileError(f"vehicle-api: token file {path} does not exist") from None
    except OSError as exc:
        raise TokenFileError(f"vehicle-api: token file {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise TokenFileError(f"vehicle-api: token file {path} has mode {mode:04o}: others can "
                             f"read or change it; run 'chmod 600 {path}'")
    with open(path, "rb") as f:
        data = f.read(MAX_TOKEN_BYTES + 1)
    token = data.decode("ascii", "replace").strip()
    if not token or len(data) > MAX_TOKEN_BYTES or any(c.isspace() for c in token):
        raise TokenFileError(f"vehicle-api: token file {path} must hold one token "
                             f"(no spaces, at most {MAX_TOKEN_BYTES} bytes)")
    return token


def save_token(path: Path, token: str) -> None:
    """Write a token file with mode 0600 from the first byte."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(token.strip() + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _field(obj: Mapping[str, Any], section: str, key: str, *, required: bool = True) -> Any:
    if key not in obj or obj[key] is None:
        if required:
            raise ProviderError(f"vehicle-api: {section}.{key} missing")
        return None
    return obj[key]


def _number(obj: Mapping[str, Any], section: str, key: str, lo: float, hi: float, *,
            required: bool = True) -> float | None:
    v = _field(obj, section, key, required=required)
    if v is None:
        return None
    if not finite(v):
        raise ProviderError(f"vehicle-api: {section}.{key} is not a number: {v!r}"[:200])
    if not lo <= v <= hi:
        raise ProviderError(f"vehicle-api: impossible value: {section}.{key} is {v:g}, "
                            f"outside {lo:g}..{hi:g}")
    return float(v)


def _section(resp: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    sec = resp.get(name)
    if not isinstance(sec, dict):
        raise ProviderError(f"vehicle-api: vehicle_data has no {name} object")
    return sec


def state_from_vehicle_data(body: Any, defaults: Mapping[str, Any]) -> tuple[VehicleState, str, str]:
    """(state, activity, detail) from a `vehicle_data` answer; activity is charging,
    driving or idle. Raises ProviderError naming the field for anything impossible."""
    resp = body.get("response") if isinstance(body, dict) else None
    if not isinstance(resp, dict):
        raise ProviderError("vehicle-api: vehicle_data answer has no 'response' object")
    charge = _section(resp, "charge_state")
    drive = _section(resp, "drive_state")
    climate = _section(resp, "climate_state")
    level = _number(charge, "charge_state", "battery_level", 0, 100)
    limit = _number(charge, "charge_state", "charge_limit_soc", 1, 100)
    cstate = _field(charge, "charge_state", "charging_state")
    if cstate not in CHARGING_STATES:
        raise ProviderError(f"vehicle-api: charge_state.charging_state {str(cstate)[:40]!r} is "
                            f"not one of {', '.join(CHARGING_STATES)}")
    power_kw = _number(charge, "charge_state", "charger_power", 0, 1000, required=False) or 0.0
    added = _number(charge, "charge_state", "charge_energy_added", 0, 1000, required=False)
    shift = drive.get("shift_state")
    if shift not in SHIFT_STATES:
        raise ProviderError(f"vehicle-api: drive_state.shift_state {str(shift)[:40]!r} is not "
                            "one of P, D, R, N or null")
    speed = _number(drive, "drive_state", "speed", 0, 400, required=False) or 0.0
    inside = _number(climate, "climate_state", "inside_temp", -60, 90, required=False)
    outside = _number(climate, "climate_state", "outside_temp", -60, 70, required=False)
    departure = None
    if charge.get("preconditioning_enabled") is True or charge.get("off_peak_charging_enabled") is True:
        departure = _number(charge, "charge_state", "scheduled_departure_time", 1, 1e11,
                            required=False)
    parked = shift in (None, "P") and speed == 0
    values = {**defaults, "parked": parked, "plugged_in": cstate != "Disconnected",
              "soc_pct": level, "charge_limit_pct": limit, "cabin_temp_c": inside,
              "departure_at": departure}
    try:
        state = state_from_mapping(values, "vehicle-api")
    except VehicleStateError as exc:
        raise ProviderError(str(exc)) from None
    if not parked:
        activity, detail = "driving", f"driving, shift {shift or '?'}"
    elif cstate in ("Charging", "Starting"):
        activity, detail = "charging", f"charging {power_kw:g} kW"
    else:
        activity = "idle"
        detail = {"Complete": "charge complete", "Disconnected": "unplugged",
                  "Stopped": "plugged in, not charging", "NoPower": "plugged in, no power"}[cstate]
    detail += f", battery {level:g}%/{limit:g}%"
    if added is not None:
        detail += f", +{added:g} kWh"
    if outside is not None:
        detail += f", outside {outside:g} C"
    return state, activity, detail


class FleetApiProvider(PolledProvider):
    """Polls the Tesla Fleet API for one vehicle (module docstring)."""

    name = "vehicle-api"

    def __init__(self, base_url: str, vehicle: str, token_file: str | Path, *,
                 poll_s: float = 60.0, idle_poll_s: float = 1800.0,
                 asleep_max_age_s: float = 43200.0, timeout_s: float = 20.0,
                 defaults: Mapping[str, Any] | None = None, max_bytes: int = MAX_JSON_BYTES,
                 clock: Any = None):
        super().__init__(interval_s=poll_s, timeout_s=timeout_s)
        url = httpx.URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"vehicle-api: base_url {base_url!r} must be https://<host>")
        if not vehicle or "/" in vehicle:
            raise ValueError(f"vehicle-api: vehicle must be a VIN or vehicle id, got {vehicle!r}")
        self.base_url = base_url.rstrip("/")
        self.vehicle = vehicle
        self.token_file = Path(token_file)
        self.idle_poll_s = float(idle_poll_s)
        self.asleep_max_age_s = float(asleep_max_age_s)
        self.max_bytes = max_bytes
        self.defaults = dict(defaults or {})
        self._clock = clock or self.wall
        self._data: VehicleState | None = None  # the last vehicle_data reading
        self._data_at: float | None = None
        self._activity = ""
        self._detail = ""
        self._retry_after: float | None = None
        self.car_state = "unknown"
        self.data_reads = 0

    def _url(self, tail: str = "") -> str:
        return f"{self.base_url}/api/1/vehicles/{quote(self.vehicle, safe='')}{tail}"

    async def _get(self, url: str) -> Any:
        headers = {"Authorization": f"Bearer {read_token(self.token_file)}"}
        try:
            body = await get_capped(url, self.max_bytes, "vehicle-api", headers=headers,
                                    ok=(200,))
        except HttpStatusError as exc:
            if exc.status in (401, 403):
                raise ProviderError(f"{exc}: the access token in {self.token_file} was "
                                    "refused (expired or revoked); renew it") from None
            if exc.status == 408:
                raise Unavailable("vehicle-api: car unavailable (asleep or offline); "
                                  "not waking it") from None
            if exc.status == 429:
                self._retry_after = max(self.interval_s * 4, 300.0)
            raise
        try:
            return json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ProviderError(f"vehicle-api: answer is not JSON: {exc}"[:200]) from None

    async def read(self) -> VehicleState:
        body = await self._get(self._url())
        resp = body.get("response") if isinstance(body, dict) else None
        state = resp.get("state") if isinstance(resp, dict) else None
        if state not in ("online", "asleep", "offline"):
            raise ProviderError(f"vehicle-api: vehicle state {str(state)[:40]!r} is not "
                                "online, asleep or offline")
        self.car_state = state
        now = self._clock()
        if state == "online":
            due = (self._data is None or self._activity != "idle"
                   or now - (self._data_at or 0) >= self.idle_poll_s)
            if due:
                data = await self._get(self._url(f"/vehicle_data?endpoints={quote(DATA_ENDPOINTS)}"))
                self._data, self._activity, self._detail = state_from_vehicle_data(data, self.defaults)
                self._data_at = now
                self.data_reads += 1
            return self._data
        if state == "offline":
            raise Unavailable("vehicle-api: car offline (no connection to Tesla)")
        if self._data is None or now - (self._data_at or 0) >= self.asleep_max_age_s:
            raise Unavailable("vehicle-api: car asleep and not read recently; not waking it")
        if not self._data.parked:
            raise Unavailable("vehicle-api: car asleep after its last reading said driving")
        return self._data

    def _fail(self, why: str) -> None:
        super()._fail(why)
        self._data, self._data_at = None, None  # a failed or lying car is read afresh

    def next_delay(self) -> float:
        if self._retry_after is not None:
            delay, self._retry_after = self._retry_after, None
            return max(delay, super().next_delay())
        return super().next_delay()

    def describe(self) -> str:
        if self.car_state == "asleep" and self._data_at is not None:
            age = (self._clock() - self._data_at) / 60
            return f"asleep, not woken; last read {age:.0f} min ago: {self._detail}"
        return self._detail


__all__ = ["FleetApiProvider", "state_from_vehicle_data", "read_token", "save_token",
           "TokenFileError", "CHARGING_STATES"]
