"""Fixes 12 and 13 for py-libp2p 0.8.1: state a peer can make a node hold (issue 14, item 3).

Gossip naming topics we do not use, and DHT records pushed by one sender, grew a node's
memory for good. Named and documented like the fixes in libp2p_fixes.py (README table
"Fixes to py-libp2p"); tests in tests/integration/test_hostile_state.py.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

from .libp2p_fixes import _peer_of

log = logging.getLogger(__name__)


# --- Fix 12: gossip for topics we do not use is stored per topic ----------------------------
# Upstream: `allowed_topics` drops SUBSCRIBE to other topics but costs the sender nothing,
# and a published message passes if any one of its topicIDs is ours: push_msg then keeps
# an entry per listed topic in the scorer (four counters per peer and topic, created even by
# reads, decayed every heartbeat) and in the router's publish times (never removed). One
# signed message listing 5,000 topics held ~1.3 MB and heartbeat CPU after its sender left.
# IHAVE/GRAFT/PRUNE naming other topics create per-topic rate and score entries the same
# way. We drop all of it before upstream code sees it and report the sender.

UnknownTopicFn = Callable[[Any, str], None]  # (peer_id, what it sent)


def limit_gossip_topics(pubsub: Any, topics: set[str], on_unknown: UnknownTopicFn) -> None:
    """Keep `pubsub` (and its router and scorer) from holding state for any topic outside
    `topics`: such subscriptions are dropped; messages and control entries naming them are
    dropped and reported (an honest peer sends those only for topics we subscribe to)."""
    ours = frozenset(topics)
    handle_subscription = pubsub.handle_subscription
    push_msg = pubsub.push_msg
    router = pubsub.router
    handle_rpc = router.handle_rpc

    def subscription(origin: Any, sub: Any) -> None:
        if sub.subscribe and sub.topicid not in ours:
            # dropped, not punished: every peer tells every other of its subscriptions, so a
            # newer node on a topic this version lacks would pay for it; dropped, it costs
            # nothing to hold
            return
        handle_subscription(origin, sub)

    async def push_known(forwarder: Any, msg: Any) -> None:
        if forwarder != pubsub.my_id and any(t not in ours for t in msg.topicIDs):
            foreign = sum(t not in ours for t in msg.topicIDs)
            on_unknown(forwarder, f"message lists {foreign} topics we do not use")
            return
        await push_msg(forwarder, msg)

    async def control_known(rpc: Any, sender: Any) -> None:
        if rpc.HasField("control"):
            foreign = 0
            for entries in (rpc.control.ihave, rpc.control.graft, rpc.control.prune):
                kept = [e.SerializeToString() for e in entries if e.topicID in ours]
                if len(kept) < len(entries):
                    foreign += len(entries) - len(kept)
                    del entries[:]
                    for raw in kept:
                        entries.add().ParseFromString(raw)
            if foreign:
                on_unknown(sender, f"control message names {foreign} topics we do not use")
        await handle_rpc(rpc, sender)

    pubsub.handle_subscription = subscription
    pubsub.push_msg = push_known
    router.handle_rpc = control_known


# --- Fix 13: no per-sender quota on the DHT value store -------------------------------------
# Upstream: KadDHT stores every valid PUT_VALUE (up to 50,000 records in all) whoever sends
# it: one peer pushing 10,000 records, each validly signed by an identity of its own
# making, had them all stored. An honest peer PUTs only its own few records (py-libp2p
# republishes only records it put itself), so we count, per sending peer, the records it
# stored that are still held, and refuse a new key over `quota` (the stream is reset and the
# sender reported). Records we put ourselves are not counted.

_put_sender: ContextVar[Any] = ContextVar("p2pfleet_dht_put_sender", default=None)


class RecordQuotaExceeded(Exception):
    pass


class RecordQuota:
    """Which peer stored each held key, and how many keys each peer holds."""

    def __init__(self, store: dict[bytes, Any], quota: int):
        self.store = store
        self.quota = quota
        self.owner: dict[bytes, str] = {}
        self.count: Counter[str] = Counter()
        self.refused = 0

    def _recount(self, sender: str) -> None:
        for key in [k for k, s in self.owner.items() if s == sender and k not in self.store]:
            del self.owner[key]
        self.count[sender] = sum(1 for s in self.owner.values() if s == sender)

    def admit(self, sender: str, key: bytes) -> bool:
        if self.owner.get(key) == sender:
            return True  # a newer record under a key it holds
        if self.count[sender] >= self.quota:
            self._recount(sender)  # some may have expired or been evicted
            if self.count[sender] >= self.quota:
                self.refused += 1
                return False
        previous = self.owner.get(key)
        if previous is not None:
            self.count[previous] -= 1
        self.owner[key] = sender
        self.count[sender] += 1
        return True


def limit_records_per_sender(host: Any, dht: Any, protocol: str, quota: int,
                             on_over: Callable[[Any, str], None]) -> RecordQuota:
    """Cap the records each peer may have stored in `dht`'s value store; returns the
    counter. Call after creating the DHT (which registers its handler), before it runs."""
    value_store = dht.value_store
    counter = RecordQuota(value_store.store, quota)
    put_record = value_store.put_record
    set_stream_handler = host.set_stream_handler

    def put_counted(key: bytes, record: Any) -> None:
        sender = _put_sender.get()
        if sender is not None and not counter.admit(str(sender), key):
            why = f"over its quota of {quota} stored DHT records"
            log.warning("refused a record from %s: %s", sender, why)
            on_over(sender, why)
            raise RecordQuotaExceeded(why)
        put_record(key, record)

    def with_sender(handler: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Awaitable[None]]:
        async def handle(stream: Any) -> None:
            token = _put_sender.set(_peer_of(stream))
            try:
                await handler(stream)
            finally:
                _put_sender.reset(token)
        return handle

    def set_handler(protocol_id: Any, handler: Callable[[Any], Awaitable[None]]) -> None:
        set_stream_handler(protocol_id, with_sender(handler) if str(protocol_id) == protocol
                           else handler)

    value_store.put_record = put_counted
    host.set_stream_handler = set_handler
    if protocol in {str(p) for p in host.get_mux().handlers}:  # a server's KadDHT registered
        set_handler(protocol, dht.handle_stream)                # it in its constructor
    return counter
