"""Reachability verdicts: whether others can dial this node, and the DHT mode that follows.

Pure: the driver (net/reachability.py) asks peers to dial it back (AutoNAT) and feeds
their answers here with its clock; this module keeps the latest answer per peer and turns
them into a status and a DHT mode (specs/reachability-and-discovery.md §3).
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


def dht_mode(setting: str, status: Reach) -> str:
    """The DHT mode for the `node.dht_mode` setting: `auto` is a client once the node is
    known to be private. Until it knows it serves, as every node did before AutoNAT: the
    first nodes of a network have nobody to ask, and a network of clients has no DHT."""
    if setting in ("server", "client"):
        return setting
    if setting != "auto":
        raise ValueError(f"dht_mode {setting!r}: use auto, server or client")
    return "client" if status == Reach.PRIVATE else "server"
