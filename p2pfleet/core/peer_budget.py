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

Identities are free, addresses are not: the unasked bytes of all peers from one source
address (fix 8's notion: an IPv4 address or an IPv6 /64) are metered too, against
`source_share` times the peer budget (several honest cars may share a carrier-grade NAT
address). A source over it has its peers' bytes refused as theirs would be, and is refused
new connections for `source_cooldown_s` after its window: an attacker rotating identities
behind one address gets one source budget a minute, not one per identity.

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
    source_share: int = 4      # one source address may send this many peers' budgets
    source_cooldown_s: float = 600.0  # an over-budget source is refused this long after

    def __post_init__(self) -> None:
        if (self.per_minute <= 0 or self.per_day < self.per_minute or self.window_s <= 0
                or self.source_share < 1 or self.source_cooldown_s < 0):
            raise ValueError(f"peer budget: need 0 < per_minute <= per_day, window_s > 0, "
                             f"source_share >= 1 and source_cooldown_s >= 0, got {self}")


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
    sources_over: dict[str, tuple[str, float]] = field(default_factory=dict)  # -> (why, until)
    _peers: dict[str, _Peer] = field(default_factory=dict)
    _sources: dict[str, _Peer] = field(default_factory=dict)  # metered like peers
    _source_of: dict[str, str] = field(default_factory=dict)  # peer -> its source address

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

    def bind(self, peer: str, source: str) -> None:
        """`peer`'s connection comes from `source` (its unasked bytes count there too)."""
        self._source_of[peer] = source
        if len(self._source_of) > MAX_PEERS:
            del self._source_of[next(iter(self._source_of))]

    def source_refused(self, source: str) -> str | None:
        """Why new connections from `source` are refused now (over its budget), else None."""
        entry = self.sources_over.get(source)
        if entry is None:
            return None
        if self.clock() >= entry[1]:
            del self.sources_over[source]
            return None
        return entry[0]

    def unasked(self, peer: str, n: int) -> str | None:
        """Meter `n` unasked bytes from `peer`; returns why it is over budget, else None."""
        if peer in self.over:
            return self.over[peer]
        why = _meter(self._peer(peer), n, self.limits.per_minute, self.limits.per_day)
        source = self._source_of.get(peer)
        if why is None and source is not None:
            why = self.source_refused(source)  # its address overran already
        if why is None and source is not None:
            share = self.limits.source_share
            over = _meter(self._source(source), n, share * self.limits.per_minute,
                          share * self.limits.per_day)
            if over is not None:
                why = f"its address {source}: {over}"
                until = (self._sources[source].window_start + self.limits.window_s
                         + self.limits.source_cooldown_s)
                self.sources_over[source] = (why, until)
                while len(self.sources_over) > MAX_PEERS:
                    del self.sources_over[next(iter(self.sources_over))]
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

    def _source(self, source: str) -> _Peer:
        s = self._sources.get(source)
        now = self.clock()
        if s is None:
            if len(self._sources) >= MAX_PEERS:
                del self._sources[min(self._sources, key=lambda k: self._sources[k].window_start)]
            s = self._sources[source] = _Peer(window_start=now, day_start=now)
        elif now - s.window_start >= self.limits.window_s:
            s.unasked, s.window_start = 0, now
            if now - s.day_start >= 86_400:
                s.unasked_day, s.day_start = 0, now
        return s

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


def _meter(p: _Peer, n: int, per_minute: int, per_day: int) -> str | None:
    """Add `n` unasked bytes to `p`'s window and day; why that is over the limits, else None."""
    p.unasked += n
    p.unasked_day += n
    if p.unasked > per_minute:
        return f"{p.unasked} unasked bytes within a minute (budget {per_minute})"
    if p.unasked_day > per_day:
        return f"{p.unasked_day} unasked bytes within a day (budget {per_day})"
    return None
