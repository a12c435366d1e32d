"""Records a node holds for other peers, counted per sending peer and per source address.

A DHT server stores what others push: value records (PUT_VALUE) and provider records
(ADD_PROVIDER). Identities are free, addresses are not, so what one sender may have us hold
is capped per peer (`per_peer`) and per source address (`per_source`: fix 8's notion, an
IPv4 address or an IPv6 /64; several honest cars may share one carrier-grade NAT address).
A peer without a source (a relayed connection: its address is the relay's, whose circuits
and reservations have limits of their own) is its own source.

When the store is full, the record to drop is one of the source holding the most (its
oldest), never an honest peer's first: an attacker spread over many addresses fills its own
share and then evicts its own records.

Pure bookkeeping: the driver (net/state_limits.py) says what was stored, by whom and from
where, and which entries the store no longer holds (expiry, eviction).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass


@dataclass(frozen=True)
class HeldLimits:
    per_peer: int = 64     # entries one sending peer may have us hold
    source_share: int = 4  # one source address may hold this many peers' shares

    def __post_init__(self) -> None:
        if self.per_peer < 1 or self.source_share < 1:
            raise ValueError(f"held records: need per_peer >= 1 and source_share >= 1, "
                             f"got {self}")

    @property
    def per_source(self) -> int:
        return self.per_peer * self.source_share


class HeldRecords:
    """Which peer and source each held entry came from, and how many each holds."""

    def __init__(self, limits: HeldLimits):
        self.limits = limits
        self.owner: dict[Hashable, tuple[str, str]] = {}  # entry -> (peer, source)
        self.per_peer: Counter[str] = Counter()
        # per source, its entries oldest first (a dict keeps insertion order)
        self.per_source: dict[str, dict[Hashable, None]] = {}
        self.refused = 0

    @staticmethod
    def source_of(peer: str, source: str | None) -> str:
        return source if source is not None else f"peer:{peer}"

    def refusal(self, entry: Hashable, peer: str, source: str | None,
                held: Callable[[Hashable], bool]) -> str | None:
        """Why `peer` (from `source`) may not have us hold `entry`, or None: then it is
        counted as theirs. `held` says whether the store still holds an entry (to forget the
        ones it dropped before judging a peer or source at its limit)."""
        group = self.source_of(peer, source)
        if self.owner.get(entry, (None, None)) == (peer, group):
            return None  # a newer record under an entry it holds
        if self._at_limit(peer, group):
            self.sweep(held)
            why = self._at_limit(peer, group)
            if why:
                self.refused += 1
                return why
        self.forget(entry)
        self.owner[entry] = (peer, group)
        self.per_peer[peer] += 1
        self.per_source.setdefault(group, {})[entry] = None
        return None

    def _at_limit(self, peer: str, group: str) -> str | None:
        if self.per_peer[peer] >= self.limits.per_peer:
            return f"over its quota of {self.limits.per_peer} held DHT records"
        if len(self.per_source.get(group, ())) >= self.limits.per_source:
            return (f"its source address is over its quota of {self.limits.per_source} held "
                    f"DHT records")
        return None

    def forget(self, entry: Hashable) -> None:
        owner = self.owner.pop(entry, None)
        if owner is None:
            return
        peer, group = owner
        self.per_peer[peer] -= 1
        if self.per_peer[peer] <= 0:
            del self.per_peer[peer]
        entries = self.per_source[group]
        del entries[entry]
        if not entries:
            del self.per_source[group]

    def sweep(self, held: Callable[[Hashable], bool]) -> None:
        """Forget every entry the store no longer holds."""
        for entry in [e for e in self.owner if not held(e)]:
            self.forget(entry)

    def to_evict(self) -> Hashable | None:
        """The entry to drop from a full store: the oldest of the source holding the most
        (None if we hold nothing for anyone)."""
        if not self.per_source:
            return None
        heaviest = max(self.per_source.values(), key=len)
        return next(iter(heaviest))
