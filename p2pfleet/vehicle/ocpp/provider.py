"""`OcppProvider`: the car's state as the owner's charger(s) report it over OCPP (1.6J or
2.0.1).

The node starts `run()` in its nursery: it starts the central system (`server.py`) in its
own thread and keeps it until cancelled. `state_at(now)` answers from the trackers, under
the lock the server thread writes them with; it never blocks on the network.

From the chargers to the car (specs/vehicle-providers.md, "OCPP"):

- A configured charger with a plugged-in connector and no problem says where the car is:
  parked and plugged in, its state of charge (see charger.py for when it is unknown) and,
  in SuspendedEV, the full-car energy counter as `charger_energy_wh`.
- Otherwise, if any configured charger has a problem (not connected yet, disconnected,
  silent, Faulted/Unavailable, an impossible value held against it), there is no state to
  trust: `state_at` returns None and `unavailable_why` says which charger and why; the
  node then feeds the policy `StateUnavailable`.
- Otherwise (every charger healthy, none with a car) the car is away: not parked, not
  plugged in.

What a charger cannot know comes from the node's `[vehicle]` settings: the network and
whether it is metered, the car's charge limit, a daily departure.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import trio

from ..state import VehicleState
from .charger import ChargerTracker, ChargerView


@dataclass(frozen=True)
class OcppSettings:
    """What the owner configures ([ocpp] in config.toml)."""

    charge_point_ids: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 9000
    password: str = ""              # HTTP Basic auth (security profiles 1, 2); "" = none
    security_profile: int = 1       # 1 ws + Basic auth, 2 wss + Basic auth, 3 wss + client cert
    tls_cert_file: str = ""         # profiles 2, 3: the node's certificate (PEM)
    tls_key_file: str = ""          # and its private key (PEM, 0600)
    client_ca_file: str = ""        # profile 3: the CA that signs the chargers' certificates
    heartbeat_s: int = 60           # asked of the charger in BootNotification
    silent_after_s: float = 180.0   # no message this long: no state
    violation_hold_s: float = 900.0  # an impossible value: no state this long

    def __post_init__(self) -> None:
        if not self.charge_point_ids:
            raise ValueError("ocpp.charge_point_ids: name at least one charge point id")
        for cp in self.charge_point_ids:
            if not isinstance(cp, str) or not 1 <= len(cp) <= 48 or "/" in cp \
                    or not cp.isprintable():
                raise ValueError(f"ocpp.charge_point_ids: {cp!r} is not a charge point id "
                                 "(1..48 printable characters, no '/')")
        if len(set(self.charge_point_ids)) != len(self.charge_point_ids):
            raise ValueError("ocpp.charge_point_ids: an id is listed twice")
        if self.security_profile not in (1, 2, 3):
            raise ValueError(f"ocpp.security_profile = {self.security_profile!r}: 1, 2 or 3")
        if self.security_profile >= 2 and not (self.tls_cert_file and self.tls_key_file):
            raise ValueError(f"ocpp.security_profile = {self.security_profile} (TLS) needs "
                             "ocpp.tls_cert_file and ocpp.tls_key_file")
        if self.security_profile == 3 and not self.client_ca_file:
            raise ValueError("ocpp.security_profile = 3 needs ocpp.client_ca_file (the CA "
                             "that signs your chargers' certificates)")
        if self.security_profile == 2 and not self.password:
            raise ValueError("ocpp.security_profile = 2 is TLS plus the charger's password: "
                             "set ocpp.password")
        if self.security_profile == 3 and self.password:
            raise ValueError("ocpp.security_profile = 3: the client certificate authenticates "
                             "the charger; ocpp.password is not used, leave it empty")
        if self.silent_after_s <= self.heartbeat_s:
            raise ValueError(f"ocpp.silent_after_s = {self.silent_after_s:g} must be above "
                             f"ocpp.heartbeat_s = {self.heartbeat_s} (a charger speaks at "
                             "least once per heartbeat)")


class OcppProvider:
    """A VehicleProvider fed by OCPP chargers. `base`: the state the charger cannot tell
    (network, metered, charge limit), as a StaticProvider-like `state_at(now)`."""

    name = "ocpp"
    # The charger meters the wall side of the car: a full car's draw, which includes the
    # computer's unless the car runs it from the battery. An increase under half the
    # estimate says it did, and the worker then estimates (core/energy.py account()).
    meter_min_share = 0.5

    def __init__(self, settings: OcppSettings, base: Any, *,
                 clock: Callable[[], float] = time.time):
        self.settings = settings
        self.base = base
        self.clock = clock
        self.lock = threading.Lock()
        self.trackers = {cp: ChargerTracker(cp, silent_after_s=settings.silent_after_s,
                                            violation_hold_s=settings.violation_hold_s)
                         for cp in settings.charge_point_ids}
        self.on_update: Callable[[], Any] | None = None  # the node's wake-up (trio side)
        self.bound: tuple[str, int] | None = None
        self.system: Any = None  # the CentralSystemThread while running
        self.ssl_context = None
        if settings.security_profile >= 2:  # read now: a bad file stops the node at start
            from .tls import server_context
            self.ssl_context = server_context(
                Path(settings.tls_cert_file).expanduser(),
                Path(settings.tls_key_file).expanduser(),
                Path(settings.client_ca_file).expanduser()
                if settings.security_profile == 3 else None)

    # --- the server's lifetime ------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        token = trio.lowlevel.current_trio_token()

        def changed() -> None:  # from the server thread
            if self.on_update is not None:
                try:
                    token.run_sync_soon(self.on_update)
                except trio.RunFinishedError:
                    pass

        from .server import CentralSystemThread  # loads the `ocpp` package only when used

        s = self.settings
        system = CentralSystemThread(self.trackers, self.lock, host=s.host, port=s.port,
                                     password=s.password, heartbeat_s=s.heartbeat_s,
                                     clock=self.clock, on_change=changed,
                                     ssl_context=self.ssl_context,
                                     client_certs=s.security_profile == 3)
        self.system = system
        self.bound = await trio.to_thread.run_sync(system.start)
        try:
            task_status.started(self.bound)
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(system.stop)

    # --- what the node asks ---------------------------------------------------------------
    def _views(self, now: float) -> list[ChargerView]:
        with self.lock:
            return [t.view(now) for t in self.trackers.values()]

    def _car(self, views: Sequence[ChargerView]) -> ChargerView | None:
        plugged = [v for v in views if v.plugged_in and v.problem is None]
        return max(plugged, key=lambda v: v.changed_at) if plugged else None

    def state_at(self, now: float) -> VehicleState | None:
        views = self._views(now)
        car = self._car(views)
        base = self.base.state_at(now)
        full_wh = sum(v.full_wh for v in views)
        if car is None:
            if any(v.problem for v in views):
                return None
            return replace(base, parked=False, plugged_in=False, charger_energy_wh=None)
        if car.soc_pct is not None:
            soc = car.soc_pct
        elif car.full:
            soc = base.charge_limit_pct  # it stopped drawing at its own limit
        else:
            soc = 0.0  # unknown: not trusted to be above any floor
        return replace(base, parked=True, plugged_in=True, soc_pct=soc,
                       charger_energy_wh=full_wh if car.full else None)

    def unavailable_why(self, now: float) -> str:
        problems = [v.problem for v in self._views(now) if v.problem]
        return "ocpp: " + ("; ".join(problems) if problems else "no state")

    def next_change_after(self, now: float) -> float | None:
        """When a silent charger crosses its limit (a change no message announces)."""
        with self.lock:
            heard = [t.last_heard for t in self.trackers.values()
                     if t.connected and t.last_heard is not None]
            held = [t.violation_at + t.violation_hold_s for t in self.trackers.values()
                    if t.violation_at is not None]
        times = [h + self.settings.silent_after_s + 0.001 for h in heard] + held
        times = [t for t in times if t > now]
        base_next = self.base.next_change_after(now)
        if base_next is not None:
            times.append(base_next)
        return min(times) if times else None

    def health(self, now: float) -> str:
        views = self._views(now)
        car = self._car(views)
        if car is None:
            problems = [v.problem for v in views if v.problem]
            if problems:
                return "ocpp: " + "; ".join(problems)
            return "ocpp: ok, no car at " + ", ".join(self.trackers)
        soc = "SoC unknown" if car.soc_pct is None else f"SoC {car.soc_pct:g} %"
        if car.soc_pct is None and car.full:
            soc = "SoC unknown, full"
        power = "" if car.power_w is None else f", {car.power_w:g} W"
        return f"ocpp: ok, {car.status} ({soc}{power})"


__all__ = ["OcppProvider", "OcppSettings"]
