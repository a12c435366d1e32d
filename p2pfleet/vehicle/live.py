"""Live providers: vehicle state read in the background from a source the node does not
control (a car maker's API, a local program or endpoint, the kernel's power_supply class).

`PolledProvider.run()` is a trio task the node starts in its nursery. It calls `read()`
under a total deadline (a source that hangs or trickles bytes is cut off), keeps the last
good reading, and backs off after failures. `state_at(now)` answers from memory and never
blocks: the reading, or None when there is none to trust (never read, the last read failed,
the source lied, or the reading is older than `max_age_s`); `unavailable_why(now)` then
says why, and the node feeds the policy `StateUnavailable` (specs/vehicle-providers.md).
A failed read forgets the previous reading: a source that just failed or lied is not
trusted on the strength of an earlier answer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import trio

from ..core.policy import MAX_WHY_CHARS, StateObserved, StateUnavailable
from .state import VehicleState, VehicleStateError

MAX_BACKOFF_S = 600.0  # at most this long between retries of a failing source


class ProviderError(Exception):
    """A read failed; the message is the status text (names the source and what was wrong)."""


class Unavailable(ProviderError):
    """No state to trust, but nothing failed (a sleeping car never read): no back-off."""


class PolledProvider:
    """Base of the live providers. Subclasses implement `read()` and may override
    `next_delay()` (how long until the next read) and `describe()` (the health detail)."""

    name = "live"

    def __init__(self, *, interval_s: float, timeout_s: float, max_age_s: float | None = None,
                 wall: Callable[[], float] = time.time):
        for key, value in (("interval_s", interval_s), ("timeout_s", timeout_s)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{self.name}: {key} must be a number > 0, got {value!r}")
        self.interval_s = float(interval_s)
        self.timeout_s = float(timeout_s)
        self.max_age_s = max_age_s if max_age_s is not None else 3 * self.interval_s + self.timeout_s
        self.wall = wall
        self.on_update: Callable[[], Any] | None = None  # the node's wake-up
        self._state: VehicleState | None = None
        self._observed_at: float | None = None
        self._why = "not read yet"
        self.failures = 0  # consecutive
        self.reads = 0

    # -- for subclasses ----------------------------------------------------------------
    async def read(self) -> VehicleState:
        raise NotImplementedError

    def next_delay(self) -> float:
        """Seconds until the next read: the interval, doubled per consecutive failure."""
        if self.failures == 0:
            return self.interval_s
        return min(self.interval_s * 2 ** (self.failures - 1), max(MAX_BACKOFF_S, self.interval_s))

    def describe(self) -> str:
        """A short detail for the health line of a good reading (e.g. "charging 7 kW")."""
        return ""

    # -- the poll loop -----------------------------------------------------------------
    async def poll_once(self) -> None:
        try:
            with trio.fail_after(self.timeout_s):
                state = await self.read()
        except trio.TooSlowError:
            self._fail(f"no complete answer within {self.timeout_s:g} s")
        except Unavailable as exc:
            self.forget(str(exc))
        except ProviderError as exc:
            self._fail(str(exc))
        except (VehicleStateError, ValueError) as exc:
            self._fail(f"impossible value: {exc}")
        else:
            self._state, self._observed_at, self._why = state, self.wall(), ""
            self.failures = 0
            self.reads += 1
        if self.on_update is not None:
            self.on_update()

    def _fail(self, why: str) -> None:
        self._state, self._observed_at = None, None
        self._why = why[:200]
        self.failures += 1

    def forget(self, why: str) -> None:
        """Subclasses: no state to trust, and why, without counting a failure."""
        self._state, self._observed_at, self._why = None, None, why[:200]
        self.failures = 0

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self.poll_once()
            await trio.sleep(self.next_delay())

    # -- what the node asks ------------------------------------------------------------
    def state_at(self, now: float) -> VehicleState | None:
        if self._state is None or self._observed_at is None:
            return None
        if now - self._observed_at >= self.max_age_s:
            return None
        return self._state

    def next_change_after(self, now: float) -> float | None:
        if self._state is None or self._observed_at is None:
            return None
        expiry = self._observed_at + self.max_age_s
        return expiry if expiry > now else None

    def unavailable_why(self, now: float) -> str:
        """Why `state_at(now)` is None (prefixed with the provider's name)."""
        if self._state is not None and self._observed_at is not None:
            return (f"{self.name}: last reading is {now - self._observed_at:.0f} s old "
                    f"(limit {self.max_age_s:g} s)")
        if self.failures > 1:
            return f"{self.name}: failed {self.failures} times in a row: {self._why}"
        return f"{self.name}: {self._why}"

    def health(self, now: float) -> str:
        """One line for `node status`."""
        if self.state_at(now) is None:
            return self.unavailable_why(now)
        detail = self.describe()
        age = now - (self._observed_at or now)
        return f"{self.name}: ok, read {age:.0f} s ago" + (f" ({detail})" if detail else "")


def observation(provider: Any, now: float, utc_offset_s: int = 0) -> Any:
    """The policy event for what `provider` says at `now`: `StateObserved`, or
    `StateUnavailable` with the provider's reason when it has no state to trust."""
    state = provider.state_at(now)
    if state is None:
        why = getattr(provider, "unavailable_why", None)
        text = why(now) if callable(why) else "the provider has no state"
        return StateUnavailable(now, text[:MAX_WHY_CHARS], utc_offset_s)
    return StateObserved(now, state, utc_offset_s)


def provider_health(provider: Any, now: float) -> str | None:
    """The health line of any provider (None for providers that have none: static, trace)."""
    health = getattr(provider, "health", None)
    return health(now) if callable(health) else None


__all__ = ["PolledProvider", "ProviderError", "Unavailable", "provider_health", "observation",
           "MAX_BACKOFF_S"]
