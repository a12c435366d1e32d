"""Per-peer inbound byte budgets: a peer's bytes spend the owner's transfer cap only if the
peer stays within its budget. Pure: the driver (net/mesh.py, node.py) reports the bytes and
passes its clock.

What a peer sends us unasked (gossip, DHT requests, identify, requests to our stream
handlers) is metered per peer, per minute and per day. The TCP bytes of its connection, both
ways (net/traffic.py attributes them to the peer once the connection is up), are held for
the current minute and only then counted toward the cap; a peer that overruns either budget,
or that the mesh bans for misbehaviour, has its held and later bytes refused (never counted)
and is cut off; a peer scored down for an offence below a ban, or whose connection the mesh
pruned as useless to make room (fix 16), has the bytes of that minute refused. So an attacker's flood costs the owner's link what arrived before the cut, but
none of the daily cap: leaving the mesh would hurt the owner more than the bytes did. Bytes we asked for (blob downloads on streams we
opened) are not metered, only held for the minute.

py-libp2p 0.8.1's resource manager (libp2p.rcmgr) was judged first: it limits connections,
streams and an abstract memory figure, but nothing in the swarm or muxers reports bytes to
it, so it cannot budget bytes per peer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

MB = 1_000_000
MAX_PEERS = 4096  # peers remembered; identities are cheap, so the table must not grow


@dataclass(frozen=True)
class BudgetLimits:
    per_minute: int = 8 * MB   # unasked inbound bytes a peer may send in one minute
    per_day: int = 64 * MB     # ... and in one day (a day: since the first byte, 24 h)
    window_s: float = 60.0

    def __post_init__(self) -> None:
        if self.per_minute <= 0 or self.per_day < self.per_minute or self.window_s <= 0:
            raise ValueError(f"peer budget: need 0 < per_minute <= per_day and window_s > 0, "
                             f"got {self}")


@dataclass
class _Peer:
    window_start: float
    day_start: float
    held: int = 0         # TCP bytes (both ways) of this window, not yet counted toward the cap
    unasked: int = 0      # metered bytes in this window
    unasked_day: int = 0
    forfeit: bool = False  # its held bytes of this window will not count


@dataclass
class PeerBudget:
    clock: Callable[[], float]  # the driver's monotonic clock (the core reads none)
    limits: BudgetLimits = field(default_factory=BudgetLimits)
    refused: int = 0                       # bytes of over-budget peers: never counted
    over: dict[str, str] = field(default_factory=dict)  # peer -> why, since its overrun
    _peers: dict[str, _Peer] = field(default_factory=dict)

    @property
    def held(self) -> int:
        return sum(p.held for p in self._peers.values())

    def not_counted(self) -> int:
        """Bytes the traffic counter holds that do not (or not yet) count toward the cap."""
        self.settle()
        return self.held + self.refused

    def moved(self, peer: str, n: int) -> None:
        """TCP bytes from or to `peer` (called by the traffic counter): what we send a peer
        (identify, gossip, answers to its requests) is spent on its account too."""
        if peer in self.over:
            self.refused += n
            return
        self._peer(peer).held += n

    def unasked(self, peer: str, n: int) -> str | None:
        """Meter `n` unasked bytes from `peer`; returns why it is over budget, else None."""
        if peer in self.over:
            return self.over[peer]
        p = self._peer(peer)
        p.unasked += n
        p.unasked_day += n
        why = None
        if p.unasked > self.limits.per_minute:
            why = f"{p.unasked} unasked bytes within a minute (budget {self.limits.per_minute})"
        elif p.unasked_day > self.limits.per_day:
            why = f"{p.unasked_day} unasked bytes within a day (budget {self.limits.per_day})"
        if why is not None:
            self.refuse(peer, why)
        return why

    def refuse(self, peer: str, why: str) -> None:
        """From now on `peer`'s bytes, and those it holds, never count: it overran its
        budget, or the mesh banned it (an attacker cut off for misbehaviour spends none of
        the cap, whatever its rate)."""
        if peer in self.over:
            return
        self.over[peer] = why
        if len(self.over) > MAX_PEERS:  # the oldest overrun is forgotten first
            del self.over[next(iter(self.over))]
        p = self._peers.get(peer)
        if p is not None:
            self.refused += p.held
            p.held = 0

    def forfeit(self, peer: str) -> None:
        """The bytes of `peer`'s current window will not count: it was scored down for
        misbehaving (below a ban), or dropped as useless to make room for others (an
        attacker cut off by a stream reset or pruned would otherwise spend the cap with
        each fresh identity)."""
        if peer not in self.over:
            self._peer(peer).forfeit = True

    def settle(self) -> None:
        """Count the held bytes of windows that ended within budget and not forfeit."""
        now = self.clock()
        for peer, p in list(self._peers.items()):
            if now - p.window_start >= self.limits.window_s:
                if p.forfeit:
                    self.refused += p.held
                p.held, p.unasked, p.window_start, p.forfeit = 0, 0, now, False
                if now - p.day_start >= 86_400:
                    p.unasked_day, p.day_start = 0, now
                    self.over.pop(peer, None)

    def _peer(self, peer: str) -> _Peer:
        p = self._peers.get(peer)
        if p is None:
            now = self.clock()
            if len(self._peers) >= MAX_PEERS:
                self._forget()
            p = self._peers[peer] = _Peer(window_start=now, day_start=now)
        return p

    def _forget(self) -> None:
        """Bound the table: count what the oldest half of the peers hold (as a window
        ending would) and forget them."""
        oldest = sorted(self._peers, key=lambda k: self._peers[k].window_start)
        for peer in oldest[:len(oldest) // 2]:
            del self._peers[peer]  # its held bytes count, as after a window within budget
