"""Pure rate limits: a token bucket per key (e.g. per publisher on the jobs topic).

A network rule, so it lives in the core: the caller passes the time, nothing here reads a
clock. Buckets idle long enough to be full again are forgotten when the table grows large.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    at: float


class TokenBuckets:
    """A token bucket per key: `per_minute` actions on average, bursts of `burst`."""

    def __init__(self, per_minute: float, burst: int):
        self.rate = per_minute / 60.0
        self.burst = burst
        self._buckets: dict[bytes, _Bucket] = {}

    def available(self, publisher: bytes, now: float) -> float:
        """Tokens `publisher` has at `now` (changes nothing): a sender keeping within its
        own budget (a publisher announcing) checks this before it acts."""
        b = self._buckets.get(publisher) or _Bucket(float(self.burst), now)
        return min(float(self.burst), b.tokens + max(0.0, now - b.at) * self.rate)

    def wait_s(self, key: bytes, now: float) -> float:
        """Seconds until `key` has a token again (0 if it has one now)."""
        return max(0.0, (1.0 - self.available(key, now)) / self.rate)

    def allow(self, publisher: bytes, now: float) -> bool:
        b = self._buckets.get(publisher) or _Bucket(float(self.burst), now)
        tokens = min(float(self.burst), b.tokens + (now - b.at) * self.rate)
        if tokens < 1.0:
            self._buckets[publisher] = _Bucket(tokens, now)
            return False
        self._buckets[publisher] = _Bucket(tokens - 1.0, now)
        if len(self._buckets) > 10_000:  # forget the idle ones
            cutoff = now - self.burst / self.rate
            self._buckets = {k: v for k, v in self._buckets.items() if v.at > cutoff}
        return True


class PublisherRateLimit(TokenBuckets):
    """Job announcements per publisher key: 12 a minute, bursts of 6."""

    def __init__(self, per_minute: float = 12.0, burst: int = 6):
        super().__init__(per_minute, burst)
