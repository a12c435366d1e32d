"""Hostile peers that grow a node's memory (issue 14, item 3): gossip naming topics we do
not use, and one sender pushing many valid DHT records. What they leave is measured as
stored state (entries held), never as timing."""

from __future__ import annotations

import time

import trio

from libp2p.kad_dht.pb.kademlia_pb2 import Message
from multiaddr import Multiaddr

from p2pfleet.core.held_records import HeldLimits
from p2pfleet.identity import Identity
from p2pfleet.net.dht_providers import provider_key
from p2pfleet.net.mesh import MeshSettings
from p2pfleet.wire.envelope import seal
from test_hostile import (attacker, dial, frame, in_gossip_mesh, penalty, put_value, rogue_mesh,
                          send)
from test_mesh import announcement, capacity

from fleetkit import NETWORK, fleet, wait_until

SCORE_TABLES = ("time_in_mesh", "first_message_deliveries", "mesh_message_deliveries",
                "invalid_messages")


def topics_held(pubsub) -> set[str]:
    """Every topic some per-topic table of the victim's pubsub, router or scorer holds."""
    router = pubsub.router
    held = (set(pubsub.peer_topics) | set(router.mesh) | set(router.fanout)
            | set(router.time_since_last_publish))
    for table in SCORE_TABLES:
        for per_topic in getattr(router.scorer, table).values():
            held |= set(per_topic)
    return held


def holds_peer(pubsub, peer) -> bool:
    scorer = pubsub.router.scorer
    return (peer in pubsub.peers or peer in pubsub._peer_subscription_count
            or any(peer in peers for peers in pubsub.peer_topics.values())
            or any(peer in getattr(scorer, table) for table in SCORE_TABLES))


async def test_gossip_naming_unknown_topics_holds_no_state_and_costs_the_sender():
    """A signed message listing our jobs topic and 1,000 others made GossipSub keep
    per-topic entries for all of them (scorer counters, publish times), some for good;
    subscriptions to topics we do not use cost nothing."""
    async with fleet(2) as meshes:
        victim = meshes[0]
        jobs = victim.names.topic("jobs")
        ours = {jobs, victim.names.topic("evidence")}
        junk = [f"/junk/topic/{i:05d}" for i in range(1000)]
        async with trio.open_nursery() as rogue_nursery:
            rogue = await rogue_mesh(7, rogue_nursery)
            rogue_id = rogue.host.get_id()
            await rogue.connect(victim.listen_addrs()[0])
            await in_gossip_mesh(rogue, victim)
            for i in range(3):
                await rogue.pubsub.subscribe(f"/junk/sub/{i}")
            publisher = Identity.from_seed(b"many topics")
            for seq in range(1, 4):
                await rogue.pubsub.publish([jobs, *junk], announcement(publisher, seq=seq))
            await wait_until(lambda: penalty(victim, rogue_id) > 0 or len(topics_held(victim.pubsub)) > 10)
            held = topics_held(victim.pubsub)
            assert held <= ours, f"{len(held - ours)} foreign topics held"
            assert penalty(victim, rogue_id) > 0
            rogue_nursery.cancel_scope.cancel()
        # the peer gone, nothing of it is held
        await wait_until(lambda: not holds_peer(victim.pubsub, rogue_id))
        assert topics_held(victim.pubsub) <= ours


async def test_one_sender_stores_no_more_than_its_quota_of_records():
    """10,000 valid records (each signed by its own identity) pushed by one peer were all
    stored; now a sender's stored records stop at a quota, and the rest cost it."""
    quota = MeshSettings(network=NETWORK).held_records.per_peer
    async with fleet(2) as meshes:
        victim = meshes[0]
        kad = victim.names.protocol("kad")
        store = victim.dht.value_store
        held_before = len(store.store)
        async with attacker(b"record pusher") as evil:
            await dial(evil, victim, "127.0.1.9")
            for i in range(quota + 20):
                signer = Identity.from_seed(f"pushed-{i}".encode())
                record = put_value(victim.names.node_key(signer.peer_id),
                                   seal(capacity(1), signer, NETWORK))
                if not await send(evil, victim, kad, record, close=True):
                    break  # refused: banned and disconnected
            await wait_until(lambda: penalty(victim, evil.get_id()) > 0)
            assert victim.record_quota.refused > 0
            assert len(store.store) - held_before <= quota
        # an honest peer's own record still goes in
        honest = meshes[1]
        await honest.put_capacity(seal(capacity(int(time.time() * 1000)), honest.identity, NETWORK))
        await wait_until(lambda: store.get(victim.names.node_key(honest.identity.peer_id).encode()))


async def push_records(victim, source_ip: str, who: str, count: int) -> None:
    """One fresh identity, from `source_ip`, PUTs `count` valid records (each signed by an
    identity of its own making) and leaves."""
    kad = victim.names.protocol("kad")
    refused_before = victim.record_quota.refused
    async with attacker(who.encode()) as evil:
        await dial(evil, victim, source_ip)
        for i in range(count):
            signer = Identity.from_seed(f"{who}-{i}".encode())
            record = put_value(victim.names.node_key(signer.peer_id),
                               seal(capacity(1), signer, NETWORK))
            await send(evil, victim, kad, record, close=True)
        # the victim handles each stream on its own: wait until it has judged the last one
        last = victim.names.node_key(Identity.from_seed(f"{who}-{count - 1}".encode()).peer_id)
        await wait_until(lambda: (last.encode() in victim.dht.value_store.store
                                  or victim.record_quota.refused > refused_before))


async def test_identities_rotated_from_one_address_store_no_more_than_its_quota():
    """Fresh identities from one address, each under its own quota, had every record
    stored (6 x 60 here); now one source address holds at most `source_share` peers'
    quotas, and an honest peer from another address still stores its record."""
    limits = HeldLimits()
    async with fleet(2) as meshes:
        victim, honest = meshes
        store = victim.dht.value_store.store
        held_before = len(store)
        for n in range(6):
            await push_records(victim, "127.0.1.9", f"rotating-{n}", limits.per_peer - 4)
        assert len(store) - held_before <= limits.per_source
        assert victim.record_quota.refused > 0
        await honest.put_capacity(seal(capacity(int(time.time() * 1000)), honest.identity, NETWORK))
        await wait_until(lambda: victim.names.node_key(honest.identity.peer_id).encode() in store)


async def test_a_full_store_drops_the_records_of_the_source_holding_most():
    """A full value store dropped its oldest record, whoever's: identities from a few
    addresses pushing records evicted the honest records held first. Now the source
    holding the most loses one of its own."""
    async with fleet(2, max_records=40) as meshes:
        victim, honest = meshes
        store = victim.dht.value_store.store
        honest_key = victim.names.node_key(honest.identity.peer_id).encode()
        await honest.put_capacity(seal(capacity(int(time.time() * 1000)), honest.identity, NETWORK))
        await wait_until(lambda: honest_key in store)
        for n, source in enumerate(("127.0.1.9", "127.0.1.10", "127.0.1.11")):
            await push_records(victim, source, f"filler-{n}", 20)
        assert len(store) <= 40
        assert honest_key in store


async def test_one_address_takes_no_more_than_its_share_of_a_keys_provider_slots():
    """ADD_PROVIDER keeps the first 20 providers of a key: 24 fresh identities from one
    address took every slot of a model's key and an honest provider was refused. Now one
    source address holds at most `source_share` of a key's slots."""
    share = HeldLimits().source_share
    async with fleet(1) as meshes:
        victim = meshes[0]
        kad = victim.names.protocol("kad")
        key = provider_key(victim.names, b"\x07" * 32)
        held = lambda: victim.dht.provider_store.providers.get(key, {})  # noqa: E731

        async def provide(who: str, source_ip: str) -> str:
            async with attacker(who.encode()) as host:
                await dial(host, victim, source_ip)
                msg = Message(type=Message.MessageType.ADD_PROVIDER, key=key)
                peer = msg.providerPeers.add()
                peer.id = host.get_id().to_bytes()
                peer.addrs.append(Multiaddr(f"/ip4/{source_ip}/tcp/4001").to_bytes())
                judged = victim.provider_quota.refused
                await send(host, victim, kad, frame(msg.SerializeToString()), close=True)
                await wait_until(lambda: str(host.get_id()) in held()
                                 or victim.provider_quota.refused > judged)
                return str(host.get_id())

        for n in range(24):
            await provide(f"slot-taker-{n}", "127.0.1.9")
        assert len(held()) <= share
        honest = await provide("honest-provider", "127.0.1.20")
        assert honest in held()
