"""What one OCPP charge point has told the node, and what that says about the car.

A plain state machine, no I/O and no clock of its own: the server (`server.py`) calls one
method per message it received, with `now` (Unix seconds), under the provider's lock; the
provider (`provider.py`) asks `view(now)` what the charger says about the car.

Statuses (1.6 StatusNotification, per connector; connector 0 is the charge point as a
whole; OCPP 2.0.1 is mapped onto them: its StatusNotification says Occupied (a car is
plugged in: Preparing until a TransactionEvent's chargingState says more), and
TransactionEvent's chargingState Charging, EVConnected (Preparing), SuspendedEV or
SuspendedEVSE; an EVSE id stands for the connector id):

    Available, Reserved             no car: unplugged
    Preparing, Finishing            a car is plugged in, not drawing
    Charging, SuspendedEVSE         plugged in; its battery takes (or would take) energy
    SuspendedEV                     plugged in and the car itself stopped drawing: it is
                                    full, at its own charge limit
    Faulted, Unavailable            the charger cannot tell: no state (a problem line)

State of charge: the latest `SoC` sampled value since the car was plugged in. A charger
that sends none (most AC wallboxes) leaves it unknown; a car in SuspendedEV then counts as
at its charge limit (it stopped drawing there), otherwise as 0 % (so it does not compute
until it is known to be charged: the policy's battery floor).

Metered energy (specs/vehicle-providers.md, "OCPP"): `full_wh` counts the energy register's
increase between consecutive readings of one transaction taken while the car was in
SuspendedEV. The battery takes nothing then, so what the car draws from the wall runs its
own loads, the node's computer among them (and the charger's losses). Only this counter is
reported as `VehicleState.charger_energy_wh`, and only while the car is in SuspendedEV:
never the meter of the whole charging session.

Anything impossible (a negative or backwards energy register, a state of charge outside
0..100, a negative or absurd power, an unknown status) is a violation: the charger is not
trusted for anything for `violation_hold_s` after its last one. A value is never clamped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

PLUGGED = frozenset({"Preparing", "Charging", "SuspendedEV", "SuspendedEVSE", "Finishing"})
UNPLUGGED = frozenset({"Available", "Reserved"})
BROKEN = frozenset({"Faulted", "Unavailable"})
STATUSES = PLUGGED | UNPLUGGED | BROKEN
# OCPP 2.0.1: StatusNotification's connectorStatus, and TransactionEvent's chargingState as
# the 1.6 status it means (Idle says nothing about the plug: None, no change)
CONNECTOR_STATUSES = frozenset({"Available", "Occupied", "Reserved", "Unavailable", "Faulted"})
CHARGING_STATES = {"Charging": "Charging", "EVConnected": "Preparing",
                   "SuspendedEV": "SuspendedEV", "SuspendedEVSE": "SuspendedEVSE",
                   "Idle": None}
MAX_POWER_W = 1_000_000.0      # no charger delivers a megawatt to a car
MAX_REGISTER_WH = 1e12         # a terawatt-hour register is a lie
MAX_CONNECTORS = 8             # more connector ids than this from one charger: refused
ENERGY_UNITS = {"Wh": 1.0, "kWh": 1000.0}
POWER_UNITS = {"W": 1.0, "kW": 1000.0}


class ChargerViolation(ValueError):
    """The charger sent something impossible; the message says what, for the status line."""


class OcppServerError(Exception):
    """The central system cannot start (e.g. the address is taken); names the address.
    Here, not in server.py, so the node can catch it without loading the `ocpp` package."""


@dataclass
class Connector:
    status: str = "Available"
    error_code: str = "NoError"
    transaction_id: int | str | None = None  # 1.6: ours (int); 2.0.1: the charger's
    register_wh: float | None = None        # last energy register reading this transaction
    register_full: bool = False             # that reading was taken in SuspendedEV
    soc_pct: float | None = None            # since plugged in
    power_w: float | None = None
    full_wh: float = 0.0                    # see the module docstring
    changed_at: float = 0.0


@dataclass(frozen=True)
class ChargerView:
    """What a charger says about the car now. `problem` set: it cannot be trusted now."""

    plugged_in: bool
    status: str
    soc_pct: float | None
    full: bool                      # SuspendedEV: the car stopped drawing at its limit
    power_w: float | None
    full_wh: float                  # the charger's whole full-car counter (all connectors)
    changed_at: float
    problem: str | None = None


def _number(text: object, what: str) -> float:
    try:
        v = float(text)  # OCPP 1.6 sends sampled values as strings
    except (TypeError, ValueError):
        raise ChargerViolation(f"impossible value: {what} {text!r} is not a number") from None
    if not math.isfinite(v):
        raise ChargerViolation(f"impossible value: {what} {text!r}")
    return v


@dataclass
class ChargerTracker:
    """One configured charge point id. Methods raise ChargerViolation for impossible input
    (after recording it); a rejected message changes nothing else."""

    cp_id: str
    silent_after_s: float = 180.0
    violation_hold_s: float = 900.0
    connected: bool = False
    connected_at: float | None = None
    disconnected_at: float | None = None
    last_heard: float | None = None
    vendor: str = ""
    model: str = ""
    violation: str | None = None
    violation_at: float | None = None
    connectors: dict[int, Connector] = field(default_factory=dict)
    whole: str = "Available"                # connector 0's status

    # --- connection -----------------------------------------------------------------------
    def on_connect(self, now: float) -> None:
        self.connected, self.connected_at, self.last_heard = True, now, now

    def on_disconnect(self, now: float) -> None:
        self.connected, self.disconnected_at = False, now

    def heard(self, now: float) -> None:
        self.last_heard = now

    def violated(self, now: float, text: str) -> None:
        self.violation, self.violation_at = text[:200], now

    def _refuse(self, now: float, text: str) -> ChargerViolation:
        self.violated(now, text)
        return ChargerViolation(text)

    def _connector(self, now: float, connector_id: object) -> Connector:
        if not isinstance(connector_id, int) or isinstance(connector_id, bool) or not (
                1 <= connector_id <= MAX_CONNECTORS):
            raise self._refuse(now, f"impossible value: connector id {connector_id!r} "
                                    f"(this node takes 1..{MAX_CONNECTORS})")
        if connector_id not in self.connectors:
            self.connectors[connector_id] = Connector(changed_at=now)
        return self.connectors[connector_id]

    # --- messages -------------------------------------------------------------------------
    def boot(self, now: float, vendor: str, model: str) -> None:
        self.heard(now)
        self.vendor, self.model = vendor[:50], model[:50]

    def status(self, now: float, connector_id: int, status: str, error_code: str) -> None:
        self.heard(now)
        if status not in STATUSES:
            raise self._refuse(now, f"impossible value: status {status!r}")
        if connector_id == 0:
            self.whole = status
            return
        c = self._connector(now, connector_id)
        if status in UNPLUGGED:  # the car left: forget what it said
            c.soc_pct, c.power_w, c.transaction_id, c.register_wh = None, None, None, None
        self._set_status(c, now, status, str(error_code)[:40])

    def start_transaction(self, now: float, connector_id: int, meter_start_wh: object,
                          transaction_id: int) -> None:
        self.heard(now)
        c = self._connector(now, connector_id)
        wh = self._register(now, meter_start_wh, "meterStart Wh")
        c.transaction_id, c.register_wh, c.register_full = transaction_id, wh, False

    def stop_transaction(self, now: float, transaction_id: object, meter_stop_wh: object) -> None:
        self.heard(now)
        wh = self._register(now, meter_stop_wh, "meterStop Wh")
        for c in self.connectors.values():
            if c.transaction_id == transaction_id and transaction_id is not None:
                if c.register_wh is not None and wh < c.register_wh:
                    raise self._refuse(now, f"impossible value: meterStop {wh:g} Wh is below "
                                            f"the last reading {c.register_wh:g} Wh")
                c.transaction_id, c.register_wh, c.register_full = None, None, False

    def meter_values(self, now: float, connector_id: int, transaction_id: object,
                     samples: list[dict]) -> None:
        """`samples`: the sampled values of every meterValue, each a dict with value,
        measurand, unit (1.6) or unit_of_measure (2.0.1), phase (OCPP names in snake case).
        Checked whole before applying."""
        self.heard(now)
        if connector_id == 0:
            return  # the charge point's own main meter: not the car
        c = self._connector(now, connector_id)
        readings = self._parse_samples(now, samples)
        self._check_register(now, c, transaction_id, readings[0])
        self._apply_samples(c, transaction_id, *readings)

    def transaction_event(self, now: float, evse_id: int, event_type: str, transaction_id: str,
                          charging_state: str | None, samples: list[dict]) -> None:
        """OCPP 2.0.1 TransactionEvent: a transaction starts, changes state or ends."""
        self.heard(now)
        if event_type not in ("Started", "Updated", "Ended"):
            raise self._refuse(now, f"impossible value: eventType {event_type!r}")
        if charging_state is not None and charging_state not in CHARGING_STATES:
            raise self._refuse(now, f"impossible value: chargingState {charging_state!r}")
        c = self._connector(now, evse_id)
        readings = self._parse_samples(now, samples)
        if event_type != "Started":
            self._check_register(now, c, transaction_id, readings[0])
        # accepted: apply
        if event_type == "Started" or c.transaction_id != transaction_id:
            c.transaction_id, c.register_wh, c.register_full = transaction_id, None, False
        status = CHARGING_STATES.get(charging_state) if charging_state else None
        if status is not None:
            self._set_status(c, now, status, "NoError")
        self._apply_samples(c, transaction_id, *readings)
        if event_type == "Ended":
            c.transaction_id, c.register_wh, c.register_full = None, None, False
            if c.status in PLUGGED and c.status != "Finishing":
                self._set_status(c, now, "Finishing", "NoError")

    def connector_status(self, now: float, evse_id: int, connector_status: str) -> None:
        """OCPP 2.0.1 StatusNotification: Occupied says a car is plugged in, not what it
        does (TransactionEvent's chargingState says that)."""
        self.heard(now)
        if connector_status not in CONNECTOR_STATUSES:
            raise self._refuse(now, f"impossible value: connectorStatus {connector_status!r}")
        if evse_id == 0:
            self.whole = "Available" if connector_status == "Occupied" else connector_status
            return
        c = self._connector(now, evse_id)
        if connector_status == "Occupied":
            if c.status not in PLUGGED:
                self._set_status(c, now, "Preparing", "NoError")
            return
        if connector_status in UNPLUGGED:
            c.soc_pct, c.power_w, c.transaction_id, c.register_wh = None, None, None, None
        self._set_status(c, now, connector_status, "NoError")

    def _set_status(self, c: Connector, now: float, status: str, error_code: str) -> None:
        if status != c.status:
            c.changed_at = now
        c.status, c.error_code = status, error_code
        if status != "SuspendedEV":
            c.register_full = False

    def _parse_samples(self, now: float, samples: list[dict]
                       ) -> tuple[float | None, float | None, float | None]:
        """(energy register Wh, SoC %, power W) of the phase-less samples; raises on any
        impossible one."""
        register = soc = power = None
        for s in samples:
            if not isinstance(s, dict):
                raise self._refuse(now, "impossible value: a sampled value is not an object")
            if s.get("phase"):
                continue  # per-phase values: the totals carry what the policy needs
            measurand = s.get("measurand") or "Energy.Active.Import.Register"
            uom = s.get("unit_of_measure") if isinstance(s.get("unit_of_measure"), dict) else {}
            unit = s.get("unit") or uom.get("unit")
            multiplier = uom.get("multiplier", 0)
            if not isinstance(multiplier, int) or not -3 <= multiplier <= 3:
                raise self._refuse(now, f"impossible value: multiplier {multiplier!r}")
            value = s.get("value")
            if measurand == "Energy.Active.Import.Register":
                scale = ENERGY_UNITS.get(unit or "Wh")
                if scale is None:
                    raise self._refuse(now, f"impossible value: energy in {unit!r}")
                register = self._register(now, _checked(self, now, value, "energy register")
                                          * scale * 10.0 ** multiplier, "energy register Wh")
            elif measurand == "Power.Active.Import":
                scale = POWER_UNITS.get(unit or "W")
                if scale is None:
                    raise self._refuse(now, f"impossible value: power in {unit!r}")
                power = _checked(self, now, value, "power W") * scale * 10.0 ** multiplier
                if not 0 <= power <= MAX_POWER_W:
                    raise self._refuse(now, f"impossible value: power {power:g} W")
            elif measurand == "SoC":
                soc = _checked(self, now, value, "SoC %")
                if not 0 <= soc <= 100:
                    raise self._refuse(now, f"impossible value: SoC {soc:g} %")
        return register, soc, power

    def _check_register(self, now: float, c: Connector, transaction_id: object,
                        register: float | None) -> None:
        if register is not None and c.register_wh is not None and (
                transaction_id is None or transaction_id == c.transaction_id) \
                and register < c.register_wh:
            raise self._refuse(now, f"impossible value: energy register went back from "
                                    f"{c.register_wh:g} to {register:g} Wh")

    @staticmethod
    def _apply_samples(c: Connector, transaction_id: object, register: float | None,
                       soc: float | None, power: float | None) -> None:
        if register is not None and (transaction_id is None or transaction_id == c.transaction_id):
            full = c.status == "SuspendedEV"
            if full and c.register_full and c.register_wh is not None:
                c.full_wh += register - c.register_wh
            c.register_wh, c.register_full = register, full
        if soc is not None:
            c.soc_pct = soc
        if power is not None:
            c.power_w = power

    def _register(self, now: float, value: object, what: str) -> float:
        wh = value if isinstance(value, float) else _checked(self, now, value, what)
        if not 0 <= wh <= MAX_REGISTER_WH:
            raise self._refuse(now, f"impossible value: {what} {wh:g}")
        return wh

    # --- what it says ---------------------------------------------------------------------
    def problem(self, now: float) -> str | None:
        """Why this charger cannot be trusted now, or None."""
        if self.violation_at is not None and now - self.violation_at < self.violation_hold_s:
            return f"charger {self.cp_id}: {self.violation}"
        if not self.connected:
            if self.disconnected_at is None:
                return f"charger {self.cp_id} has not connected yet"
            return (f"charger {self.cp_id} disconnected {_secs(now - self.disconnected_at)} "
                    "ago")
        if self.last_heard is not None and now - self.last_heard > self.silent_after_s:
            return f"charger {self.cp_id} silent for {_secs(now - self.last_heard)}"
        if self.whole in BROKEN:
            return f"charger {self.cp_id} reports {self.whole}"
        return None

    def view(self, now: float) -> ChargerView:
        """The connector with a car, or the most recently changed one."""
        full_wh = sum(c.full_wh for c in self.connectors.values())
        problem = self.problem(now)
        plugged = [c for c in self.connectors.values() if c.status in PLUGGED]
        broken = [c for c in self.connectors.values() if c.status in BROKEN]
        if problem is None and broken and not plugged:
            c = max(broken, key=lambda c: c.changed_at)
            problem = f"charger {self.cp_id} reports {c.status} ({c.error_code})"
        if not plugged:
            return ChargerView(False, "Available", None, False, None, full_wh,
                               max((c.changed_at for c in self.connectors.values()),
                                   default=0.0), problem)
        c = max(plugged, key=lambda c: c.changed_at)
        return ChargerView(True, c.status, c.soc_pct, c.status == "SuspendedEV", c.power_w,
                           full_wh, c.changed_at, problem)


def _checked(t: ChargerTracker, now: float, value: object, what: str) -> float:
    try:
        return _number(value, what)
    except ChargerViolation as e:
        t.violated(now, str(e))
        raise


def _secs(s: float) -> str:
    return f"{max(0, int(s))} s"


__all__ = ["ChargerTracker", "ChargerView", "ChargerViolation", "OcppServerError", "Connector",
           "STATUSES", "PLUGGED", "UNPLUGGED", "BROKEN"]
