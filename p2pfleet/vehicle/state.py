"""The vehicle state a provider reports, and strict reading of it from config or JSON.

`VehicleState` is defined in `p2pfleet.core.policy` (the core may import nothing from the
rest of p2pfleet, and the policy reads it) and re-exported here, where providers and the
node look for it. Fields, in short (the dataclass docstring has the detail):

    parked, plugged_in      bool
    soc_pct                 float 0..100, state of charge
    charge_limit_pct        float (0, 100], the car's own charge limit
    network                 "wifi" | "ethernet" | "cellular" | "none"
    metered                 bool | None (None: unknown, treated as metered)
    battery_temp_c          float | None
    cabin_temp_c            float | None
    departure_at            float | None, Unix seconds of the planned departure
    charger_energy_wh       float | None, cumulative energy meter of the node's computer
"""

from __future__ import annotations

from collections.abc import Mapping

from ..core.policy import (
    NETWORKS,
    REQUIRED_VEHICLE_FIELDS,
    VEHICLE_FIELD_CHECKS,
    VehicleState,
    vehicle_field_problem,
)

FIELDS = tuple(VEHICLE_FIELD_CHECKS)
OPTIONAL_FIELDS = tuple(f for f in FIELDS if f not in REQUIRED_VEHICLE_FIELDS)


class VehicleStateError(ValueError):
    """A vehicle state value is invalid; names where and which field."""

    def __init__(self, where: str, field: str, reason: str):
        self.where, self.field, self.reason = where, field, reason
        super().__init__(f"{where}: {field}: {reason}")


def state_from_mapping(values: Mapping[str, object], where: str = "vehicle state") -> VehicleState:
    """Build a VehicleState from a mapping (config table, JSON object): unknown keys,
    missing required fields and bad values are refused, naming the field."""
    for key in values:
        if key not in VEHICLE_FIELD_CHECKS:
            raise VehicleStateError(where, str(key), "unknown field")
    for key in REQUIRED_VEHICLE_FIELDS:
        if key not in values:
            raise VehicleStateError(where, key, "missing")
    for key, value in values.items():
        problem = vehicle_field_problem(key, value)
        if problem:
            raise VehicleStateError(where, key, problem)
    return VehicleState(**values)


__all__ = [
    "VehicleState", "VehicleStateError", "NETWORKS", "FIELDS", "REQUIRED_VEHICLE_FIELDS",
    "OPTIONAL_FIELDS", "state_from_mapping", "vehicle_field_problem",
]
