"""The Linux power_supply class as a vehicle state provider: for a laptop or a home box that
runs the node itself (specs/vehicle-providers.md, section 4).

Under the sysfs root (default /sys/class/power_supply; tests pass a directory they build)
each supply is a directory with a `type` file:

- `Mains`, `USB`, `Wireless`: `online` 1 or 0. Plugged in = any of them online.
- `Battery` (skipped when `scope` is `Device`: a mouse's battery is not ours): `capacity`
  (0..100 %), `status` (Charging, Discharging, Full, Not charging, Unknown), optional `temp`
  (tenths of a degree C) and `charge_control_end_threshold` (the charge limit, %).

State: always parked; plugged in as above (a box with no battery and no mains supply listed
counts as plugged in: it runs from the wall); state of charge the lowest battery's capacity
(100 with no battery); charge limit the lowest end threshold (100 if none); battery
temperature the hottest battery's; network and metered from the node's `[vehicle]` settings.
A file with a value out of range (capacity 140, online 2) fails the read, naming the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import trio

from .live import PolledProvider, ProviderError
from .state import VehicleState, VehicleStateError, state_from_mapping

DEFAULT_ROOT = "/sys/class/power_supply"
_EXTERNAL = ("Mains", "USB", "Wireless")
_STATUSES = ("Charging", "Discharging", "Full", "Not charging", "Unknown")
_MAX_FILE = 256


def _read(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_FILE + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ProviderError(f"power_supply: {path}: {exc.strerror or exc}") from None
    if len(data) > _MAX_FILE:
        raise ProviderError(f"power_supply: {path}: longer than {_MAX_FILE} bytes")
    return data.decode("ascii", "replace").strip()


def _int(path: Path, lo: int, hi: int) -> int | None:
    text = _read(path)
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise ProviderError(f"power_supply: {path}: not an integer: {text[:40]!r}") from None
    if not lo <= value <= hi:
        raise ProviderError(f"power_supply: {path}: {value} is outside {lo}..{hi}")
    return value


def read_power_supply(root: Path, defaults: Mapping[str, Any]) -> tuple[VehicleState, str]:
    """The state and a short detail for the health line, from the sysfs tree at `root`."""
    try:
        supplies = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError as exc:
        raise ProviderError(f"power_supply: {root}: {exc.strerror or exc}") from None
    external: list[bool] = []
    capacities: list[int] = []
    limits: list[int] = []
    temps: list[float] = []
    statuses: list[str] = []
    for d in supplies:
        kind = _read(d / "type")
        if kind in _EXTERNAL:
            online = _int(d / "online", 0, 1)
            if online is None:
                raise ProviderError(f"power_supply: {d / 'online'}: missing")
            external.append(online == 1)
        elif kind == "Battery" and _read(d / "scope") != "Device":
            cap = _int(d / "capacity", 0, 100)
            if cap is None:
                raise ProviderError(f"power_supply: {d / 'capacity'}: missing")
            capacities.append(cap)
            status = _read(d / "status") or "Unknown"
            if status not in _STATUSES:
                raise ProviderError(f"power_supply: {d / 'status'}: unknown status {status[:40]!r}")
            statuses.append(status)
            limit = _int(d / "charge_control_end_threshold", 1, 100)
            if limit is not None:
                limits.append(limit)
            temp = _int(d / "temp", -600, 1500)
            if temp is not None:
                temps.append(temp / 10)
    charging = any(s in ("Charging", "Full", "Not charging") for s in statuses)
    plugged = any(external) if external else (charging or not capacities)
    values = {**defaults, "parked": True, "plugged_in": plugged,
              "soc_pct": float(min(capacities)) if capacities else 100.0,
              "charge_limit_pct": float(min(limits)) if limits else 100.0,
              "battery_temp_c": max(temps) if temps else None}
    try:
        state = state_from_mapping(values, f"power_supply {root}")
    except VehicleStateError as exc:
        raise ProviderError(str(exc)) from None
    power = "on mains" if plugged else "on battery"
    detail = power + (f", battery {min(capacities)}% {statuses[0].lower()}" if capacities else
                      ", no battery")
    return state, detail


class PowerSupplyProvider(PolledProvider):
    """Reads the power_supply class every `interval_s` (module docstring)."""

    name = "power_supply"

    def __init__(self, root: str | Path = DEFAULT_ROOT, *, interval_s: float = 10.0,
                 timeout_s: float = 5.0, defaults: Mapping[str, Any] | None = None,
                 max_age_s: float | None = None):
        super().__init__(interval_s=interval_s, timeout_s=timeout_s, max_age_s=max_age_s)
        self.root = Path(root)
        self.defaults = dict(defaults or {})
        self._detail = ""

    async def read(self) -> VehicleState:
        # sysfs battery reads can stall on slow firmware (ACPI): off the event loop
        state, self._detail = await trio.to_thread.run_sync(
            read_power_supply, self.root, self.defaults, abandon_on_cancel=True)
        return state

    def describe(self) -> str:
        return self._detail


__all__ = ["PowerSupplyProvider", "read_power_supply", "DEFAULT_ROOT"]
