"""Fixes 12 and 13 for py-libp2p 0.8.1: state a peer can make a node hold (issue 14, item 3).

Gossip naming topics we do not use, and DHT records pushed by one sender, grew a node's
memory for good. Named and documented like the fixes in libp2p_fixes.py (README table
"Fixes to py-libp2p"); tests in tests/integration/test_hostile_state.py.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

from ..core.held_records import HeldLimits, HeldRecords
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


# --- Fix 13: no per-sender quota on the DHT's stores -----------------------------------------
# Upstream: KadDHT stores every valid PUT_VALUE (up to 50,000 records in all, then it drops
# the oldest, whoever's it is) whoever sends it: one peer pushing 10,000 records, each
# validly signed by an identity of its own making, had them all stored, and identities
# rotated from one address could fill the store and evict honest records. ADD_PROVIDER is
# rate-limited per peer (10 per 10 s) and capped at 20 providers per key, first come: fresh
# identities from one address could fill a model's provider slots. An honest peer PUTs only
# its own few records (py-libp2p republishes only records it put itself) and announces the
# models it holds, so we count, per sending peer and per source address
# (core/held_records.py), the records it stored that are still held, and refuse a new one
# over quota (the sender is reported; a PUT's stream is reset). A full value store drops a
# record of the source holding the most. A source may hold at most `source_share` of one
# key's provider slots. Records we put ourselves are not counted.

_put_sender: ContextVar[tuple[Any, str | None] | None] = ContextVar(
    "p2pfleet_dht_put_sender", default=None)


class RecordQuotaExceeded(Exception):
    pass


SourceFn = Callable[[Any], "str | None"]  # stream -> its source address (None: relayed)


def limit_records_per_sender(host: Any, dht: Any, protocol: str, limits: HeldLimits,
                             capacity: int, source_of: SourceFn,
                             on_over: Callable[[Any, str], None]) -> tuple[HeldRecords, HeldRecords]:
    """Cap the value and provider records each peer and each source address may have stored
    in `dht`, and evict by source when the value store holds `capacity`; returns the two
    counters (values, providers). Call after creating the DHT (which registers its
    handler), before it runs."""
    value_store = dht.value_store
    values = HeldRecords(limits)
    providers = HeldRecords(limits)
    put_record = value_store.put_record
    add_provider = dht.provider_store.add_provider
    set_stream_handler = host.set_stream_handler

    def put_counted(key: bytes, record: Any) -> None:
        sent = _put_sender.get()
        if sent is not None:
            peer, source = sent
            why = values.refusal(key, str(peer), source, value_store.store.__contains__)
            if why:
                log.warning("refused a record from %s: %s", peer, why)
                on_over(peer, why)
                raise RecordQuotaExceeded(why)
        put_record(key, record)

    def evict_if_full() -> None:
        store = value_store.store
        while len(store) >= capacity:
            values.sweep(store.__contains__)
            victim = values.to_evict()
            if victim is None:  # only our own records: the oldest goes, as upstream
                victim = next(iter(store))
            store.pop(victim, None)
            values.forget(victim)

    def provider_held(entry: Any) -> bool:
        key, peer = entry
        return peer in dht.provider_store.providers.get(key, {})

    def add_counted(key: bytes, provider: Any) -> None:
        sent = _put_sender.get()
        if sent is not None:
            peer, source = sent
            group = HeldRecords.source_of(str(peer), source)
            entry = (key, str(provider.peer_id))
            same_source = sum(1 for p in dht.provider_store.providers.get(key, {})
                              if providers.owner.get((key, p), (None, None))[1] == group)
            if same_source >= limits.source_share and entry not in providers.owner:
                providers.refused += 1
                why = f"its source address holds {limits.source_share} provider slots of a key"
            else:
                why = providers.refusal(entry, str(peer), source, provider_held)
            if why:
                log.warning("refused a provider record from %s: %s", peer, why)
                on_over(peer, why)
                return
        add_provider(key, provider)

    def with_sender(handler: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Awaitable[None]]:
        async def handle(stream: Any) -> None:
            peer = _peer_of(stream)
            token = _put_sender.set(None if peer is None else (peer, source_of(stream)))
            try:
                await handler(stream)
            finally:
                _put_sender.reset(token)
        return handle

    def set_handler(protocol_id: Any, handler: Callable[[Any], Awaitable[None]]) -> None:
        set_stream_handler(protocol_id, with_sender(handler) if str(protocol_id) == protocol
                           else handler)

    value_store.put_record = put_counted
    value_store._evict_if_full = evict_if_full
    dht.provider_store.add_provider = add_counted
    host.set_stream_handler = set_handler
    if protocol in {str(p) for p in host.get_mux().handlers}:  # a server's KadDHT registered
        set_handler(protocol, dht.handle_stream)                # it in its constructor
    return values, providers
