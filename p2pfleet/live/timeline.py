"""The battery and plug timeline the owner's dashboard draws: a bounded list of what the
vehicle provider said, kept by the running node (it is not persisted; a restart starts a
new timeline).

A point is kept when the plug or parked state changes, when the charge moved by a percent
or more, or when `every_s` passed since the last kept point; the oldest points go first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MAX_POINTS = 600
EVERY_S = 300.0


@dataclass
class VehicleTimeline:
    """Points [t, soc_pct, plugged_in, parked] in time order, `max_points` at most."""

    max_points: int = MAX_POINTS
    every_s: float = EVERY_S
    points: list[list[Any]] = field(default_factory=list)

    def note(self, at: float, soc_pct: float, plugged_in: bool, parked: bool) -> None:
        point = [round(at, 1), round(float(soc_pct), 1), bool(plugged_in), bool(parked)]
        if self.points:
            t, soc, plugged, was_parked = self.points[-1]
            if (at < t or (plugged == point[2] and was_parked == point[3]
                           and abs(soc - point[1]) < 1.0 and at - t < self.every_s)):
                return
        self.points.append(point)
        del self.points[:-self.max_points]
