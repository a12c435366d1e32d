"""How much energy did the node's computing use? Pure arithmetic, no I/O.

Two methods, best first:

1. Metered. Where the car or the charger meters the energy the node's computer draws, the
   provider reports it as `VehicleState.charger_energy_wh`, a cumulative counter. Energy
   over an interval is the counter's increase. Exact to the meter (and it includes the
   charger's and converter's losses, which the owner pays for). A counter that goes down
   was reset (a new charging session, a looping trace): that interval falls back to the
   estimate and the new reading becomes the baseline. A provider must not report the
   car's whole charging meter here: charging the battery is not computing.

2. Estimated: wh = power_w * cpu_share * busy_s / 3600, with busy_s the seconds the
   sandbox was running shards and power_w the computer's draw at full load (PolicyConfig,
   60 W by default: a car's infotainment or driving computer draws roughly 20-100 W under
   load). It ignores idle draw while in the mesh, frequency scaling, the DC-DC converter and
   the charger's losses (10-15 %), and assumes draw grows linearly with CPU share: good to
   about a factor of two. Ledgers mark which method produced each figure.

The node calls `account()` once per interval (e.g. per state poll or per finished shard),
sends the result to the policy as `EnergyUsed(at, wh)` and writes it to the ledger.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def estimate_wh(power_w: float, cpu_share: float, busy_s: float) -> float:
    """Estimated energy of `busy_s` seconds of computing at `cpu_share` of a `power_w` machine."""
    for name, v in (("power_w", power_w), ("cpu_share", cpu_share), ("busy_s", busy_s)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise ValueError(f"estimate_wh: {name} must be a finite number >= 0, got {v!r}")
    return power_w * cpu_share * busy_s / 3600.0


@dataclass(frozen=True)
class EnergySample:
    wh: float                  # energy used in the interval
    metered: bool              # True: from the meter; False: estimated
    baseline_wh: float | None  # meter reading to pass as `meter_before` next time


def account(busy_s: float, *, power_w: float, cpu_share: float,
            meter_before: float | None, meter_after: float | None,
            min_share_of_estimate: float = 0.0) -> EnergySample:
    """Energy of one interval: the meter's increase if both readings exist, it did not go
    down and it is at least `min_share_of_estimate` times the estimate; else the estimate
    from busy seconds.

    `min_share_of_estimate` is for a meter on the wall side of the car (a charger's,
    specs/vehicle-providers.md, OCPP): while the car is full it sees the car's own draw,
    the computer's among it, but a car may also run its loads from the battery, which that
    meter never sees. An increase below half the estimate (the estimate's own accuracy)
    says so, and then the estimate is used; 0 (a meter of the computer itself) trusts any
    increase."""
    estimate = estimate_wh(power_w, cpu_share, busy_s)
    if meter_before is not None and meter_after is not None and meter_after >= meter_before \
            and meter_after - meter_before >= min_share_of_estimate * estimate:
        return EnergySample(float(meter_after - meter_before), True, meter_after)
    return EnergySample(estimate, False, meter_after)


__all__ = ["estimate_wh", "account", "EnergySample"]
