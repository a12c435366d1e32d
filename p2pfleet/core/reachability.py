"""Reachability verdicts: whether others can dial this node, whether it is *stable*, and the
DHT mode and relay service that follow.

Pure: the driver (net/reachability.py) asks peers to dial it back (AutoNAT) and feeds
their answers here with its clock; this module keeps the latest answer per peer and turns
them into a status, decides from the status's history whether the node is stable, and
from both the DHT mode (specs/reachability-and-discovery.md §3).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

CONFIRMATIONS = 3       # distinct peers that must agree (go-libp2p's confidence)
ANSWER_TTL_S = 1800.0   # an answer older than this no longer counts


class Reach(str, Enum):
    UNKNOWN = "unknown"
    PUBLIC = "public"
    PRIVATE = "private"


class Answer(str, Enum):
    """What a peer reported after trying to dial us back."""

    DIALED = "dialed"        # it reached one of our addresses on a new connection
    FAILED = "failed"        # it tried our addresses and none answered
    REFUSED = "refused"      # none of our addresses has the IP it sees us from (NAT)
    NO_ANSWER = "no-answer"  # it refused the request or did not answer: counts for nothing


@dataclass
class Reachability:
    """The latest answer of each peer asked and the status they add up to.

    The status flips only when `needed` peers agree, where `needed` is CONFIRMATIONS, or
    the number of peers that gave an answer when fewer were available (a node with a single
    peer trusts it: it has no other witness). A status once reached holds until as many
    peers agree on the other one."""

    confirmations: int = CONFIRMATIONS
    answer_ttl_s: float = ANSWER_TTL_S
    status: Reach = Reach.UNKNOWN
    why: str = "not checked yet"
    answers: dict[str, tuple[float, Answer, str]] = field(default_factory=dict)

    def record(self, now: float, peer: str, answer: Answer, detail: str = "") -> None:
        """Take one peer's answer (replacing its older one); `update` then decides."""
        if answer == Answer.NO_ANSWER:
            self.answers.pop(peer, None)
        else:
            self.answers[peer] = (now, answer, detail)

    def update(self, now: float, available: int) -> Reach:
        """Recompute the status from answers younger than the TTL; `available` is how many
        peers could be asked at all."""
        for peer in [p for p, (t, _, _) in self.answers.items() if now - t > self.answer_ttl_s]:
            del self.answers[peer]
        if not self.answers:
            return self.status
        needed = max(1, min(self.confirmations, available))
        dialed = [p for p, (_, a, _) in self.answers.items() if a == Answer.DIALED]
        not_dialed = [(p, a, d) for p, (_, a, d) in self.answers.items() if a != Answer.DIALED]
        if len(dialed) >= needed and len(dialed) > len(not_dialed):
            self.status = Reach.PUBLIC
            self.why = f"{len(dialed)} peer(s) dialled us back"
        elif len(not_dialed) >= needed and len(not_dialed) > len(dialed):
            self.status = Reach.PRIVATE
            reasons = sorted({f"{a.value}: {d}" if d else a.value for _, a, d in not_dialed})
            self.why = f"{len(not_dialed)} peer(s) could not dial us back ({'; '.join(reasons)})"
        return self.status


STABLE_PUBLIC_S = 600.0    # public this long without a flip before serving and relaying
STABLE_UPTIME_S = 1800.0   # and in the mesh this long without interruption (spec: 30 min)
FLAP_WINDOW_S = 3600.0     # each drop to private within this window doubles the wait ...
MAX_DOUBLINGS = 3          # ... up to 8 times STABLE_PUBLIC_S


@dataclass(frozen=True)
class StableRule:
    """When a public node is *stable*: public for `public_s` (doubled for each drop to
    private in the last `flap_window_s`, at most `max_doublings` times) and up for
    `uptime_s`. Both 0 turns the condition off: the node serves unless found private, also
    while its status is unknown (test fleets, a LAN that must work from the first second)."""

    public_s: float = STABLE_PUBLIC_S
    uptime_s: float = STABLE_UPTIME_S
    flap_window_s: float = FLAP_WINDOW_S
    max_doublings: int = MAX_DOUBLINGS

    def __post_init__(self) -> None:
        for name in ("public_s", "uptime_s", "flap_window_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
                raise ValueError(f"stable rule {name} must be a finite number of seconds >= 0, "
                                 f"not {value!r}")
        if not isinstance(self.max_doublings, int) or self.max_doublings < 0:
            raise ValueError(f"stable rule max_doublings must be a whole number >= 0, "
                             f"not {self.max_doublings!r}")

    @property
    def off(self) -> bool:
        return self.public_s == 0 and self.uptime_s == 0


NO_STABILITY = StableRule(public_s=0.0, uptime_s=0.0)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


@dataclass
class Stability:
    """Whether this node is stable, from the statuses the driver observes (with its clock)
    since `started` (when the node joined the mesh). A flip to private ends stability at
    once; flapping is damped by the longer wait after each recent drop."""

    started: float
    rule: StableRule = field(default_factory=StableRule)
    public_since: float | None = None
    drops: list[float] = field(default_factory=list)   # times of public -> private flips
    stable: bool = False
    why: str = "reachability not known yet"

    def wait_s(self) -> float:
        """How long the node must be public, given its recent drops."""
        return self.rule.public_s * 2 ** min(len(self.drops), self.rule.max_doublings)

    def observe(self, now: float, status: Reach) -> bool:
        """Take the current status; whether the node is stable now."""
        if status == Reach.PUBLIC:
            if self.public_since is None:
                self.public_since = now
        else:
            if status == Reach.PRIVATE and self.public_since is not None:
                self.drops.append(now)
            self.public_since = None
        self.drops = [t for t in self.drops if now - t < self.rule.flap_window_s]
        self.stable, self.why = self._decide(now, status)
        return self.stable

    def _decide(self, now: float, status: Reach) -> tuple[bool, str]:
        if self.rule.off:
            if status == Reach.PRIVATE:
                return False, "private"
            return True, "no stability condition (stable rule off)"
        if status != Reach.PUBLIC or self.public_since is None:
            return False, ("private" if status == Reach.PRIVATE else
                           "reachability not known yet") + \
                f"; server after public for {_minutes(self.wait_s())}"
        public_for, up_for, wait = now - self.public_since, now - self.started, self.wait_s()
        if public_for < wait:
            flaps = f" ({len(self.drops)} recent drop(s) to private)" if self.drops else ""
            return False, (f"public for {_minutes(public_for)}; server after "
                           f"{_minutes(wait)}{flaps}")
        if up_for < self.rule.uptime_s:
            return False, (f"public for {_minutes(public_for)}, up for {_minutes(up_for)}; "
                           f"server after {_minutes(self.rule.uptime_s)} up")
        return True, f"public for {_minutes(public_for)}, up for {_minutes(up_for)}"


def dht_mode(setting: str, stable: bool) -> str:
    """The DHT mode for the `node.dht_mode` setting: `auto` serves only while the node is
    stable (`Stability`); `server` and `client` fix the mode."""
    if setting in ("server", "client"):
        return setting
    if setting != "auto":
        raise ValueError(f"dht_mode {setting!r}: use auto, server or client")
    return "server" if stable else "client"
