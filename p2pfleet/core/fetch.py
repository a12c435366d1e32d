"""The fetcher's rules for a blob with several sources: which source when, for how long, how fast.

Pure (no I/O, no clock, no randomness of its own): `p2pfleet/net/blobs.py` passes in the
time (seconds of one monotonic clock for a fetch's windows and paces, of any clock for the
standing kept across fetches) and does the transfers. The rules are specs/work-and-leases.md,
section 5, "Sources":

- **Order** (`order_sources`): the DHT providers first, best standing first (fewest demerits;
  ties in the order the provider walk found them), those with `SKIP_AT` demerits or more not
  at all; then the named sources (the publisher, the lease's seeders) in their order. A named
  source found as a provider too keeps its named place: the publisher is the last source,
  never the first.
- **Time** (`source_until`): a fetch has a budget of `budget_s` seconds ending at
  `budget_end` (for a worker: the lease's fetch time, `core.worker.fetch_time_s`). Every
  source but the last may be waited on for at most `SOURCE_SHARE` of the budget, and not
  once only `LAST_RESERVE` of it is left; the last source gets whatever remains. So no
  provider, or string of providers, can eat the time of the publisher, which is always
  asked before the fetch gives up.
- **Rate** (`Pace`): a source must deliver its first bytes within `FIRST_BYTES_S` of being
  asked (dial included), and then keep ahead of `MIN_RATE_BPS`: each byte accepted moves its
  deadline `1 / MIN_RATE_BPS` s later, but never more than `BANK_S` past now. A source past
  its deadline is abandoned at once; the bytes it delivered that passed the per-chunk checks
  are kept and the next source resumes after them.
- **Standing** (`SourceScores`): demerits per peer that halve every `HALF_LIFE_S`: `slow`
  (below the rate, or a frame stalled) 2, `lied` (bytes that did not hash to the digest, or
  a broken chunk rule) 4, `failed` (refused, unreachable, broke off) 0.5. A complete,
  verified delivery takes one demerit off. A provider at `SKIP_AT` (1) or more is not asked:
  a slow one for about an hour, a liar for about two.
- **Blame** (`disproved`): when a blob assembled from several sources does not hash to its
  digest no single source can be blamed; the bytes are dropped and the last source is asked
  for the whole blob again. If that copy verifies, every earlier source whose bytes differ
  from it is proven to have lied.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

KiB = 1024

MIN_RATE_BPS = 32 * KiB   # 256 kbit/s, below a poor mobile link; a trickle is far below it
FIRST_BYTES_S = 10.0      # dial, request and first chunk (a 256 KiB chunk takes 8 s at the floor)
BANK_S = 16.0             # two full chunks at the floor: fast bytes buy no more than this
SOURCE_SHARE = 0.25       # of the fetch budget, per source other than the last
LAST_RESERVE = 0.5        # of the fetch budget, kept for the last source
HALF_LIFE_S = 3600.0
SKIP_AT = 1.0
DEMERITS = {"slow": 2.0, "lied": 4.0, "failed": 0.5}
SERVED_CREDIT = 1.0


@dataclass(frozen=True)
class FetchRules:
    """The numbers above, in one value (tests of the I/O side may shrink the times)."""

    min_rate_bps: float = MIN_RATE_BPS
    first_bytes_s: float = FIRST_BYTES_S
    bank_s: float = BANK_S
    source_share: float = SOURCE_SHARE
    last_reserve: float = LAST_RESERVE

    def __post_init__(self) -> None:
        if not (self.min_rate_bps > 0 and self.first_bytes_s > 0 and self.bank_s > 0):
            raise ValueError("min_rate_bps, first_bytes_s and bank_s must be positive")
        if not (0 < self.source_share <= 1 and 0 <= self.last_reserve < 1):
            raise ValueError("source_share must be in (0, 1], last_reserve in [0, 1)")


RULES = FetchRules()


def source_until(now: float, *, last: bool, budget_end: float, budget_s: float,
                 rules: FetchRules = RULES) -> float | None:
    """Until when a source asked at `now` may keep sending; None: it must not be asked (no
    time left for it). `last`: it is the fetch's last source (the publisher)."""
    if now >= budget_end:
        return None
    if last:
        return budget_end
    stop = budget_end - rules.last_reserve * max(0.0, budget_s)
    if now >= stop:
        return None
    return min(now + rules.source_share * max(0.0, budget_s), stop)


@dataclass(frozen=True)
class Pace:
    """A source's deadline for its next bytes. `started` with the request; `took` every chunk
    accepted; `behind(now)`: abandon the source."""

    deadline: float
    received: int = 0

    @classmethod
    def started(cls, now: float, rules: FetchRules = RULES) -> "Pace":
        return cls(now + rules.first_bytes_s)

    def behind(self, now: float) -> bool:
        return now >= self.deadline

    def took(self, n: int, now: float, rules: FetchRules = RULES) -> "Pace":
        """After `n` more bytes accepted at `now`. Bytes that come after the deadline do
        not revive a source that is behind."""
        if n < 0:
            raise ValueError(f"bytes taken must be >= 0, got {n}")
        if self.behind(now):
            return Pace(self.deadline, self.received + n)
        return Pace(min(self.deadline + n / rules.min_rate_bps, now + rules.bank_s),
                    self.received + n)


def peer_of(source: str) -> str:
    """The peer id of a source given as a peer id or a multiaddr ending in /p2p/<id>."""
    if source.startswith("/") and "/p2p/" in source:
        return source.rsplit("/p2p/", 1)[1]
    return source


@dataclass
class _Mark:
    demerit: float
    at: float


@dataclass
class SourceScores:
    """Demerits of blob sources (peer id -> decaying count), kept by the fetching node."""

    half_life_s: float = HALF_LIFE_S
    skip_at: float = SKIP_AT
    _marks: dict[str, _Mark] = field(default_factory=dict)

    def demerit(self, peer: str, now: float) -> float:
        m = self._marks.get(peer)
        if m is None:
            return 0.0
        return m.demerit * math.pow(0.5, max(0.0, now - m.at) / self.half_life_s)

    def mark(self, peer: str, what: str, now: float) -> float:
        """Record a `slow`, `lied` or `failed` source; returns its demerits now."""
        if what not in DEMERITS:
            raise ValueError(f"unknown source outcome {what!r}; known: {', '.join(DEMERITS)}")
        total = self.demerit(peer, now) + DEMERITS[what]
        self._marks[peer] = _Mark(total, now)
        return total

    def served(self, peer: str, now: float) -> float:
        """A complete delivery that verified: one demerit off."""
        total = max(0.0, self.demerit(peer, now) - SERVED_CREDIT)
        if total > 0:
            self._marks[peer] = _Mark(total, now)
        else:
            self._marks.pop(peer, None)
        return total

    def rank(self, peers: Iterable[str], now: float) -> list[str]:
        """`peers` worth asking, best first (stable: ties keep their order)."""
        scored = [(self.demerit(p, now), i, p) for i, p in enumerate(dict.fromkeys(peers))]
        return [p for d, _i, p in sorted(scored) if d < self.skip_at]

    def forget(self, now: float) -> None:
        """Drop marks that have decayed to nothing."""
        for peer in [p for p in self._marks if self.demerit(p, now) < 0.01]:
            del self._marks[peer]


def order_sources(providers: Sequence[str], named: Sequence[str], scores: SourceScores,
                  now: float, *, exclude: Iterable[str] = ()) -> list[str]:
    """The sources to ask, in order: providers by standing (not those also named, nor
    `exclude`d ones, e.g. ourselves or banned peers), then the named sources as given."""
    named = list(dict.fromkeys(named))
    skip = {peer_of(s) for s in named} | set(exclude)
    return scores.rank([p for p in providers if p not in skip], now) + named


@dataclass(frozen=True)
class Contribution:
    """Bytes [start, end) of a download came from `peer`; `digest` is their SHA-256."""

    peer: str
    start: int
    end: int
    digest: bytes


def disproved(contributions: Iterable[Contribution], blob: bytes) -> list[str]:
    """Peers whose contributed bytes differ from `blob`, a copy that hashed to its digest:
    they are proven to have sent wrong bytes."""
    view = memoryview(blob)
    out: list[str] = []
    for c in contributions:
        if c.end > len(blob) or hashlib.sha256(view[c.start:c.end]).digest() != c.digest:
            if c.peer not in out:
                out.append(c.peer)
    return out


__all__ = ["FetchRules", "RULES", "source_until", "Pace", "peer_of", "SourceScores",
           "order_sources", "Contribution", "disproved", "MIN_RATE_BPS", "FIRST_BYTES_S",
           "BANK_S", "SOURCE_SHARE", "LAST_RESERVE", "HALF_LIFE_S", "SKIP_AT", "DEMERITS"]
