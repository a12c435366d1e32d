"""Another implementation's standard Kademlia client against a real fleet (issue 15, item 4).

A standard libp2p `put` (go-, rust-, js-libp2p) asks FIND_NODE for the record's key, then
sends PUT_VALUE to the closest peers it learnt. The client here is a raw py-libp2p host
writing those frames by hand, on one stream, as the specification describes.
"""

from __future__ import annotations

import hashlib

import trio
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.peer.id import ID
from libp2p.utils.varint import read_varint_prefixed_bytes_limited

from p2pfleet.identity import Identity
from p2pfleet.net.dht_find_node import MAX_FIND_NODE_KEY
from p2pfleet.wire.envelope import seal
from test_hostile import attacker, dial, frame, put_value
from test_libp2p_fixes import assert_still_serving
from test_mesh import capacity

from fleetkit import NETWORK, fleet, wait_until


def find_node(key: bytes) -> bytes:
    return frame(Message(type=Message.MessageType.FIND_NODE, key=key).SerializeToString())


async def answer(stream) -> Message:
    with trio.fail_after(10):
        body = await read_varint_prefixed_bytes_limited(stream, 1 << 20)
    message = Message()
    message.ParseFromString(body)
    return message


def distance(key: bytes, peer: ID) -> int:
    target = hashlib.sha256(key).digest()
    return int.from_bytes(target, "big") ^ int.from_bytes(
        hashlib.sha256(peer.to_bytes()).digest(), "big")


async def test_a_standard_put_finds_the_closest_peers_and_stores_the_record():
    async with fleet(4) as meshes:
        victim = meshes[0]
        for mesh in meshes[1:]:  # their walks put them in the victim's routing table
            await mesh.put_capacity(seal(capacity(1), mesh.identity, NETWORK))
        others = {m.host.get_id() for m in meshes[1:]}
        await wait_until(lambda: others <= set(victim.dht.routing_table.get_peer_ids()))
        writer = Identity.from_seed(b"another implementation")
        key = victim.names.node_key(writer.peer_id)
        assert len(key.encode()) > 50  # not a peer id: upstream reset this FIND_NODE
        record = seal(capacity(7), writer, NETWORK)
        async with attacker(b"standard kad client") as client:
            await dial(client, victim, "127.0.1.9")
            stream = await client.new_stream(victim.host.get_id(),
                                             [TProtocol(victim.names.protocol("kad"))])
            await stream.write(find_node(key.encode()))
            found = await answer(stream)
            assert found.type == Message.MessageType.FIND_NODE
            peers = [ID(p.id) for p in found.closerPeers]
            assert others <= set(peers) and client.get_id() not in peers
            assert all(p.addrs for p in found.closerPeers)  # dialable, as the spec asks
            assert peers == sorted(peers, key=lambda p: distance(key.encode(), p))
            # then the put itself, on the same stream
            await stream.write(put_value(key, record))
            stored = await answer(stream)
            assert stored.type == Message.MessageType.PUT_VALUE
            await stream.close()
        await wait_until(lambda: victim.dht.value_store.get(key.encode()) is not None)
        assert bytes(victim.dht.value_store.get(key.encode()).value) == record
        await assert_still_serving(meshes)


async def test_a_find_node_key_over_the_cap_is_refused_and_the_node_serves_on():
    async with fleet(2) as meshes:
        victim = meshes[0]
        async with attacker(b"long key client") as client:
            await dial(client, victim, "127.0.1.10")
            stream = await client.new_stream(victim.host.get_id(),
                                             [TProtocol(victim.names.protocol("kad"))])
            await stream.write(find_node(b"k" * (MAX_FIND_NODE_KEY + 1)))
            refused = False
            try:
                await answer(stream)
            except Exception:  # noqa: BLE001 - reset or closed: refused either way
                refused = True
            assert refused
        await assert_still_serving(meshes)
