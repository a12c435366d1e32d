"""Per-publisher trust in workers: streaks, established identities, single copies, exclusion.

Pure functions over frozen `WorkerTrust` records (specs/verification.md, section 8;
work-and-leases.md, section 4): the caller passes `now_ms` and an `rng`, stores the record
it gets back, and persists it. Nothing here is shared between publishers.

- A valid result extends the streak (count and credit value); the first one dates the
  worker's history.
- A disagreement (invalid result, malformed result) resets the streak, and for
  `reset_quiet_ms` the worker counts as not established: replicated leases only, the
  smaller lease cap.
- Established: at least `established_accepted` accepted results, the first at least
  `established_age_ms` ago, no reset in the last `reset_quiet_ms`; or named in `trusted`
  (the publisher's own machines: a fresh publisher needs some, see verification.md).
- Single-replica leases (adaptive replication): established, a streak of at least
  `single_streak` whose value is at least `single_value_factor` times the shard's credit,
  and then with probability 1 - 1/streak (BOINC).
- Exclusion is final at this publisher (failed known answer, conflicting results).
- Failing workers (failed or expired leases) back off exponentially before new leases.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the caller hands in its seeded rng: core only names the type
    import random

DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class TrustSettings:
    established_accepted: int = 10
    established_age_ms: int = DAY_MS
    reset_quiet_ms: int = DAY_MS
    single_streak: int = 10
    single_value_factor: float = 10.0
    fresh_cap: int = 2          # outstanding leases of a non-established identity
    established_cap: int = 16   # ... of an established one
    backoff_base_ms: int = 60_000
    backoff_max_ms: int = 4 * 3600 * 1000
    trusted: frozenset[bytes] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        for name in ("established_accepted", "established_age_ms", "reset_quiet_ms",
                     "single_streak", "backoff_base_ms", "backoff_max_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrustSettings.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("fresh_cap", "established_cap"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrustSettings.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class WorkerTrust:
    """What one publisher knows about one worker identity (its 32-byte key)."""

    worker: bytes
    accepted: int = 0                 # valid results ever
    first_valid_ms: int | None = None
    streak: int = 0                   # consecutive valid results
    streak_value: int = 0             # credit of those results
    reset_ms: int | None = None       # last disagreement
    excluded: str = ""                # non-empty: excluded, and why
    fails: int = 0                    # consecutive failed / expired leases
    backoff_until_ms: int = 0


def established(t: WorkerTrust, s: TrustSettings, now_ms: int) -> bool:
    if t.excluded:
        return False
    if t.worker in s.trusted:
        return True
    if t.reset_ms is not None and now_ms - t.reset_ms < s.reset_quiet_ms:
        return False
    if t.accepted < s.established_accepted:
        return False
    if s.established_age_ms == 0:
        return True
    return t.first_valid_ms is not None and now_ms - t.first_valid_ms >= s.established_age_ms


def lease_cap(t: WorkerTrust, s: TrustSettings, now_ms: int) -> int:
    return s.established_cap if established(t, s, now_ms) else s.fresh_cap


def may_take_single(t: WorkerTrust, s: TrustSettings, credit: int, now_ms: int,
                     rng: random.Random) -> bool:
    """Draw whether this shard may be accepted on this worker's result alone."""
    if not established(t, s, now_ms) or t.streak < max(1, s.single_streak):
        return False
    if t.streak_value < s.single_value_factor * credit:
        return False
    return rng.random() < 1.0 - 1.0 / t.streak


def on_valid(t: WorkerTrust, credit: int, now_ms: int) -> WorkerTrust:
    return replace(t, accepted=t.accepted + 1, streak=t.streak + 1,
                   streak_value=t.streak_value + credit, fails=0, backoff_until_ms=0,
                   first_valid_ms=now_ms if t.first_valid_ms is None else t.first_valid_ms)


def on_disagreement(t: WorkerTrust, now_ms: int) -> WorkerTrust:
    return replace(t, streak=0, streak_value=0, reset_ms=now_ms)


def on_excluded(t: WorkerTrust, why: str) -> WorkerTrust:
    return replace(t, excluded=why or "excluded", streak=0, streak_value=0)


def backoff_ms(fails: int, s: TrustSettings) -> int:
    """How long to back off after `fails` consecutive failures: base * 2^(fails - 1), capped."""
    return min(s.backoff_max_ms, s.backoff_base_ms * (2 ** min(max(fails, 1) - 1, 30)))


def on_failure(t: WorkerTrust, s: TrustSettings, now_ms: int) -> WorkerTrust:
    """A failed or expired lease: back off base * 2^(fails - 1) up to the max."""
    fails = t.fails + 1
    return replace(t, fails=fails, backoff_until_ms=now_ms + backoff_ms(fails, s))


__all__ = ["TrustSettings", "WorkerTrust", "established", "lease_cap", "may_take_single",
           "on_valid", "on_disagreement", "on_excluded", "on_failure", "backoff_ms", "DAY_MS"]
