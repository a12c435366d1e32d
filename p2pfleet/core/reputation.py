"""Pure rules for how a peer's misbehaviour is counted and when it is banned.

Penalties add up and decay exponentially (half-life), so an honest peer that once sent a
bad message recovers, while a peer that keeps misbehaving crosses the ban threshold and is
banned for a fixed time. Bans are effects: the caller persists them (so a banned peer
does not come back clean by reconnecting), closes connections and blacklists it in gossip.
The score given to GossipSub as its application score is minus the current penalty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Penalty per offence (ban threshold 100 by default).
PENALTIES = {
    "invalid-message": 10.0,   # forged, malformed, expired, oversized (not replays)
    "protocol-error": 20.0,    # a stream handler failed on the peer's input
    "rate-limit": 5.0,         # over a per-peer or per-publisher rate
    "stalled-stream": 5.0,     # an inbound stream went idle mid-request (also a bad link)
    "unknown-topic": 2.0,      # gossip naming a topic we do not use (dropped)
    "equivocation": 100.0,     # two records with one sequence number
}


@dataclass(frozen=True)
class Ban:
    """Effect: ban `peer` until `until` (seconds, caller's clock)."""

    peer: str
    until: float
    reason: str


@dataclass
class _Standing:
    penalty: float
    at: float


class Reputation:
    def __init__(self, ban_threshold: float = 100.0, half_life_s: float = 600.0,
                 ban_s: float = 24 * 3600.0):
        if ban_threshold <= 0 or half_life_s <= 0 or ban_s <= 0:
            raise ValueError("ban_threshold, half_life_s and ban_s must be positive")
        self.ban_threshold = ban_threshold
        self.half_life_s = half_life_s
        self.ban_s = ban_s
        self._standing: dict[str, _Standing] = {}
        self._bans: dict[str, float] = {}

    def _decayed(self, peer: str, now: float) -> float:
        st = self._standing.get(peer)
        if st is None:
            return 0.0
        dt = max(0.0, now - st.at)
        return st.penalty * math.pow(0.5, dt / self.half_life_s)

    def penalty(self, peer: str, now: float) -> float:
        return self._decayed(peer, now)

    def score(self, peer: str, now: float) -> float:
        """GossipSub application score: 0 for a clean peer, negative after offences."""
        if self.is_banned(peer, now):
            return -1e6
        return -self._decayed(peer, now)

    def is_banned(self, peer: str, now: float) -> bool:
        until = self._bans.get(peer)
        return until is not None and now < until

    def restore_ban(self, peer: str, until: float) -> None:
        """Load a ban persisted earlier (on start)."""
        self._bans[peer] = max(until, self._bans.get(peer, 0.0))

    def penalize(self, peer: str, offence: str, now: float, detail: str = "") -> list[Ban]:
        if offence not in PENALTIES:
            raise ValueError(f"unknown offence {offence!r}; known: {', '.join(PENALTIES)}")
        total = self._decayed(peer, now) + PENALTIES[offence]
        self._standing[peer] = _Standing(total, now)
        if total >= self.ban_threshold and not self.is_banned(peer, now):
            until = now + self.ban_s
            self._bans[peer] = until
            reason = f"{offence}: {detail}" if detail else offence
            return [Ban(peer, until, reason[:200])]
        return []

    def forget(self, now: float) -> None:
        """Drop standings that have decayed to nothing and bans that ended."""
        for peer in [p for p in self._standing if self._decayed(p, now) < 0.01]:
            del self._standing[peer]
        for peer in [p for p, until in self._bans.items() if until <= now]:
            del self._bans[peer]
