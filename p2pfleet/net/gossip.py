"""GossipSub tuned for a fleet, and the validator of the job-announcement topic.

py-libp2p's defaults do not suit us: a 120 s heartbeat, adaptive gossip that stretches it
to 30-60 s when the mesh looks thin, score thresholds at minus infinity (all gates off) and
1 MiB inbound RPCs. We set a 1 s heartbeat, adaptive gossip off, mesh degree 6, real score
thresholds fed by our application score (minus the peer's penalty, see core/reputation),
and caps far below 1 MiB. Announcements over their publisher's rate, and messages of a
kind or version we do not speak, are ignored, not rejected (`over_rate_filter`, with fix
10): not delivered, not forwarded, and no relay is blamed for them.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.score import ScoreParams, TopicScoreParams

from ..core.ratelimit import PublisherRateLimit
from ..wire import errors as E
from ..wire.envelope import Opened, open_envelope
from . import libp2p_fixes

GOSSIP_PROTOCOLS = ["/meshsub/1.1.0"]
MAX_GOSSIP_RPC = 64 * 1024  # inbound RPC frame cap (announcements are ~1 KiB)


def make_gossipsub(app_score: Callable[[object], float], *, heartbeat_s: float = 1.0,
                   degree: int = 6) -> GossipSub:
    # P4 and P5 weights as the GossipSub v1.1 spec writes them (negative), turned into
    # what py-libp2p 0.8.1 needs (fix 9: it subtracts them)
    params = ScoreParams(
        p4_invalid_messages=TopicScoreParams(
            weight=libp2p_fixes.spec_penalty_weight(-10.0), cap=100.0, decay=0.9),
        p5_behavior_penalty_weight=libp2p_fixes.spec_penalty_weight(-1.0),
        p5_behavior_penalty_decay=0.9,
        p6_appl_slack_weight=1.0,
        p6_appl_slack_decay=1.0,
        publish_threshold=-50.0,
        gossip_threshold=-20.0,
        graylist_threshold=-80.0,
        accept_px_threshold=0.0,
        app_specific_score_fn=app_score,
    )
    return GossipSub(
        protocols=GOSSIP_PROTOCOLS,
        degree=degree,
        degree_low=max(1, degree - 2),
        degree_high=degree * 2,
        heartbeat_interval=heartbeat_s,  # type: ignore[arg-type]  # accepts floats
        heartbeat_initial_delay=0.1,
        adaptive_gossip_enabled=False,
        score_params=params,
        # Announcements are low-rate by design; the library's spam protection (drop a
        # neighbour forwarding > 10 msgs/s per topic) stays on as a backstop.
        spam_protection_enabled=True,
    )


class Verdict:
    ACCEPT = "accept"      # deliver and forward
    IGNORE = "ignore"      # unknown kind/version: drop without blaming anyone
    REJECT = "reject"      # invalid: drop and score the forwarder down


OVER_RATE = "publisher over its announcement rate"
CheckResult = tuple[str, Opened | None, str]


class JobTopicValidator:
    """Decides what happens to a message on the jobs topic.

    `check` is idempotent for a while (`memo_s`): the same bytes checked again (our own
    publish passing through the pubsub validator, the flood filter's check followed by the
    validator's) get the first verdict and are not charged to the publisher's rate twice.
    "Over the rate" is not remembered: it may pass once the publisher's bucket refills."""

    def __init__(self, network: str, *, clock: Callable[[], float] = time.time,
                 max_bytes: int = 8 * 1024, rate: PublisherRateLimit | None = None,
                 memo_s: float = 60.0, memo_size: int = 4096):
        self.network = network
        self.clock = clock
        self.max_bytes = max_bytes
        self.rate = rate or PublisherRateLimit()
        self.memo_s = memo_s
        self.memo_size = memo_size
        self._memo: OrderedDict[bytes, tuple[float, CheckResult]] = OrderedDict()

    def check(self, data: bytes) -> CheckResult:
        now = self.clock()
        digest = hashlib.sha256(data).digest()
        hit = self._memo.get(digest)
        if hit is not None and 0 <= now - hit[0] < self.memo_s:
            return hit[1]
        result = self._check(data, now)
        if result[2] == OVER_RATE:
            return result
        self._memo[digest] = (now, result)
        self._memo.move_to_end(digest)
        while len(self._memo) > self.memo_size:
            self._memo.popitem(last=False)
        return result

    def _check(self, data: bytes, now: float) -> CheckResult:
        if len(data) > self.max_bytes:
            return Verdict.REJECT, None, f"{len(data)} bytes over the topic cap {self.max_bytes}"
        try:
            opened = open_envelope(data, self.network, now_ms=int(now * 1000), kinds={"job"})
        except E.Unsupported as exc:
            return Verdict.IGNORE, None, str(exc)
        except E.WireError as exc:
            return Verdict.REJECT, None, str(exc)
        if not self.rate.allow(opened.signer, now):
            return Verdict.REJECT, opened, OVER_RATE
        return Verdict.ACCEPT, opened, ""


def over_rate_filter(validator: JobTopicValidator, on_flood: Callable[[Any], None],
                     on_unsupported: Callable[[], None] = lambda: None
                     ) -> Callable[[Any, Any], bool]:
    """For fix 10 (libp2p_fixes.add_validation_ignore): ignore announcements over their
    publisher's rate instead of rejecting them.

    A rejection scores the forwarder down, which would punish honest relays: a flooder
    that sends announcements 1-6 to node A and 7-12 to node B would make B reject, score
    down and in the end ban A for relaying 1-6 (and A ban B). Ignored messages are not
    delivered, not forwarded, and nobody is scored, except the peer that originated them
    itself (`on_flood`): an honest node refuses to publish over the rate (announce_job
    checks it)."""
    from libp2p.peer.id import ID

    def ignore(forwarder: Any, msg: Any) -> bool:
        verdict, _opened, why = validator.check(bytes(msg.data))
        if verdict == Verdict.IGNORE:
            # an unknown kind or newer version: not ours to judge (no penalty), and not
            # forwarded either, or anyone could flood the topic with unverifiable bytes;
            # a new kind or major version gets its own topic (names carry the version)
            on_unsupported()
            return True
        if verdict == Verdict.REJECT and why == OVER_RATE:
            if ID(msg.from_id) == forwarder:
                on_flood(forwarder)
            return True
        return False

    return ignore
